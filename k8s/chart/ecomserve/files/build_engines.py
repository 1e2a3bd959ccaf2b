#!/usr/bin/env python3
"""Init container: TensorRT plans for this pod's GPU, checked and cached on a volume, and the repository Triton serves.

A plan only runs on the GPU model and TensorRT release that built it, so each engine is cached under

    <ENGINE_CACHE>/<gpu name>/trt-<TensorRT version>/<model>/<version>-<key>/model.plan

where <key> hashes the ONNX file and the trtexec flags: a new export or new flags build anew, and no
plan is ever reused on another GPU or TensorRT. A missing plan is built here with trtexec on the pod's
own GPU; pods that start together take turns through a lock folder, so one builds and the others
wait for its plan. Then SERVING_REPOSITORY (an emptyDir) receives links to every entry of
SOURCE_REPOSITORY, except that each engine's version folder links its files plus the cached plan.

The engines are those of ENGINES_FILE (the chart's tensorrt.engines) or, when that list is empty, of
the repository's own tensorrt_engines.json, written by `ecomserve build --target tensorrt`. An entry is
{model, version, onnx, trtexecArgs, optional check}; its file names are relative to
<model>/<version>/, where trtexec runs (so `--calib=calibration.cache` resolves there). With a check,
a new plan runs once on the check inputs and its output must match the fp32 PyTorch embeddings
(row-wise cosine >= check.min_cosine) before it enters the cache; otherwise it is deleted and the pod
does not start. Only the standard library: the TensorRT image has no numpy.

Environment: SOURCE_REPOSITORY, SERVING_REPOSITORY, ENGINE_CACHE, ENGINES_FILE (JSON list, may be
empty), LOCK_TIMEOUT_S, and optionally TRTEXEC (path of trtexec) and TRT_VERSION (the images set it;
otherwise trtexec's banner tells the version).
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import re
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PLAN = "model.plan"
MANIFEST = "tensorrt_engines.json"
TRTEXEC_PATHS = ("/usr/src/tensorrt/bin/trtexec", "/opt/tensorrt/bin/trtexec", "/workspace/tensorrt/bin/trtexec")
ENGINE_FIELDS = ("model", "version", "onnx", "trtexecArgs")
CHECK_FIELDS = ("shapes", "inputs", "output", "expected", "dim", "min_cosine")


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


def load_engines(source: Path, engines_file: str | None) -> tuple[str, list]:
    """(where they come from, the engine list): the values' list, or the repository's manifest when it is empty."""
    engines = json.loads(Path(engines_file).read_text()) if engines_file else []
    if engines:
        log(f"{len(engines)} engine(s) from tensorrt.engines; the repository's {MANIFEST}, if any, is not read")
        return "tensorrt.engines", engines
    manifest = source / MANIFEST
    if not manifest.is_file():
        raise EngineError(
            f"tensorrt.engines is empty and the repository has no {MANIFEST}: build it with "
            "`ecomserve build --target tensorrt`, or list the engines in tensorrt.engines"
        )
    try:
        engines = json.loads(manifest.read_text())
    except ValueError as exc:
        raise EngineError(f"{manifest} is not JSON ({exc})") from None
    if not isinstance(engines, list) or not engines:
        raise EngineError(f"{manifest} lists no engines")
    log(f"{len(engines)} engine(s) from {manifest}")
    return MANIFEST, engines


def validate(where: str, engine: object, version_dir: Path) -> None:
    if not isinstance(engine, dict) or any(field not in engine for field in ENGINE_FIELDS):
        raise EngineError(f"{where}: needs {', '.join(ENGINE_FIELDS)} (and optionally check)")
    if not (version_dir / engine["onnx"]).is_file():
        raise EngineError(f"{where}: {version_dir / engine['onnx']} not found in the model repository")
    check = engine.get("check")
    if check is None:
        return
    missing = [field for field in CHECK_FIELDS if field not in check]
    if missing:
        raise EngineError(f"{where}: check lacks {', '.join(missing)}")
    for name in [*check["inputs"].values(), check["expected"]]:
        if not (version_dir / name).is_file():
            raise EngineError(f"{where}: check file {version_dir / name} not found in the model repository")


def engine_key(onnx: Path, args: list[str]) -> str:
    digest = hashlib.sha256()
    with onnx.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    digest.update(json.dumps(args).encode())
    return digest.hexdigest()[:16]


def check_command(trtexec: str, plan: Path, check: dict, output: Path) -> list[str]:
    """Runs the plan once on the check inputs (paths relative to the version folder) and exports its output."""
    inputs = ",".join(f"{name}:{file}" for name, file in check["inputs"].items())
    return [
        trtexec,
        f"--loadEngine={plan}",
        f"--shapes={check['shapes']}",
        f"--loadInputs={inputs}",
        f"--exportOutput={output}",
        "--iterations=1",
        "--warmUp=0",
        "--duration=0",
    ]


def read_export(path: Path) -> list:
    """trtexec's --exportOutput JSON; it prints non-finite values as bare nan/inf, which JSON lacks."""
    text = path.read_text()
    try:
        return json.loads(text)
    except ValueError:
        text = re.sub(r"(?<![\w.])-?nan\b", "NaN", text, flags=re.IGNORECASE)
        text = re.sub(r"(?<![\w.])(-?)inf\b", r"\1Infinity", text, flags=re.IGNORECASE)
        return json.loads(text)


def cosines(exported: list, check: dict, version_dir: Path) -> list[float]:
    """Row-wise cosine between the engine's output and the fp32 reference (NaN where either is not finite)."""
    output = next((o for o in exported if o.get("name") == check["output"]), None)
    if output is None:
        names = [o.get("name") for o in exported]
        raise EngineError(f"the engine has no output {check['output']!r} (it has {names}); rebuild the repository")
    actual = [float(value) for value in output["values"]]
    raw = (version_dir / check["expected"]).read_bytes()
    expected = struct.unpack(f"<{len(raw) // 4}f", raw[: len(raw) // 4 * 4])
    dim = int(check["dim"])
    if not expected or len(actual) != len(expected) or len(expected) % dim:
        raise EngineError(
            f"check output {check['output']!r} has {len(actual)} values ({output.get('dimensions')}), "
            f"{check['expected']} has {len(expected)} ({dim} per row)"
        )
    result = []
    for start in range(0, len(expected), dim):
        a, e = actual[start : start + dim], expected[start : start + dim]
        dot = sum(x * y for x, y in zip(a, e))
        norms = math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in e))
        cosine = dot / max(norms, 1e-12)
        result.append(cosine if math.isfinite(cosine) else math.nan)
    return result


def check_plan(trtexec: str, plan: Path, check: dict, version_dir: Path, model: str) -> dict:
    """Run `plan` on the check inputs; raise (the caller deletes the plan) if it strays from PyTorch fp32."""
    with tempfile.TemporaryDirectory(prefix="tensorrt-check-") as work:
        output = Path(work) / "check_output.json"
        command = check_command(trtexec, plan, check, output)
        log(f"checking {model}: " + " ".join(command))
        # The version folder may be read-only: trtexec writes only the (absolute) --exportOutput.
        result = subprocess.run(command, cwd=version_dir, capture_output=True, text=True)
        if result.returncode != 0 or not output.is_file():
            tail = (result.stdout + result.stderr)[-3000:]
            print(tail, file=sys.stderr, flush=True)
            raise EngineError(f"{model}: trtexec check run failed (exit {result.returncode}); its log is above")
        try:
            exported = read_export(output)
        except ValueError as exc:
            raise EngineError(f"{model}: cannot read trtexec's --exportOutput ({exc})") from None
    values = cosines(exported, check, version_dir)
    worst = math.nan if any(math.isnan(c) for c in values) else min(values)
    bar = float(check["min_cosine"])
    if not worst >= bar:
        raise EngineError(
            f"{model}: engine output differs from PyTorch fp32: min cosine {worst:.6f} < {bar} on {len(values)} "
            "texts; the plan was deleted (try precision fp16 or fp32 in the spec)"
        )
    log(f"checked {model}: min cosine to PyTorch fp32 {worst:.6f} >= {bar} on {len(values)} texts")
    return {"min_cosine": round(worst, 6), "bar": bar, "texts": len(values)}


def build_plan(trtexec: str, engine: dict, version_dir: Path, plan: Path, record: dict) -> None:
    """trtexec in the version folder (relative --calib= and check files), the plan written to the cache;
    with a check, the plan must pass it before it takes its final name (which waiting pods look for)."""
    partial = plan.with_name(f"{PLAN}.{socket.gethostname()}.partial")
    onnx = version_dir / engine["onnx"]
    command = [trtexec, f"--onnx={onnx}", f"--saveEngine={partial}", *engine["trtexecArgs"]]
    log(f"building in {version_dir}: " + " ".join(command))
    started = time.monotonic()
    try:
        result = subprocess.run(command, cwd=version_dir)
        if result.returncode != 0 or not partial.is_file():
            raise EngineError(f"trtexec failed (exit {result.returncode}) for {onnx}; its log is above")
        build_seconds = round(time.monotonic() - started, 1)
        check = None
        if engine.get("check"):
            check = check_plan(trtexec, partial, engine["check"], version_dir, engine["model"])
        os.replace(partial, plan)
    finally:
        partial.unlink(missing_ok=True)
    record = {**record, "built_by": socket.gethostname(), "build_seconds": build_seconds, "check": check}
    (plan.parent / "build.json").write_text(json.dumps(record, indent=2) + "\n")
    log(f"built {plan} in {build_seconds} s")


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
    lock_timeout_s = float(os.environ.get("LOCK_TIMEOUT_S", "1800"))
    try:
        origin, engines = load_engines(source, os.environ.get("ENGINES_FILE"))
        trtexec = find_trtexec()
        gpu, trt = gpu_name(), tensorrt_version(trtexec)
        log(f"GPU {gpu}, TensorRT {trt}, cache {cache}")
        plans = {}
        for index, engine in enumerate(engines):
            where = f"{origin}[{index}]"
            version_dir = source / str(engine.get("model", "")) / str(engine.get("version", ""))
            validate(where, engine, version_dir)
            model, version, args = engine["model"], str(engine["version"]), list(engine["trtexecArgs"])
            onnx = version_dir / engine["onnx"]
            # The key covers the ONNX file and the flags only: the check decides whether a plan is kept,
            # not how it is built.
            key = engine_key(onnx, args)
            plan = cache / gpu / f"trt-{trt}" / model / f"{version}-{key}" / PLAN
            plan.parent.mkdir(parents=True, exist_ok=True)
            record = {"model": model, "version": version, "gpu": gpu, "tensorrt": trt, "onnx": str(onnx), "args": args}
            if plan.is_file():
                # Not checked again: it was checked when it was built (build_plan names a plan model.plan
                # only after its check passed), and the key pins the ONNX file and flags it came from.
                log(f"cached: {plan}")
            build = functools.partial(build_plan, trtexec, {**engine, "trtexecArgs": args}, version_dir, plan, record)
            cached_plan(plan, build, lock_timeout_s)
            plans[(model, version)] = plan
        assemble(source, serving, plans)
    except EngineError as exc:
        print(f"[tensorrt-engines] error: {exc}", file=sys.stderr, flush=True)
        return 1
    log(f"{serving}: {len(plans)} engine(s) linked beside the repository's other models")
    return 0


if __name__ == "__main__":
    sys.exit(main())
