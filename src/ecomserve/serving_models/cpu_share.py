"""Threads that adapt to load: an encoder instance runs a batch with `serving.idle_threads` threads while no other
encoder instance of the same server is running one, and with `serving.intra_op_threads` otherwise.

Several single-threaded instances give the best throughput under load (each core runs its own batch, no
synchronisation), but leave all cores but one idle when a single request arrives: its latency is then that of one
core. An instance that finds the others idle takes the idle cores too. The choice is made again before each
chunk of a batch (`runtime.run_by_length`): an instance that went wide steps back to one thread at its next chunk
once another instance starts a batch (both wide would run more threads than cores), and one that started narrow
widens once the others finish. Under sustained load the instances overlap, see each other busy and stay at one
thread each.

A batch of several chunks goes the other way (`serving.spread_batches`): while every other instance is idle, helper
threads run its chunks side by side with it, one thread each on the other instances' cores. A chunk is 8 texts, too
small for a second ONNX Runtime thread to pay much (32 titles in-process: 45–52 ms on one thread, 35–36 on two,
26–28 with the chunks on two cores side by side; README, "Spreading a large batch"). A helper takes its next chunk
only while the others are still idle, so an instance that starts a batch shares its core with at most one chunk of
ours; and a batch spreads only when its own instance had rested before it (RESTED_S): under a steady load batches
follow each other closely, and the cores that look idle between two of them are about to be busy again. A batch of
one chunk (a query) is left to `idle_threads`.

Every encoder instance of the server (the stub processes of one tritonserver, so the folder is named by its pid)
holds an exclusive `flock` on its own file in a shared folder while it runs a batch; "the others are idle" means
every other file can be locked at once. The kernel drops a dead process's locks, so a crashed stub never leaves
the others thinking it busy."""

from __future__ import annotations

import fcntl
import os
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext, suppress
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ecomserve.parameters import EmbedderParameters, EncoderParameters
from ecomserve.runtime import LENGTH_CHUNK, Runner, Spread, load_runner, run_by_length

SUFFIX = ".busy"
# A batch spreads only when its instance had been idle this long before it: under a steady load an instance's next
# batch follows its last within a few ms, and its helpers would mostly take chunks from cores about to be busy
# (4 clients of 32 titles: 3–5% fewer texts/s without this rule; README, "Spreading a large batch").
RESTED_S = 0.010


@dataclass(frozen=True)
class Runners:
    """One encoder's runner at intra_op_threads and, when idle_threads is more, one at idle_threads."""

    narrow: Runner
    wide: Runner | None

    def pick(self, others_idle: bool) -> Runner:
        return self.wide if others_idle and self.wide is not None else self.narrow


def load_runners(runtime: str, path: Path, threads: int, idle_threads: int | None, device: str) -> Runners:
    narrow = load_runner(runtime, path, threads, device)
    if idle_threads is None or idle_threads <= threads or device != "cpu":
        return Runners(narrow, None)
    return Runners(narrow, load_runner(runtime, path, idle_threads, device))


def server_share_dir() -> Path:
    """The folder the encoder instances of this process's tritonserver (its parent) share."""
    return Path(tempfile.gettempdir()) / f"ecomserve-cpu-{os.getppid()}"


def own_cores(cpus: set[int], instances: int, threads: int, index: int) -> list[int] | None:
    """The cores instance `index` keeps to when `cpus` holds exactly one core per thread of every instance; else
    None (more cores than that: the scheduler spreads the instances better than a fixed choice would)."""
    if len(cpus) != instances * threads:
        return None
    ordered = sorted(cpus)
    return ordered[index * threads : (index + 1) * threads]


def _layout(config: dict, instance: str) -> tuple[int, int] | None:
    """(this instance's index, the instances of the model) from Triton's instance name `<group>_<index>`."""
    index = instance.rsplit("_", 1)[-1]
    if not index.isdigit():
        return None
    instances = sum(int(group.get("count", 1)) for group in config.get("instance_group") or [{}])
    return int(index) % instances, instances


def pin_instance(
    config: dict, instance: str, parameters: EncoderParameters | EmbedderParameters, runners: list[Runners]
) -> list[list[int]] | None:
    """Keep this instance's process on cores of its own when the server's CPU set fits the instances exactly (2
    single-threaded instances on 2 cores; a pod with whole CPUs under Kubernetes' static CPU manager): a batch then
    finds its core's caches as the last batch left them, not cooled by a migration (README, "Where one query's
    time goes"). A GPU model, and an instance that can go wide (idle_threads, it needs the other cores), stay free,
    and so does every instance of a spec with `serving.pin_cores: false`. Returns the other instances' cores, in
    instance order after this one, when this one was pinned."""
    layout = _layout(config, instance)
    pinnable = parameters.pin_cores and parameters.device == "cpu" and all(r.wide is None for r in runners)
    if not pinnable or layout is None:
        return None
    index, instances = layout
    cpus, threads = os.sched_getaffinity(0), parameters.intra_op_threads
    cores = own_cores(cpus, instances, threads, index)
    if cores is None:
        return None
    # Every thread of the stub (the IPC threads too): sched_setaffinity(0) would move only this one.
    for task in os.listdir("/proc/self/task"):
        with suppress(OSError):  # a thread that ended meanwhile; a CPU set changed under us: stay unpinned
            os.sched_setaffinity(int(task), cores)
    return [own_cores(cpus, instances, threads, (index + step) % instances) or [] for step in range(1, instances)]


def chunk_runner(runners: Runners, share: CpuShare | None) -> Runner:
    """The runner `run_by_length` calls for each chunk: wide while every other instance is idle at that moment."""
    if share is None or runners.wide is None:
        return runners.narrow

    def run(input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        return runners.pick(share.others_idle())(input_ids, attention_mask)

    return run


class CpuShare:
    def __init__(self, folder: Path, instance: str) -> None:
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.folder = folder
        # Two loaded versions of a model have instances of the same name: the pid tells them apart.
        self.name = f"{instance}-{os.getpid()}{SUFFIX}"
        self._own = open(folder / self.name, "a+b")  # noqa: SIM115 - held for the instance's lifetime

    @contextmanager
    def running(self) -> Iterator[None]:
        """Marks this instance busy for the block."""
        fcntl.flock(self._own, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(self._own, fcntl.LOCK_UN)

    def others_idle(self) -> bool:
        """Whether no other instance is running a batch now."""
        for path in self.folder.glob(f"*{SUFFIX}"):
            if path.name == self.name:
                continue
            try:
                with path.open("rb") as other:  # closing releases the probe's lock
                    fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return False
            except FileNotFoundError:  # an instance that went away
                continue
        return True

    def close(self) -> None:
        self._own.close()
        (self.folder / self.name).unlink(missing_ok=True)


class InstanceCpu:
    """How one encoder instance of the server uses the cores: its own (pin_instance), the other instances' while
    they idle (wide runners for a one-chunk batch, `Spread` for more), and the mark that it is running a batch."""

    def __init__(
        self, config: dict, instance: str, parameters: EncoderParameters | EmbedderParameters, runners: list[Runners]
    ) -> None:
        layout = _layout(config, instance)
        spreads = parameters.spread_batches and parameters.device == "cpu" and layout is not None and layout[1] > 1
        wide = any(r.wide is not None for r in runners)
        self.share = CpuShare(server_share_dir(), instance) if wide or spreads else None
        others = pin_instance(config, instance, parameters, runners)
        self.spread = None
        self._idle_since, self._rested = 0.0, True
        if spreads and self.share is not None and layout is not None:
            self.spread = Spread(self.share.others_idle, others if others is not None else [[]] * (layout[1] - 1))

    @contextmanager
    def running(self) -> Iterator[None]:
        """Marks this instance busy for the block (nothing to mark when nothing looks at it), and notes whether it
        had rested RESTED_S before it, for `run`."""
        self._rested = time.monotonic() - self._idle_since >= RESTED_S
        try:
            with self.share.running() if self.share is not None else nullcontext():
                yield
        finally:
            self._idle_since = time.monotonic()

    def run(self, runners: Runners, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        """A batch, within `running()`: its chunks spread over idle cores, or each on one or idle_threads threads."""
        if self.spread is not None and self._rested and len(input_ids) > LENGTH_CHUNK:
            return run_by_length(runners.narrow, input_ids, attention_mask, self.spread.run_tasks)
        return run_by_length(chunk_runner(runners, self.share), input_ids, attention_mask)
