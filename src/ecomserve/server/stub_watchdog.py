"""Bring a python model back when its stub process dies.

Triton's python backend runs every model instance in a stub process, and 2.51 does not restart a
stub that dies (killed, OOM-killed, a crash in a native library): the model stays READY and each
request to it fails with "Stub process '<instance>' is not healthy" until the model is loaded again.
tritonserver reaps a stub only when it unloads that instance, so a dead stub stays behind as a
zombie child. The watchdog looks for those and reloads their model through model control; Triton
starts fresh instances and swaps them in once they are ready, as it does for any reload."""

from __future__ import annotations

import logging
import threading
import time
from collections import defaultdict
from pathlib import PurePath

import psutil

from ecomserve.errors import ServerError

log = logging.getLogger(__name__)

STUB_BINARY = "triton_python_backend_stub"
# The process name the kernel keeps (15 characters); a zombie has nothing else left to tell.
STUB_COMM = STUB_BINARY[:15]


def stub_model(cmdline: list[str]) -> str | None:
    """The model a stub serves; its command line is `<stub> <repository>/<model>/<version>/model.py …`."""
    if len(cmdline) < 2 or PurePath(cmdline[0]).name != STUB_BINARY:
        return None
    return PurePath(cmdline[1]).parent.parent.name


class DeadStubs:
    """Which models have a dead stub, read from tritonserver's child processes.

    A zombie counts once it is seen on two polls in a row: a stub that exits in a normal unload is a
    zombie only until Triton's waitpid, a moment later. A zombie's command line is gone, so the model
    of every stub is noted while it lives (the first poll runs at once)."""

    def __init__(self, server_pid: int):
        self._server = psutil.Process(server_pid)
        self._models: dict[int, str] = {}
        self._zombies: set[int] = set()
        self._recovered: set[int] = set()
        self._unknown: set[int] = set()
        self.poll()

    def _read(self) -> tuple[dict[int, str], set[int]]:
        """tritonserver's stubs now: pid -> model (a zombie's as noted while it lived), and the zombies."""
        models: dict[int, str] = {}
        zombies: set[int] = set()
        for child in self._server.children():
            try:
                if child.status() == psutil.STATUS_ZOMBIE:
                    if child.pid in self._models or child.name() == STUB_COMM:
                        zombies.add(child.pid)
                    model = self._models.get(child.pid)
                else:
                    model = self._models.get(child.pid) or stub_model(child.cmdline())
            except psutil.NoSuchProcess:
                continue
            if model:
                models[child.pid] = model
        return models, zombies

    def poll(self) -> dict[str, set[int]]:
        """Models with a stub that died and has not been recovered: model -> stub pids."""
        models, zombies = self._read()
        dead: dict[str, set[int]] = defaultdict(set)
        for pid in (zombies & self._zombies) - self._recovered:
            if pid in models:
                dead[models[pid]].add(pid)
            else:
                # Died before any poll saw it alive: it can only be one of the python models.
                if pid not in self._unknown:
                    log.warning("python stub %d died before its model was known: restarting every python model", pid)
                    self._unknown.add(pid)
                for model in set(models.values()):
                    dead[model].add(pid)
        self._models, self._zombies = models, zombies
        # Until Triton reaps it, a recovered stub (dead, or an old instance ended after a restart) stays known.
        self._recovered &= zombies | models.keys()
        self._unknown &= zombies
        return dict(dead)

    def note_living(self) -> None:
        """Note the model of every living stub now, between polls, so a restart's new stubs are known before one
        of them can die unseen (whose zombie would restart every python model)."""
        models, zombies = self._read()
        self._models.update({pid: model for pid, model in models.items() if pid not in zombies})

    def living(self, model: str) -> set[int]:
        """The stubs of `model` alive at the last poll."""
        return {pid for pid, name in self._models.items() if name == model and pid not in self._zombies}

    def recovered(self, pids: set[int]) -> None:
        """The model of these stubs was reloaded: their zombies wait only for Triton to unload the old instances."""
        self._recovered |= pids


class StubWatchdog(threading.Thread):
    """Polls tritonserver's children and restarts each model whose stub died, through model control
    (explicit mode and the admin key). Restarts run in threads of their own, so the polls that note new
    stubs go on while a model loads; a failed restart is retried after `retry_s`."""

    def __init__(
        self,
        server_pid: int,
        url: str,
        admin_key: str,
        interval_s: float = 0.5,
        retry_s: float = 5.0,
        sibling_grace_s: float = 10.0,
    ):
        super().__init__(name="ecomserve-stub-watchdog", daemon=True)
        self.url, self.admin_key = url, admin_key
        self.interval_s, self.retry_s, self.sibling_grace_s = interval_s, retry_s, sibling_grace_s
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._restarting: set[str] = set()
        self._retry_at: dict[str, float] = {}
        # Note the living stubs now, before a caller could kill one.
        self._stubs = DeadStubs(server_pid)

    def run(self) -> None:
        while not self._stopping.wait(self.interval_s):
            with self._lock:
                try:
                    dead = self._stubs.poll()
                except psutil.NoSuchProcess:
                    return
                due = {
                    model: pids
                    for model, pids in dead.items()
                    if model not in self._restarting and time.monotonic() >= self._retry_at.get(model, 0.0)
                }
                self._restarting |= due.keys()
            for model, pids in due.items():
                threading.Thread(target=self._restart, args=(model, pids), name=f"restart-{model}", daemon=True).start()

    def _restart(self, model: str, pids: set[int]) -> None:
        from ecomserve.server.control import ModelControl

        log.warning("python stub of model '%s' died (pid %s); restarting the model", model, ", ".join(map(str, pids)))
        started = time.monotonic()
        with self._lock:
            siblings = self._stubs.living(model)
        # tritonclient's HTTP client is gevent-based: one per thread.
        control = ModelControl(self.url, self.admin_key)
        try:
            control.restart(model)
        except ServerError as exc:
            log.error("%s; retrying in %.0f s", exc, self.retry_s)
            with self._lock:
                self._retry_at[model] = time.monotonic() + self.retry_s
                self._restarting.discard(model)
            return
        finally:
            control.close()
        with self._lock:
            self._stubs.note_living()
            self._stubs.recovered(pids | siblings)
            self._retry_at.pop(model, None)
            self._restarting.discard(model)
        log.warning("model '%s' restarted in %.1f s; it answers again", model, time.monotonic() - started)
        if not self._stopping.wait(self.sibling_grace_s):
            self._end_siblings(model, siblings)

    def _end_siblings(self, model: str, siblings: set[int]) -> None:
        """The old instances' surviving stubs: Triton unloads them after a restart, but an instance whose
        sibling died can stay behind (a live ~175 MB stub per restart was seen); end what is left."""
        for pid in siblings:
            try:
                stub = psutil.Process(pid)
                if stub.status() != psutil.STATUS_ZOMBIE and stub_model(stub.cmdline()) == model:
                    stub.kill()
                    log.warning("old stub %d of model '%s' outlived the restart; ended it", pid, model)
            except psutil.NoSuchProcess:
                continue

    def request_stop(self) -> None:
        """Stop polling; returns at once (safe inside a signal handler)."""
        self._stopping.set()

    def stop(self, timeout_s: float = 10.0) -> None:
        self.request_stop()
        if self.is_alive():
            self.join(timeout_s)
