"""Run the real tritonserver behind ecomserve's front process, and keep both alive.

Triton listens only on unix sockets in a private folder (front/upstream.py); the front owns the
public HTTP and gRPC ports and passes on checked requests. Both children get SIGTERM if this process
dies (PR_SET_PDEATHSIG), so a killed `ecomserve serve` leaves nothing behind. A supervisor thread
restarts a dead tritonserver (killing the stubs it orphaned and releasing their shared memory) or a
dead front, within a restart budget, and restarts python models whose stub died (stub_watchdog)."""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from ecomserve.contract import ADMIN_KEY_ENV, API_KEY_ENV
from ecomserve.errors import RepositoryError, ServerError
from ecomserve.files import write_private_text
from ecomserve.front.upstream import TritonSockets
from ecomserve.server.environment import TritonInstall, locate_triton
from ecomserve.server.stub_watchdog import StubWatchdog
from ecomserve.spec import ServingSpec

log = logging.getLogger(__name__)

# Triton's error and warning lines start with E or W and the date (E1123 14:00:00.123 ...).
_PROBLEM_LINE = re.compile(r"^[EW]\d{4} |error|failed|unable", re.IGNORECASE)
# On a machine without a GPU these are expected and say nothing about the failure.
_HARMLESS_LINE = re.compile(r"CUDA|NVML|DCGM|pinned memory|CudaDriverHelper", re.IGNORECASE)
# A failure is explained by the end of a log; reading more would let a flooded log exhaust memory.
_LOG_TAIL_BYTES = 256 * 1024
SHM_FOLDER = Path("/dev/shm")
_PR_SET_PDEATHSIG = 1
# tritonserver, its stubs and the front run SCHED_BATCH unless the spec says `serving.scheduling: normal`
# (inherited by every thread and child; no privilege needed): a thread that wakes (a gRPC completion, an IPC
# message) waits for the next tick or a free core instead of preempting a model run halfway, whose caches the
# switch would cool (measured: README, "Where one query's time goes").
SCHEDULING_POLICIES = {"batch": os.SCHED_BATCH, "normal": os.SCHED_OTHER}

# Logs, the python backend folder and the admin key of `ecomserve serve`, relative to where it runs.
WORK_DIR = Path(".ecomserve")


@dataclass(frozen=True)
class Ports:
    http: int = 8000
    grpc: int = 8001
    metrics: int = 8002
    api: int = 8080

    def named(self) -> dict[str, int]:
        return {"http": self.http, "grpc": self.grpc, "metrics": self.metrics, "api": self.api}


@dataclass(frozen=True)
class RestartBudget:
    """At most `restarts` restarts of a process within `window_s`; past that the server gives up."""

    restarts: int = 5
    window_s: float = 600.0


@dataclass
class ServerOptions:
    repository: Path
    host: str = "127.0.0.1"
    ports: Ports = field(default_factory=Ports)
    work_dir: Path = WORK_DIR
    exit_timeout_s: int = 30
    # Model control (load, unload, index) needs this key in the `ecomserve-admin-key` header at the front;
    # None locks it with a random key only this process holds (its stub watchdog reloads models with it).
    admin_key: str | None = None
    # The optional inference API key: with it, every call but health needs `Authorization: Bearer <key>`.
    api_key: str | None = None
    # Reload a python model whose stub process died (Triton 2.51 does not restart it): server/stub_watchdog.
    recover_stubs: bool = True
    restart_budget: RestartBudget = field(default_factory=RestartBudget)
    # A tritonserver command to run instead of the embedded one (the NGC image in Kubernetes); the
    # socket and shared-memory arguments are appended to it.
    triton_command: list[str] | None = None
    # False: the children write to this process's stdout (Kubernetes collects it) instead of log files.
    log_to_files: bool = True
    extra_args: list[str] = field(default_factory=list)


def port_is_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        # Like the server itself, ignore TIME_WAIT leftovers of closed connections: only a listener counts.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError:
            return False
    return True


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


def _child_setup(parent_pid: int, policy: int):
    """Run in each child before exec: SIGTERM when this process dies, and the scheduling `policy`
    (see SCHEDULING_POLICIES)."""
    libc = ctypes.CDLL(None, use_errno=True)

    def preexec() -> None:
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != parent_pid:  # the parent died before prctl took effect
            os._exit(1)
        with contextlib.suppress(OSError):  # a sandbox that forbids it (seccomp) costs the gain, not the start
            os.sched_setscheduler(0, policy, os.sched_param(0))

    return preexec


def _spawn(command: list[str], log_path: Path | None, env: dict[str, str], policy: int) -> subprocess.Popen:
    """Start a child in a session of its own: the terminal's Ctrl-C reaches us, and we decide how children
    stop; the session's process group also holds every stub, so a dead tritonserver's orphans can be
    found. Output goes to `log_path`, or to our own stdout (a container's log) when it is None."""
    with log_path.open("ab") if log_path else contextlib.nullcontext() as log_file:
        return subprocess.Popen(
            command,
            stdout=log_file,  # None: inherited
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            start_new_session=True,
            preexec_fn=_child_setup(os.getpid(), policy),
        )


def release_shared_memory(prefix: str) -> list[str]:
    """Remove the python backend's /dev/shm regions whose names start with `prefix`."""
    removed = []
    for region in SHM_FOLDER.glob(f"{prefix}*"):
        region.unlink(missing_ok=True)
        removed.append(region.name)
    return removed


def release_stale_leftovers() -> list[str]:
    """Shared-memory regions and socket folders of earlier servers whose owner died without cleaning up
    (kill -9, power loss): both names carry the owner's pid second."""
    removed = []
    for path in [*SHM_FOLDER.glob("ecomserve_*_*"), *Path(tempfile.gettempdir()).glob("ecomserve-*-*")]:
        owner = re.split(r"[-_]", path.name)[1]
        if owner.isdigit() and not psutil.pid_exists(int(owner)):
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
            removed.append(path.name)
    return removed


def kill_group(process: subprocess.Popen) -> None:
    """SIGKILL whatever is left of a child's process group (stubs a dead tritonserver left behind)."""
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def read_tail(path: Path, limit: int = _LOG_TAIL_BYTES) -> str:
    with path.open("rb") as handle:
        handle.seek(max(0, path.stat().st_size - limit))
        return handle.read().decode(errors="replace")


def _built_serving(repository: Path) -> ServingSpec | None:
    """The serving section of the spec `repository` was built from; None for a remote repository."""
    from ecomserve.repository.builder import built_spec, is_built

    if not repository.is_dir() or not is_built(repository):
        return None
    return built_spec(repository).serving


def response_cache_args(repository: Path) -> list[str]:
    """Triton's local response cache, as big as the spec the repository was built from says
    (serving.response_cache_mb: the most memory cached answers take in one server, i.e. per pod)."""
    serving = _built_serving(repository)
    if serving is None:  # a remote repository: the command sizes the cache
        return []
    return [f"--cache-config=local,size={serving.response_cache_mb << 20}"] if serving.response_cache else []


def scheduling_policy(repository: Path) -> int:
    """The Linux scheduling policy of every server process, from `serving.scheduling` of the spec the repository
    was built from (a remote repository: the default's)."""
    serving = _built_serving(repository)
    return SCHEDULING_POLICIES[serving.scheduling if serving else ServingSpec().scheduling]


def embedded_command(options: ServerOptions, install: TritonInstall) -> list[str]:
    """The embedded tritonserver on `options.repository`, before the socket arguments."""
    return [
        str(install.binary),
        f"--model-repository={options.repository.resolve()}",
        f"--backend-directory={install.backend_dir.resolve()}",
        f"--cache-directory={install.cache_dir}",
        f"--exit-timeout-secs={options.exit_timeout_s}",
        # Explicit control: everything loads at start, and `ecomserve publish` loads new releases.
        "--model-control-mode=explicit",
        "--load-model=*",
        "--log-verbose=0",
    ]


class TritonServer:
    """tritonserver and the front; use as a context manager or call start()/stop()."""

    def __init__(self, options: ServerOptions):
        self.options = options
        logs = options.work_dir / "logs"
        self.log_path = logs / f"tritonserver-{options.ports.http}.log"
        self.front_log_path = logs / f"front-{options.ports.http}.log"
        self.admin_key = options.admin_key or secrets.token_urlsafe(24)
        self.stop_requested = False
        self.restarts: list[str] = []
        self.failure: str | None = None
        self._triton: subprocess.Popen | None = None
        self._front: subprocess.Popen | None = None
        self._watchdog: StubWatchdog | None = None
        self._sockets: TritonSockets | None = None
        self._install: TritonInstall | None = None
        self._generation = 0
        self._supervisor: threading.Thread | None = None
        self._stopping = threading.Event()
        self._restart_times: deque[float] = deque()

    @property
    def _policy(self) -> int:
        # Read when a process starts, as the response cache's size is: a restart follows the live spec.
        return scheduling_policy(self.options.repository)

    @property
    def http_url(self) -> str:
        return f"{self._client_host}:{self.options.ports.http}"

    @property
    def grpc_url(self) -> str:
        return f"{self._client_host}:{self.options.ports.grpc}"

    @property
    def metrics_url(self) -> str:
        return f"http://{self._client_host}:{self.options.ports.metrics}/metrics"

    @property
    def api_url(self) -> str:
        return f"http://{self._client_host}:{self.options.ports.api}"

    def is_running(self) -> bool:
        return self._triton is not None and self._triton.poll() is None

    @property
    def pid(self) -> int | None:
        """tritonserver's pid (the parent of the python stubs)."""
        return self._triton.pid if self._triton else None

    @property
    def front_pid(self) -> int | None:
        return self._front.pid if self._front else None

    @property
    def sockets(self) -> TritonSockets | None:
        return self._sockets

    @property
    def shm_prefix(self) -> str:
        # The owner's pid first: release_stale_leftovers() finds regions whose owner is gone.
        return f"ecomserve_{os.getpid()}_{id(self) % 100000}_{self._generation}_"

    @property
    def _client_host(self) -> str:
        return "127.0.0.1" if self.options.host in ("0.0.0.0", "") else self.options.host

    def command(self, install: TritonInstall | None, sockets: TritonSockets) -> list[str]:
        """tritonserver's command line; it holds no secret (no admin key: Triton's ports are private)."""
        options = self.options
        base = options.triton_command if options.triton_command is not None else embedded_command(options, install)
        # A command that sizes the cache itself (the chart's triton.responseCacheBytes) keeps its own.
        cache = [] if any(arg.startswith("--cache-config") for arg in base) else response_cache_args(options.repository)
        return [
            *base,
            *cache,
            *sockets.triton_args(),
            f"--backend-config=python,shm-region-prefix-name={self.shm_prefix}",
            *options.extra_args,
        ]

    def front_command(self, sockets: TritonSockets) -> list[str]:
        options = self.options
        return [
            sys.executable,
            "-m",
            "ecomserve.front",
            f"--repository={options.repository.resolve()}",
            f"--sockets={sockets.folder}",
            f"--host={options.host}",
            f"--http-port={options.ports.http}",
            f"--grpc-port={options.ports.grpc}",
            f"--metrics-port={options.ports.metrics}",
            f"--api-port={options.ports.api}",
        ]

    def start(self, timeout_s: float = 300) -> None:
        options = self.options
        # A given command may name a remote repository (s3://, gs://); the embedded server needs a folder.
        if options.triton_command is None and not options.repository.is_dir():
            raise RepositoryError(f"model repository {options.repository} not found: run `ecomserve build` first")
        for name, port in options.ports.named().items():
            if not port_is_free(options.host, port):
                raise ServerError(
                    f"{name} port {port} on {options.host} is in use: stop the server using it "
                    f"or pass --{name}-port with a free port"
                )
        release_stale_leftovers()
        if options.triton_command is None:
            self._install = locate_triton(options.work_dir)
        # Short (socket paths hold 107 bytes) and private to this user (mkdtemp makes it 0700).
        self._sockets = TritonSockets(Path(tempfile.mkdtemp(prefix=f"ecomserve-{os.getpid()}-")))
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        # Each start begins fresh logs; restarts append, so a crash's last lines stay beside the restart.
        for log_path in (self.log_path, self.front_log_path):
            if options.log_to_files:
                log_path.write_bytes(b"")
        self._start_front()
        try:
            self._start_triton(timeout_s)
        except BaseException:
            self._terminate_all()
            raise
        self._supervisor = threading.Thread(target=self._supervise, name="ecomserve-supervisor", daemon=True)
        self._supervisor.start()

    def _log(self, path: Path) -> Path | None:
        return path if self.options.log_to_files else None

    def _environment(self) -> dict[str, str]:
        return self._install.environment() if self._install else dict(os.environ)

    def _start_front(self) -> None:
        # Keys travel in 0600 files in the private socket folder: never on a command line, nor in an
        # environment the front would hand on.
        command = [*self.front_command(self._sockets)]
        for name, key in (("admin", self.admin_key), ("api", self.options.api_key)):
            if key is None:
                continue
            key_file = self._sockets.folder / f"{name}.key"
            if not key_file.exists():
                write_private_text(key_file, key)
            command.append(f"--{name}-key-file={key_file}")
        env = {name: value for name, value in os.environ.items() if name not in (ADMIN_KEY_ENV, API_KEY_ENV)}
        self._front = _spawn(command, self._log(self.front_log_path), env, self._policy)

    def _start_triton(self, timeout_s: float) -> None:
        self._generation += 1
        command = self.command(self._install, self._sockets)
        self._triton = _spawn(command, self._log(self.log_path), self._environment(), self._policy)
        self._wait_ready(timeout_s)
        if self.options.recover_stubs:
            self._watchdog = StubWatchdog(self._triton.pid, self.http_url, self.admin_key)
            self._watchdog.start()

    def _wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            children = (("tritonserver", self._triton, self.log_path), ("the front", self._front, self.front_log_path))
            for name, process, log_path in children:
                if process.poll() is not None:
                    raise ServerError(
                        f"{name} exited with code {process.returncode} before it was ready.\n"
                        f"{self.log_excerpt(log_path)}\nFull log: {log_path}"
                    )
            if self.is_ready():
                return
            if self.stop_requested:
                raise ServerError("stopped before tritonserver was ready")
            time.sleep(0.25)
        raise ServerError(
            f"tritonserver not ready after {timeout_s:.0f}s.\n{self.log_excerpt()}\nFull log: {self.log_path}"
        )

    def is_ready(self) -> bool:
        """Ready as a client sees it: through the front, which asks Triton."""
        try:
            with urllib.request.urlopen(f"http://{self.http_url}/v2/health/ready", timeout=2) as response:
                return response.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def log_excerpt(self, log_path: Path | None = None, lines: int = 25) -> str:
        """The lines of a log that explain a failure: errors and warnings first, else the tail."""
        log_path = log_path or self.log_path
        if not log_path.is_file():
            return "(no log file: see the output above)" if not self.options.log_to_files else "(no log)"
        text = read_tail(log_path).splitlines()
        problems = [line for line in text if _PROBLEM_LINE.search(line) and not _HARMLESS_LINE.search(line)]
        return "\n".join((problems or text)[-lines:])

    # Supervision -------------------------------------------------------------------------------------

    def _supervise(self) -> None:
        # Only PID 1 adopts orphans; elsewhere other children of this process belong to their own Popen.
        adopts_orphans = os.getpid() == 1
        while not self._stopping.wait(0.5):
            if adopts_orphans:
                self._reap_adopted()
            if self._front.poll() is not None and not self._restart("the front", self._front):
                return
            if self._triton.poll() is not None and not self._restart("tritonserver", self._triton):
                return

    def _reap_adopted(self) -> None:
        """As PID 1 of a container (supervise), stubs orphaned by a dead tritonserver become our children:
        reap their zombies, leaving our own children to subprocess."""
        own = {self.front_pid, self.pid}
        for child in psutil.Process().children():
            try:
                if child.pid not in own and child.status() == psutil.STATUS_ZOMBIE:
                    os.waitpid(child.pid, os.WNOHANG)
            except (psutil.NoSuchProcess, ChildProcessError):
                continue

    def _restart(self, name: str, process: subprocess.Popen) -> bool:
        """Restart a dead child within the budget; False when the budget is spent (the server stops)."""
        code = process.returncode
        if name == "tritonserver":
            self._clean_up_triton()
        now, budget = time.monotonic(), self.options.restart_budget
        while self._restart_times and now - self._restart_times[0] > budget.window_s:
            self._restart_times.popleft()
        if len(self._restart_times) >= budget.restarts:
            self.failure = (
                f"{name} exited (code {code}) after {budget.restarts} restarts in {budget.window_s:.0f} s; giving up"
            )
            log.error(self.failure)
            self._terminate_all()
            self._stopping.set()
            return False
        self._restart_times.append(now)
        log.warning("%s exited unexpectedly (code %s); restarting it", name, code)
        started = time.monotonic()
        try:
            if name == "tritonserver":
                self._start_triton(timeout_s=300)
            else:
                self._start_front()
                self._wait_ready(timeout_s=60)
        except ServerError as exc:
            log.error("restarting %s failed: %s", name, exc)
            return True  # the next poll sees it dead again and spends another restart
        self.restarts.append(name)
        log.warning("%s restarted in %.1f s; the server answers again", name, time.monotonic() - started)
        return True

    def _clean_up_triton(self) -> None:
        """After tritonserver exits: no watchdog on a dead pid, no orphaned stubs, no leaked shared memory."""
        if self._watchdog is not None:
            self._watchdog.stop()
            self._watchdog = None
        if self._triton is not None:
            kill_group(self._triton)
        release_shared_memory(self.shm_prefix)
        # A killed tritonserver leaves its socket files, and a new one could not bind them.
        for path in (self._sockets.http_path, self._sockets.grpc_path, self._sockets.metrics_path):
            path.unlink(missing_ok=True)

    def _terminate_all(self) -> None:
        for process in (self._front, self._triton):
            if process is not None and process.poll() is None:
                process.kill()
                process.wait()
        if self._triton is not None:
            self._clean_up_triton()
        if self._sockets is not None:
            shutil.rmtree(self._sockets.folder, ignore_errors=True)

    # Stopping ----------------------------------------------------------------------------------------

    def request_stop(self) -> None:
        """Ask the front, then Triton, to drain and exit (SIGTERM); returns at once. Safe in a signal handler."""
        self.stop_requested = True
        self._stopping.set()
        if self._watchdog is not None:
            self._watchdog.request_stop()
        for process in (self._front, self._triton):
            if process is not None and process.poll() is None:
                process.send_signal(signal.SIGTERM)

    def stop(self, timeout_s: float | None = None) -> int | None:
        """SIGTERM lets Triton finish in-flight requests (up to exit_timeout_s); then SIGKILL. Returns
        tritonserver's exit code."""
        self.request_stop()
        if self._supervisor is not None and self._supervisor is not threading.current_thread():
            self._supervisor.join()
        timeout_s = timeout_s or self.options.exit_timeout_s + 10
        code = None
        for process in (self._front, self._triton):
            if process is None:
                continue
            try:
                code = process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                process.kill()
                code = process.wait()
        self._terminate_all()
        return code

    def wait(self) -> int | None:
        """Block until the server stops (asked to, or out of restarts); tritonserver's exit code."""
        while not self._stopping.wait(0.5):
            pass
        if self._supervisor is not None:
            self._supervisor.join()
        return self.stop()

    def __enter__(self) -> TritonServer:
        self.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()
