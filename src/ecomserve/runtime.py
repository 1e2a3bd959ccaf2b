"""Runtimes that run an exported encoder inside the python backend, behind one call: ONNX Runtime or
OpenVINO on CPU, or PyTorch on CUDA (fp16) or CPU.

The served encoder model, the parity checks and the benchmark's in-process contender all run
encoders through `load_runner`, so what is measured in-process is what is served."""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Literal

import numpy as np

Runtime = Literal["onnxruntime", "openvino", "torch"]
Device = Literal["cpu", "cuda", "auto"]
# (input_ids [batch, seq] int64, attention_mask [batch, seq] int64) → unit vectors [batch, dim] fp32
Runner = Callable[[np.ndarray, np.ndarray], np.ndarray]

# Every encoder, whatever runs it, has the exported ONNX graph's tensor names.
ENCODER_INPUTS = ("input_ids", "attention_mask")
ENCODER_OUTPUT = "embedding"
MODEL_FILES = {"onnxruntime": "model.onnx", "openvino": "model.xml", "torch": "model.pt"}
# A torch encoder verified in fp16 also has this trace, run when CUDA is there.
TORCH_FP16_FILE = "model_fp16.pt"

log = logging.getLogger("ecomserve.runtime")


def load_runner(runtime: Runtime, path: Path, threads: int = 1, device: Device = "cpu") -> Runner:
    if runtime == "onnxruntime":
        return _onnxruntime_runner(path, threads)
    if runtime == "openvino":
        return _openvino_runner(path, threads)
    if runtime == "torch":
        chosen = select_device(device)
        half = path.with_name(TORCH_FP16_FILE)
        if half.is_file() and chosen == "cpu":
            # fp16 matmuls on CPU are emulated and slower than fp32; the answers stay within the fp16 bar.
            log.warning("encoder %s: fp16 needs CUDA; running fp32 on CPU", path.parent.name)
        return torch_runner(half if half.is_file() and chosen == "cuda" else path, chosen, threads)
    raise ValueError(f"unknown runtime {runtime!r}")


def select_device(requested: Device) -> str:
    """cuda when asked for and present; auto falls back to CPU with a warning, cuda refuses to."""
    import torch

    if requested == "cpu":
        return "cpu"
    if torch.cuda.is_available():
        return "cuda"
    reason = f"torch {torch.__version__} sees no CUDA device (a CPU-only build, or no GPU visible to this process)"
    if requested == "cuda":
        raise RuntimeError(
            f"serving.device is cuda but {reason}: install a CUDA build of torch on a GPU machine, "
            "or set serving.device: auto (falls back to CPU) or cpu"
        )
    log.warning("serving.device auto: %s; running on CPU", reason)
    return "cpu"


def torch_runner(path: Path, device: str, threads: int = 1) -> Runner:
    """The traced PyTorch reference (export/torchscript.py) on `device`; fp16 traces pool in fp32."""
    import torch

    if device == "cpu":
        torch.set_num_threads(threads)
    model = torch.jit.load(str(path), map_location=device)

    @torch.inference_mode()
    def run(input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        ids = torch.from_numpy(input_ids).to(device, non_blocking=True)
        mask = torch.from_numpy(attention_mask).to(device, non_blocking=True)
        return model(ids, mask).float().cpu().numpy()

    return run


# ORT graph fusions left out (`onnxruntime_options`).
UNFUSED = "SkipLayerNormFusion;BiasGeluFusion"


def onnxruntime_options(threads: int):
    """The session options every ecomserve ONNX Runtime session runs with (server, parity checks, benchmark)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    # The pool spins while a run is in progress (waking threads through the OS costs more than a short
    # query: 4.5 ms against 3.1 at 2 threads), but not after it returns: left spinning between requests it
    # burns the cores the other instances and the next request need (11 ms of CPU per 3 ms query, measured).
    options.add_session_config_entry("session.force_spinning_stop", "1")
    # ORT's fused SkipLayerNormalization and BiasGelu CPU kernels run slower than the Add, LayerNormalization
    # and Gelu they replace: without the two fusions the INT8 student ran 7–17% faster from one query to 32
    # titles, the INT8 teacher 6–16% from 4 queries up (even at one), and the served student answered 11% more
    # queries at 16 clients (2026-12-02, AMD EPYC, AVX-512 VNNI; README "Compression variants").
    options.add_session_config_entry("optimization.disable_specified_optimizers", UNFUSED)
    return options


def _onnxruntime_runner(path: Path, threads: int) -> Runner:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), onnxruntime_options(threads), providers=["CPUExecutionProvider"])

    def run(input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        return session.run(None, {"input_ids": input_ids, "attention_mask": attention_mask})[0]

    return run


def _openvino_runner(path: Path, threads: int) -> Runner:
    import openvino as ov

    core = ov.Core()
    compiled = core.compile_model(
        str(path),
        "CPU",
        {
            "INFERENCE_NUM_THREADS": threads,
            "PERFORMANCE_HINT": "LATENCY",
            # Keep fp32 activations on CPUs with bf16/fp16 support, so answers match the reference.
            "INFERENCE_PRECISION_HINT": "f32",
        },
    )
    # An infer request serves one call at a time: one per thread, for chunks run side by side.
    requests = threading.local()

    def run(input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        if not hasattr(requests, "request"):
            requests.request = compiled.create_infer_request()
        result = requests.request.infer({"input_ids": input_ids, "attention_mask": attention_mask})
        return np.array(result[compiled.output(0)], dtype=np.float32)

    return run


# Texts run in chunks of similar length: a batch of product titles padded to its longest title spends
# much of its compute on [PAD]; the benchmark's "titles/s" columns include this.
LENGTH_CHUNK = 8


# Each task runs one chunk of a batch; a TaskRunner runs every task once, in order or side by side.
Task = Callable[[], None]
TaskRunner = Callable[[list[Task]], None]


def run_in_order(tasks: list[Task]) -> None:
    for task in tasks:
        task()


def run_by_length(
    run: Runner, input_ids: np.ndarray, attention_mask: np.ndarray, run_tasks: TaskRunner = run_in_order
) -> np.ndarray:
    """`run` over a padded batch, longest texts first, each chunk cut to its own longest text; `run_tasks`
    decides where the chunks run (the server spreads them over idle cores: serving_models/cpu_share.py).
    Padding is masked inside the graph, so every answer is the same as in any other batch."""
    lengths = attention_mask.sum(axis=1)
    order = np.argsort(-lengths, kind="stable")
    chunks = [order[start : start + LENGTH_CHUNK] for start in range(0, len(order), LENGTH_CHUNK)]
    results: list[np.ndarray] = [np.empty(0)] * len(chunks)

    def task(index: int) -> Task:
        rows = chunks[index]
        width = int(lengths[rows].max())

        def run_chunk() -> None:
            results[index] = run(input_ids[rows, :width], attention_mask[rows, :width])

        return run_chunk

    run_tasks([task(index) for index in range(len(chunks))])
    vectors = np.empty((len(order), results[0].shape[1] if results else 0), dtype=np.float32)
    for rows, chunk in zip(chunks, results, strict=True):
        vectors[rows] = chunk
    return vectors


class _Chunks:
    """The tasks of one batch spread over threads: which is next, which thread runs which, which are finished."""

    def __init__(self, tasks: list[Task]) -> None:
        self.tasks = tasks
        self._next, self._lock = 0, threading.Lock()
        self.finished = [threading.Event() for _ in tasks]
        self.failed = [False] * len(tasks)
        self.helper = [0] * len(tasks)  # the ident of the helper thread that took the task

    def take(self, helper: int = 0) -> int | None:
        """The next task, if any; `helper`: the ident of the helper thread taking it."""
        with self._lock:
            if self._next == len(self.tasks):
                return None
            self.helper[self._next] = helper
            self._next += 1
            return self._next - 1


def thread_cpu_ns(ident: int) -> int:
    """CPU time so far of another thread of this process."""
    return time.clock_gettime_ns(time.pthread_getcpuclockid(ident))


class Spread:
    """A TaskRunner with helper threads beside the calling one, for a server's encoder instance: each helper keeps to
    another instance's cores (all the process's where empty) at the lowest priority, SCHED_IDLE, so it only ever
    takes time the others leave idle, and takes a task only while `may_help()` (while every other instance is idle,
    serving_models/cpu_share.py). The calling thread takes tasks in order too; when none is left it waits for a
    helper's last task only while that helper gets its core (the front, Triton or another instance may have it: a
    SCHED_IDLE thread then stalls), and otherwise runs the task itself rather than leave its own core idle. So tasks
    must give the same result when run twice."""

    WAIT_S = 0.0005  # how often the calling thread looks at a helper's task
    PROGRESS_WINDOW_NS = 2_000_000  # a helper that ran less than half of such a window is not getting its core

    def __init__(self, may_help: Callable[[], bool], helper_cores: list[list[int]]) -> None:
        self._may_help = may_help
        self._free_helpers = threading.Semaphore(len(helper_cores))
        unclaimed, claim = list(helper_cores), threading.Lock()

        def keep_to_idle_time() -> None:
            with claim:
                cores = unclaimed.pop()
            if cores:
                os.sched_setaffinity(0, cores)  # this helper thread only
            os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))

        self._pool = ThreadPoolExecutor(len(helper_cores), "spread", initializer=keep_to_idle_time)

    def run_tasks(self, tasks: list[Task]) -> None:
        """Every task at least once, all finished on return."""
        chunks = _Chunks(tasks)
        for _ in range(len(tasks) - 1):
            if not self._free_helpers.acquire(blocking=False):  # a helper still on an earlier batch's task
                break
            self._pool.submit(self._help, chunks)
        while (index := chunks.take()) is not None:
            tasks[index]()
            chunks.finished[index].set()
        for index in range(len(tasks)):
            if not self._helper_finishes(chunks, index) or chunks.failed[index]:
                tasks[index]()  # here, now: the helper stalled, or its run failed

    def _helper_finishes(self, chunks: _Chunks, index: int) -> bool:
        """Waits for a helper's task while the helper keeps running; False as soon as it does not."""
        finished = chunks.finished[index]
        if finished.is_set():
            return True
        since, ran = time.perf_counter_ns(), thread_cpu_ns(chunks.helper[index])
        while not finished.wait(self.WAIT_S):
            now = time.perf_counter_ns()
            if now - since >= self.PROGRESS_WINDOW_NS:
                running = thread_cpu_ns(chunks.helper[index])
                if running - ran < (now - since) // 2:
                    return finished.is_set()
                since, ran = now, running
        return True

    def _help(self, chunks: _Chunks) -> None:
        try:
            while self._may_help() and (index := chunks.take(threading.get_ident())) is not None:
                try:
                    chunks.tasks[index]()
                except Exception:  # noqa: BLE001 - the calling thread runs it again and raises there
                    chunks.failed[index] = True
                chunks.finished[index].set()
        finally:
            self._free_helpers.release()

    def close(self) -> None:
        self._pool.shutdown()
