"""Run a tritonserver command under ecomserve's stub watchdog: the Triton container's entrypoint in
Kubernetes, where `ecomserve serve` does not run.

    python3 -m ecomserve.server.supervise -- /opt/tritonserver/bin/tritonserver --model-repository=… …

SIGTERM and SIGINT go to tritonserver, which drains in-flight requests; the exit code is tritonserver's.
The watchdog restarts models through model control, so the command must run Triton with
--model-control-mode=explicit and the model-repository API keyed to $ECOMSERVE_ADMIN_KEY."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys

from ecomserve.server.control import ADMIN_KEY_ENV
from ecomserve.server.stub_watchdog import StubWatchdog

USAGE = "usage: python3 -m ecomserve.server.supervise -- TRITONSERVER [ARGS...]"


def flag_value(command: list[str], name: str, default: str) -> str:
    """The value of `--name=value` or `--name value` in a command line, else `default`."""
    for index, arg in enumerate(command):
        if arg.startswith(f"--{name}="):
            return arg.split("=", 1)[1]
        if arg == f"--{name}" and index + 1 < len(command):
            return command[index + 1]
    return default


def check_command(command: list[str], admin_key: str | None) -> str | None:
    """Why the watchdog could not restart models under this command, or None."""
    if not command:
        return USAGE
    if flag_value(command, "model-control-mode", "none") != "explicit":
        return (
            "the stub watchdog restarts models through model control: run tritonserver in explicit mode "
            "(--model-control-mode=explicit)"
        )
    if not admin_key:
        return f"the stub watchdog needs the model-control key: set {ADMIN_KEY_ENV} (the key in --http-restricted-api)"
    return None


def supervise(command: list[str], admin_key: str) -> int:
    server = subprocess.Popen(command)
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda received, _frame: server.send_signal(received))
    port = flag_value(command, "http-port", "8000")
    watchdog = StubWatchdog(server.pid, f"127.0.0.1:{port}", admin_key)
    watchdog.start()
    code = server.wait()
    watchdog.stop()
    # A signal's death reads as 128 + signal, as a shell reports it.
    return code if code >= 0 else 128 - code


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    command = argv[1:] if argv[:1] == ["--"] else argv
    logging.basicConfig(level=logging.WARNING, format="ecomserve supervise: %(message)s")
    problem = check_command(command, os.environ.get(ADMIN_KEY_ENV))
    if problem:
        print(f"ecomserve supervise: {problem}", file=sys.stderr)
        return 2
    return supervise(command, os.environ[ADMIN_KEY_ENV])


if __name__ == "__main__":
    sys.exit(main())
