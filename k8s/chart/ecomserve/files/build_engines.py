#!/usr/bin/env python3
"""Init container: TensorRT plans for this pod's GPU, cached on a volume, and the repository Triton serves.

A plan only runs on the GPU model and TensorRT release that built it, so each engine is cached under

    <ENGINE_CACHE>/<gpu name>/trt-<TensorRT version>/<model>/<version>-<key>/model.plan

where <key> hashes the ONNX file and the trtexec flags: a new export or new flags build anew, and no
plan is ever reused on another GPU or TensorRT. A missing plan is built here with trtexec on the pod's
own GPU; pods that start together take turns through a lock folder, so one builds and the others
wait for its plan. Then SERVING_REPOSITORY (an emptyDir) receives links to every entry of
SOURCE_REPOSITORY, except that each engine's version folder links its files plus the cached plan.

Environment: SOURCE_REPOSITORY, SERVING_REPOSITORY, ENGINE_CACHE, ENGINES_FILE (JSON list of
{model, version, onnx, trtexecArgs}), LOCK_TIMEOUT_S, and optionally TRTEXEC (path of trtexec) and
TRT_VERSION (the images set it; otherwise trtexec's banner tells the version).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

PLAN = "model.plan"
TRTEXEC_PATHS = ("/usr/src/tensorrt/bin/trtexec", "/opt/tensorrt/bin/trtexec", "/workspace/tensorrt/bin/trtexec")


class EngineError(Exception):
    """A problem the operator has to fix; printed as one line."""


def log(message: str) -> None:
    print(f"[tensorrt-engines] {message}", flush=True)


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9.]+", "-", text.lower()).strip("-")


def gpu_name() -> str:
    try:
        listing = subprocess.run(
            ["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], check=True, capture_output=True, text=True
        ).stdout
    except (OSError, subprocess.CalledProcessError) as exc:
        raise EngineError(f"nvidia-smi failed ({exc}): does the pod have a GPU (gpu.enabled, gpu.count)?") from None
    names = {line.strip() for line in listing.splitlines() if line.strip()}
    if len(names) != 1:
        raise EngineError(f"expected one GPU model in the pod, nvidia-smi lists {sorted(names) or 'none'}")
    return slug(names.pop())


def find_trtexec() -> str:
    candidates = [os.environ.get("TRTEXEC"), shutil.which("trtexec"), *TRTEXEC_PATHS]
    for candidate in candidates:
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    raise EngineError(f"trtexec not found (looked on PATH and in {', '.join(TRTEXEC_PATHS)}); set tensorrt.image")


def tensorrt_version(trtexec: str) -> str:
    if os.environ.get("TRT_VERSION"):
        return slug(os.environ["TRT_VERSION"])
    banner = subprocess.run([trtexec, "--help"], capture_output=True, text=True)
    match = re.search(r"TensorRT v(\d+)", banner.stdout + banner.stderr)
    if not match:
        raise EngineError("cannot tell the TensorRT version: TRT_VERSION is unset and trtexec printed no version")
    return match.group(1)


def engine_key(onnx: Path, args: list[str]) -> str:
    digest = hashlib.sha256()
    with onnx.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    digest.update(json.dumps(args).encode())
    return digest.hexdigest()[:16]


def build_plan(trtexec: str, onnx: Path, plan: Path, args: list[str], record: dict) -> None:
    partial = plan.with_name(f"{PLAN}.{socket.gethostname()}.partial")
    command = [trtexec, f"--onnx={onnx}", f"--saveEngine={partial}", *args]
    log("building: " + " ".join(command))
    started = time.monotonic()
    result = subprocess.run(command)
    if result.returncode != 0 or not partial.is_file():
        partial.unlink(missing_ok=True)
        raise EngineError(f"trtexec failed (exit {result.returncode}) for {onnx}; its log is above")
    os.replace(partial, plan)
    record = {**record, "built_by": socket.gethostname(), "build_seconds": round(time.monotonic() - started, 1)}
    (plan.parent / "build.json").write_text(json.dumps(record, indent=2) + "\n")
    log(f"built {plan} in {record['build_seconds']} s")


def cached_plan(plan: Path, build, lock_timeout_s: float) -> None:
    """Build `plan` unless it exists; one pod at a time per plan, a lock older than the timeout is stale."""
    lock = plan.parent / ".lock"
    while not plan.is_file():
        try:
            lock.mkdir()
        except FileExistsError:
            try:
                age = time.time() - lock.stat().st_mtime
            except FileNotFoundError:
                continue
            if age > lock_timeout_s:
                log(f"{lock} is {age:.0f} s old, its builder is gone; taking over")
                shutil.rmtree(lock, ignore_errors=True)
            else:
                time.sleep(5)
            continue
        try:
            (lock / "owner").write_text(socket.gethostname() + "\n")
            if not plan.is_file():
                build()
        finally:
            shutil.rmtree(lock, ignore_errors=True)


def link(path: Path, target: Path) -> None:
    path.symlink_to(target, target_is_directory=target.is_dir())


def assemble(source: Path, serving: Path, plans: dict[tuple[str, str], Path]) -> None:
    """Fill `serving` with links into `source`; engine versions get their files plus the plan."""
    for entry in serving.iterdir():
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()
    engine_models = {model for model, _ in plans}
    for entry in sorted(source.iterdir()):
        if entry.name not in engine_models:
            link(serving / entry.name, entry)
            continue
        model_dir = serving / entry.name
        model_dir.mkdir()
        for item in sorted(entry.iterdir()):
            plan = plans.get((entry.name, item.name))
            if plan is None:
                link(model_dir / item.name, item)
                continue
            version_dir = model_dir / item.name
            version_dir.mkdir()
            for file in sorted(item.iterdir()):
                if file.name != PLAN:
                    link(version_dir / file.name, file)
            link(version_dir / PLAN, plan)


def main() -> int:
    source = Path(os.environ["SOURCE_REPOSITORY"])
    serving = Path(os.environ["SERVING_REPOSITORY"])
    cache = Path(os.environ["ENGINE_CACHE"])
    engines = json.loads(Path(os.environ["ENGINES_FILE"]).read_text())
    lock_timeout_s = float(os.environ.get("LOCK_TIMEOUT_S", "1800"))
    try:
        trtexec = find_trtexec()
        gpu, trt = gpu_name(), tensorrt_version(trtexec)
        log(f"GPU {gpu}, TensorRT {trt}, cache {cache}")
        plans = {}
        for index, engine in enumerate(engines):
            model, version, args = engine["model"], str(engine["version"]), list(engine["trtexecArgs"])
            onnx = source / model / version / engine["onnx"]
            if not onnx.is_file():
                raise EngineError(f"tensorrt.engines[{index}]: {onnx} not found in the model repository")
            key = engine_key(onnx, args)
            plan = cache / gpu / f"trt-{trt}" / model / f"{version}-{key}" / PLAN
            plan.parent.mkdir(parents=True, exist_ok=True)
            record = {"model": model, "version": version, "gpu": gpu, "tensorrt": trt, "onnx": str(onnx), "args": args}
            if plan.is_file():
                log(f"cached: {plan}")
            cached_plan(plan, functools.partial(build_plan, trtexec, onnx, plan, args, record), lock_timeout_s)
            plans[(model, version)] = plan
        assemble(source, serving, plans)
    except EngineError as exc:
        print(f"[tensorrt-engines] error: {exc}", file=sys.stderr, flush=True)
        return 1
    log(f"{serving}: {len(plans)} engine(s) linked beside the repository's other models")
    return 0


if __name__ == "__main__":
    sys.exit(main())
