"""Run the real tritonserver as a child process: start, wait until ready, stop cleanly."""

from __future__ import annotations

import re
import secrets
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from ecomserve.errors import RepositoryError, ServerError
from ecomserve.server.environment import TritonInstall, locate_triton
from ecomserve.server.stub_watchdog import StubWatchdog

# Triton's error and warning lines start with E or W and the date (E1123 14:00:00.123 ...).
_PROBLEM_LINE = re.compile(r"^[EW]\d{4} |error|failed|unable", re.IGNORECASE)
# The header Triton checks on model-repository calls (--http-restricted-api / --grpc-restricted-protocol).
ADMIN_HEADER = "ecomserve-admin-key"
# gRPC clients send it as this metadata key (Triton's prefix for restricted-protocol headers).
GRPC_ADMIN_HEADER = f"triton-grpc-protocol-{ADMIN_HEADER}"
# On a machine without a GPU these are expected and say nothing about the failure.
_HARMLESS_LINE = re.compile(r"CUDA|NVML|DCGM|pinned memory|CudaDriverHelper", re.IGNORECASE)


# Logs, the python backend folder and the admin key of `ecomserve serve`, relative to where it runs.
WORK_DIR = Path(".ecomserve")


@dataclass(frozen=True)
class Ports:
    http: int = 8000
    grpc: int = 8001
    metrics: int = 8002

    def named(self) -> dict[str, int]:
        return {"http": self.http, "grpc": self.grpc, "metrics": self.metrics}


@dataclass
class ServerOptions:
    repository: Path
    host: str = "127.0.0.1"
    ports: Ports = field(default_factory=Ports)
    work_dir: Path = WORK_DIR
    cache_bytes: int = 256 * 1024 * 1024
    exit_timeout_s: int = 30
    # Model control (load, unload, index) needs this key in the `ecomserve-admin-key` header; None locks
    # it with a random key only this process holds (its stub watchdog reloads models with it). Inference,
    # health and metadata stay open.
    admin_key: str | None = None
    # Reload a python model whose stub process died (Triton 2.51 does not restart it): server/stub_watchdog.
    recover_stubs: bool = True
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


class TritonServer:
    """One tritonserver process; use as a context manager or call start()/stop()."""

    def __init__(self, options: ServerOptions):
        self.options = options
        self.log_path = options.work_dir / "logs" / f"tritonserver-{options.ports.http}.log"
        self._process: subprocess.Popen | None = None
        self._watchdog: StubWatchdog | None = None
        self.stop_requested = False
        self.admin_key = options.admin_key or secrets.token_urlsafe(24)

    @property
    def http_url(self) -> str:
        return f"{self._client_host}:{self.options.ports.http}"

    @property
    def grpc_url(self) -> str:
        return f"{self._client_host}:{self.options.ports.grpc}"

    @property
    def metrics_url(self) -> str:
        return f"http://{self._client_host}:{self.options.ports.metrics}/metrics"

    def is_running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process else None

    @property
    def _client_host(self) -> str:
        return "127.0.0.1" if self.options.host in ("0.0.0.0", "") else self.options.host

    def command(self, install: TritonInstall) -> list[str]:
        options = self.options
        host, ports = options.host, options.ports
        restricted = f"model-repository:{ADMIN_HEADER}={self.admin_key}"
        return [
            str(install.binary),
            f"--model-repository={options.repository.resolve()}",
            f"--backend-directory={install.backend_dir.resolve()}",
            f"--cache-directory={install.cache_dir}",
            f"--cache-config=local,size={options.cache_bytes}",
            f"--http-address={host}",
            f"--http-port={ports.http}",
            f"--grpc-address={host}",
            f"--grpc-port={ports.grpc}",
            f"--metrics-address={host}",
            f"--metrics-port={ports.metrics}",
            f"--exit-timeout-secs={options.exit_timeout_s}",
            # Explicit control: everything loads at start, and `ecomserve publish` loads new releases.
            "--model-control-mode=explicit",
            "--load-model=*",
            f"--http-restricted-api={restricted}",
            f"--grpc-restricted-protocol={restricted}",
            "--log-verbose=0",
            *options.extra_args,
        ]

    def start(self, timeout_s: float = 300) -> None:
        options = self.options
        if not options.repository.is_dir():
            raise RepositoryError(f"model repository {options.repository} not found: run `ecomserve build` first")
        for name, port in options.ports.named().items():
            if not port_is_free(options.host, port):
                raise ServerError(
                    f"{name} port {port} on {options.host} is in use: stop the server using it "
                    f"or pass --{name}-port with a free port"
                )
        install = locate_triton(options.work_dir)
        command = self.command(install)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("wb") as log:
            # A session of its own: the terminal's Ctrl-C reaches us, and we decide how Triton stops.
            self._process = subprocess.Popen(
                command, stdout=log, stderr=subprocess.STDOUT, env=install.environment(), start_new_session=True
            )
        self._wait_ready(timeout_s)
        if options.recover_stubs:
            self._watchdog = StubWatchdog(self._process.pid, self.http_url, self.admin_key)
            self._watchdog.start()

    def _wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise ServerError(
                    f"tritonserver exited with code {self._process.returncode} before it was ready.\n"
                    f"{self.log_excerpt()}\nFull log: {self.log_path}"
                )
            if self.is_ready():
                return
            time.sleep(0.25)
        self.stop()
        raise ServerError(
            f"tritonserver not ready after {timeout_s:.0f}s.\n{self.log_excerpt()}\nFull log: {self.log_path}"
        )

    def is_ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://{self.http_url}/v2/health/ready", timeout=2) as response:
                return response.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def log_excerpt(self, lines: int = 25) -> str:
        """The lines of Triton's log that explain a failure: errors and warnings first, else the tail."""
        if not self.log_path.is_file():
            return "(no log)"
        text = self.log_path.read_text(errors="replace").splitlines()
        problems = [line for line in text if _PROBLEM_LINE.search(line) and not _HARMLESS_LINE.search(line)]
        return "\n".join((problems or text)[-lines:])

    def request_stop(self) -> None:
        """Ask Triton to drain and exit (SIGTERM); returns at once. Safe inside a signal handler."""
        self.stop_requested = True
        if self._watchdog is not None:
            self._watchdog.request_stop()
        if self._process is not None and self._process.poll() is None:
            self._process.send_signal(signal.SIGTERM)

    def stop(self, timeout_s: float | None = None) -> int | None:
        """SIGTERM lets Triton finish in-flight requests (up to exit_timeout_s); then SIGKILL."""
        if self._watchdog is not None:
            self._watchdog.stop()
        process = self._process
        if process is None or process.poll() is not None:
            return process.returncode if process else None
        self.request_stop()
        try:
            return process.wait(timeout=timeout_s or self.options.exit_timeout_s + 10)
        except subprocess.TimeoutExpired:
            process.kill()
            return process.wait()

    def wait(self) -> int:
        return self._process.wait()

    def __enter__(self) -> TritonServer:
        self.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()
