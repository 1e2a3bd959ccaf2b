"""Peers in the same benchmark run (issue 18): Infinity served over HTTP, fastembed in-process.

Each peer lives in a virtual environment of its own (`scripts/setup_peers.sh`); ecomserve never imports
them. Both run the bundled model offline from local folders, on the same unique texts and through the same
closed loop (`bench.load.measure`) as ecomserve:

- infinity: `infinity_emb v2` started as a child process on loopback, from inside an ONNX folder that the
  peer's own optimum exports from the bundled model (Infinity's optimum engine wants `--model-id .` and a
  token-level ONNX file; it pools with `--pooling-method mean` and normalises itself): fp32 as exported,
  fp32 optimized, INT8 dynamic. Its torch engine loads the bundled sentence-transformers folder directly.
  Every configuration is measured over its OpenAI-style `/embeddings`; the fastest counts in the ratios.
- fastembed: in-process in its own interpreter (`VENV/bin/python fastembed_worker.py REQUEST RESULT`),
  on the very INT8 ONNX file ecomserve serves (it outputs pooled, normalised vectors: fastembed's pooling
  is DISABLED, its normalisation is a no-op). No serving cost: compare it with ecomserve's in-process rows.

Every peer also embeds a few parity texts; their cosine to a reference (PyTorch fp32 for a model the peer
built itself, ecomserve's in-process runner for the same file) must be ≥ 0.99, so the peer runs the same
model."""

from __future__ import annotations

import http.client
import json
import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ecomserve.bench.load import Measurement
from ecomserve.server.process import read_tail

PEER_KINDS = ("infinity", "fastembed")
SETUP_SCRIPT = "scripts/setup_peers.sh"
MIN_PARITY_COSINE = 0.99
INFINITY_BATCH_SIZE = 32
SERVED_MODEL_NAME = "minilm"
# Files a transformers tokenizer and config need, copied from the bundled model next to the ONNX file.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt", "config.json")
# Offline, loopback, no telemetry: a peer reaches nothing outside this machine.
OFFLINE_ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "DO_NOT_TRACK": "1",
    "INFINITY_ANONYMOUS_USAGE_STATS": "0",
}
WORKER = Path(__file__).with_name("fastembed_worker.py")


class PeerError(ValueError):
    """A --peer value that cannot be used; the message says what to run."""


@dataclass(frozen=True)
class Peer:
    kind: str  # "infinity" or "fastembed"
    venv: Path

    @property
    def python(self) -> Path:
        return self.venv / "bin" / "python"

    @property
    def executable(self) -> Path:
        """What must exist in the venv for this peer to run."""
        return self.venv / "bin" / "infinity_emb" if self.kind == "infinity" else self.python


def setup_hint(kind: str, venv: Path | str) -> str:
    return f"create it with `{SETUP_SCRIPT} {kind} {venv}`"


def parse_peer(value: str) -> Peer:
    """`KIND=VENV` → a Peer whose venv holds the peer; PeerError says what is wrong and what to run."""
    kind, sep, venv = value.partition("=")
    kind = kind.strip().lower()
    if not sep or not venv.strip():
        raise PeerError(f"--peer {value!r}: expected KIND=VENV, e.g. infinity=/work/peers/infinity")
    if kind not in PEER_KINDS:
        raise PeerError(f"--peer {value!r}: unknown peer kind {kind!r}; known: {', '.join(PEER_KINDS)}")
    peer = Peer(kind, Path(venv.strip()).expanduser().absolute())
    if not peer.venv.is_dir():
        raise PeerError(f"--peer {value!r}: no virtual environment at {peer.venv}; {setup_hint(kind, peer.venv)}")
    if not peer.executable.exists():
        raise PeerError(f"--peer {value!r}: {peer.executable} is missing; {setup_hint(kind, peer.venv)}")
    return peer


def parse_peers(values: list[str]) -> list[Peer]:
    peers = [parse_peer(value) for value in values]
    kinds = [peer.kind for peer in peers]
    repeated = sorted({kind for kind in kinds if kinds.count(kind) > 1})
    if repeated:
        raise PeerError(f"--peer: each kind once; repeated: {', '.join(repeated)}")
    return peers


def peer_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The parent's environment with the offline switches on, minus our venv (the peer has its own)."""
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME")}
    return env | OFFLINE_ENV | (extra or {})


def _run(command: list[str], cwd: Path | None = None, env: dict | None = None, timeout_s: float = 900) -> str:
    done = subprocess.run(
        command, cwd=cwd, env=env or peer_env(), capture_output=True, text=True, timeout=timeout_s, check=False
    )
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, command))} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return done.stdout


def peer_versions(peer: Peer) -> dict[str, str]:
    """Infinity's packages in its venv (fastembed's worker reports its own)."""
    packages = ["infinity-emb", "optimum", "onnxruntime", "torch", "transformers"]
    script = (
        "import json, sys\nfrom importlib.metadata import version, PackageNotFoundError\nout = {}\n"
        "for name in sys.argv[1:]:\n    try:\n        out[name] = version(name)\n"
        "    except PackageNotFoundError:\n        pass\nprint(json.dumps(out))"
    )
    return json.loads(_run([str(peer.python), "-c", script, *packages]))


# ---- Infinity --------------------------------------------------------------------------------------------

# Run by the peer's own python: its optimum exports the bundled model (token embeddings, fp32), then makes the
# two other ONNX files Infinity's optimum engine can serve on CPU: the graph Infinity's own optimisation step
# would write (ORTOptimizer, level 99; that step fails on optimum 2.x, whose OptimizationConfig lost a keyword
# Infinity 0.0.78 passes) and a dynamic INT8 one (AVX-512 VNNI, per channel: per tensor loses too much, min
# cosine 0.90 to fp32; Infinity prefers "*quantized*" files on CPU).
PREPARE_SCRIPT = """
import sys
from pathlib import Path
from optimum.onnxruntime import ORTModelForFeatureExtraction, ORTOptimizer, ORTQuantizer
from optimum.onnxruntime.configuration import AutoQuantizationConfig, OptimizationConfig
source, root = sys.argv[1], Path(sys.argv[2])
model = ORTModelForFeatureExtraction.from_pretrained(source, export=True)
model.save_pretrained(root / "fp32")
optimizer = ORTOptimizer.from_pretrained(model)
optimizer.optimize(
    optimization_config=OptimizationConfig(optimization_level=99, optimize_for_gpu=False, fp16=False),
    save_dir=root / "optimized",
    one_external_file=True,
)
quantizer = ORTQuantizer.from_pretrained(root / "fp32", file_name="model.onnx")
quantizer.quantize(
    save_dir=root / "int8",
    quantization_config=AutoQuantizationConfig.avx512_vnni(is_static=False, per_channel=True),
)
"""
# Infinity configurations: name → (engine, ONNX folder under the prepared root, or None for the torch engine).
INFINITY_CONFIGS = {
    "optimum fp32": ("optimum", "fp32"),
    "optimum fp32 optimized": ("optimum", "optimized"),
    "optimum int8 dynamic": ("optimum", "int8"),
    "torch fp32": ("torch", None),
}


def prepare_infinity_folders(peer: Peer, source: Path, root: Path, versions: dict[str, str]) -> dict[str, Path]:
    """ONNX folders for Infinity's optimum engine (fp32, optimized, int8): each holds one ONNX file (Infinity
    picks among several by name), its config and the bundled tokenizer files. Rebuilt when the source or the
    peer's packages (`versions`, from peer_versions) change."""
    record = root / "ecomserve-build.json"
    folders = {name: root / name for name in ("fp32", "optimized", "int8")}
    wanted = {
        "source": str(source),
        "venv": str(peer.venv),
        "versions": versions,
        "folders": list(folders),
        "script": PREPARE_SCRIPT,
    }
    built = record.is_file() and json.loads(record.read_text()) == wanted
    if built and all(any(folder.glob("*.onnx")) for folder in folders.values()):
        return folders
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    _run([str(peer.python), "-c", PREPARE_SCRIPT, str(source), str(root)])
    for folder in folders.values():
        copy_tokenizer_files(source, folder)  # the bundled files, not the re-saved copies
        onnx_files = sorted(p.name for p in folder.rglob("*.onnx"))
        if len(onnx_files) != 1:
            raise RuntimeError(f"expected one ONNX file in {folder}, found {onnx_files}")
    record.write_text(json.dumps(wanted, indent=2))
    return folders


@dataclass(frozen=True)
class InfinityLaunch:
    config: str  # a key of INFINITY_CONFIGS
    command: list[str]
    cwd: Path
    env: dict[str, str]
    port: int


def infinity_launch(
    peer: Peer, config: str, port: int, onnx_folder: Path | None, source: Path, hf_home: Path
) -> InfinityLaunch:
    """The command line, folder and environment that start Infinity's `config` on 127.0.0.1:`port`.

    optimum: from inside the ONNX folder with `--model-id .` (Infinity lists the folder's files relative to
    the model id and hands the relative ONNX name to optimum); a prepared (optimized or INT8) file skips
    Infinity's own optimisation step. torch: the bundled sentence-transformers folder. HF_HOME is a folder
    of this run: Infinity caches optimised graphs under it by model id, and "." would otherwise match
    another model's cache."""
    if config not in INFINITY_CONFIGS:
        raise PeerError(f"unknown Infinity configuration {config!r}; known: {', '.join(INFINITY_CONFIGS)}")
    engine, folder_name = INFINITY_CONFIGS[config]
    if engine == "optimum":
        if onnx_folder is None:
            raise PeerError(f"Infinity's {config} needs its ONNX folder")
        model_id, cwd = ".", onnx_folder.absolute()
    else:
        model_id, cwd = str(source), hf_home.parent.absolute()
    command = [
        str(peer.venv / "bin" / "infinity_emb"),
        "v2",
        "--engine",
        engine,
        "--model-id",
        model_id,
        "--served-model-name",
        SERVED_MODEL_NAME,
        "--pooling-method",
        "mean",
        "--device",
        "cpu",
        "--batch-size",
        str(INFINITY_BATCH_SIZE),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--log-level",
        "warning",
    ]
    if engine == "torch":
        command += ["--no-bettertransformer"]  # needs optimum < 2; plain torch attention otherwise
    elif folder_name != "fp32":
        command += ["--onnx-disable-optimize"]  # already optimized, or quantized
    env = peer_env({"HF_HOME": str(hf_home.absolute()), "HF_HUB_CACHE": str(hf_home.absolute() / "hub")})
    return InfinityLaunch(config, command, cwd, env, port)


class InfinityServer:
    """One Infinity process; `with` starts it, waits for /health, and stops its whole process group."""

    def __init__(self, launch: InfinityLaunch, log_path: Path, timeout_s: float = 300):
        self.launch = launch
        self.log_path = log_path
        self.timeout_s = timeout_s
        self.process: subprocess.Popen | None = None

    def __enter__(self) -> InfinityServer:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(
                self.launch.command,
                cwd=self.launch.cwd,
                env=self.launch.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        deadline = time.monotonic() + self.timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"Infinity ({self.launch.config}) exited {self.process.returncode}: {self._tail()}")
            if self._healthy():
                return
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"Infinity ({self.launch.config}) not healthy after {self.timeout_s:.0f} s: {self._tail()}")

    def _healthy(self) -> bool:
        try:
            connection = http.client.HTTPConnection("127.0.0.1", self.launch.port, timeout=2)
            connection.request("GET", "/health")
            ok = connection.getresponse().status == 200
            connection.close()
            return ok
        except OSError:
            return False

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.is_file() else ""

    def _tail(self) -> str:
        return read_tail(self.log_path, 2000) if self.log_path.is_file() else ""

    def stop(self, timeout_s: float = 20) -> None:
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()

    @property
    def rss_mb(self) -> float:
        import psutil

        if self.process is None:
            return float("nan")
        root = psutil.Process(self.process.pid)
        return sum(p.memory_info().rss for p in [root, *root.children(recursive=True)]) / 2**20


def infinity_embedder(port: int):
    """A keep-alive HTTP client of Infinity's OpenAI-style /embeddings: texts → float32 [n, dim]."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=120)

    def embed(texts: list[str]) -> np.ndarray:
        body = json.dumps({"model": SERVED_MODEL_NAME, "input": texts, "encoding_format": "float"}).encode()
        connection.request("POST", "/embeddings", body, {"Content-Type": "application/json"})
        response = connection.getresponse()
        payload = response.read()
        if response.status != 200:
            raise RuntimeError(f"Infinity answered {response.status}: {payload[:200]!r}")
        data = sorted(json.loads(payload)["data"], key=lambda item: item["index"])
        return np.array([item["embedding"] for item in data], dtype=np.float32)

    embed.close = connection.close  # type: ignore[attr-defined]
    return embed


# ---- fastembed -------------------------------------------------------------------------------------------


def prepare_fastembed_folder(model_file: Path, source: Path, folder: Path) -> Path:
    """fastembed's `specific_model_path`: ecomserve's served ONNX file (linked, not copied) and the bundled
    tokenizer files."""
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / "model.onnx"
    if target.is_symlink() or target.exists():
        target.unlink()
    target.symlink_to(model_file.resolve())
    copy_tokenizer_files(source, folder)
    return folder


def copy_tokenizer_files(source: Path, folder: Path) -> None:
    """The bundled model's tokenizer files that exist, copied into a peer's model folder."""
    for name in TOKENIZER_FILES:
        if (source / name).is_file():
            shutil.copy2(source / name, folder / name)


# fastembed's pooling of ecomserve's ONNX, which outputs pooled, normalised vectors.
FASTEMBED_POOLING = "DISABLED"


def fastembed_request(
    folder: Path,
    label: str,
    queries: list[str],
    titles: list[str],
    parity: list[str],
    duration_s: float,
    dim: int,
    threads: tuple[int, ...] = (1, 2),
) -> dict:
    """The worker's input (fastembed_worker.py documents the contract); `dim`: the served model's vector size."""
    return {
        "model_dir": str(folder),
        "model_file": "model.onnx",
        "model_name": f"ecomserve/{label}",
        "label": label,
        "pooling": FASTEMBED_POOLING,
        "normalization": True,
        "dim": dim,
        "threads": list(threads),
        "duration_s": duration_s,
        "load_module": str(Path(__file__).with_name("load.py")),
        "workloads": {"query embed": {"items": 1, "texts": queries}, "batch embed 32": {"items": 32, "texts": titles}},
        "parity_texts": parity,
    }


def run_fastembed(peer: Peer, request: dict, work_dir: Path, timeout_s: float = 900) -> dict:
    """Runs the worker in the peer's interpreter; returns its result JSON."""
    work_dir.mkdir(parents=True, exist_ok=True)
    request_path, result_path = work_dir / "request.json", work_dir / "result.json"
    request_path.write_text(json.dumps(request))
    result_path.unlink(missing_ok=True)
    env = peer_env({"FASTEMBED_CACHE_PATH": str(work_dir / "cache")})
    _run([str(peer.python), str(WORKER), str(request_path), str(result_path)], env=env, timeout_s=timeout_s)
    return json.loads(result_path.read_text())


def fastembed_texts_needed(duration_s: float, threads: int, max_rate: float = 2000.0) -> int:
    """Texts to hand the worker per workload: enough for `max_rate` texts/s over every thread setting."""
    return int(threads * (duration_s + 1) * max_rate) + 64


# ---- both ------------------------------------------------------------------------------------------------


def parity(vectors: np.ndarray, reference: np.ndarray, reference_name: str, served_min: float | None = None) -> dict:
    """Cosine of each peer vector to the reference's (both L2-normalised first). `ok`: the min cosine is at
    least 0.99, or (an INT8 peer) at least ecomserve's own served INT8's, `served_min`, on the same texts."""
    a = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    b = reference / np.linalg.norm(reference, axis=1, keepdims=True)
    cosines = (a * b).sum(axis=1)
    return {
        "reference": reference_name,
        "texts": len(cosines),
        "min_cosine": float(cosines.min()),
        "mean_cosine": float(cosines.mean()),
        "ok": bool(cosines.min() >= min(MIN_PARITY_COSINE, served_min if served_min is not None else 1.0)),
    }


def measurement_from_row(row: dict) -> Measurement:
    return Measurement(**{k: row[k] for k in Measurement.__dataclass_fields__})
