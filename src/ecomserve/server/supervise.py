"""Run a given tritonserver command the way `ecomserve serve` runs the embedded one: behind the front,
on private unix sockets, with restarts. The Triton container's entrypoint in Kubernetes:

    python3 -m ecomserve.server.supervise --repository /models --host 0.0.0.0 -- \\
        /opt/tritonserver/bin/tritonserver --model-repository=/models --model-control-mode=explicit …

The command must not set HTTP, gRPC or metrics addresses (the supervisor puts Triton on unix sockets
and the front on --http-port/--grpc-port/--metrics-port) nor restricted-API keys (the front checks
the admin key, read from $ECOMSERVE_ADMIN_KEY). SIGTERM and SIGINT drain in-flight requests; the
exit code is tritonserver's."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from pathlib import Path

from ecomserve.contract import ADMIN_KEY_ENV, API_KEY_ENV
from ecomserve.errors import EcomserveError
from ecomserve.front.policy import read_admin_key, read_api_key
from ecomserve.server.process import Ports, ServerOptions, TritonServer

USAGE = "usage: python3 -m ecomserve.server.supervise [--repository DIR] [options] -- TRITONSERVER [ARGS...]"
# Set by the supervisor; a command that sets them would expose Triton or put a key on its command line.
_OWNED_FLAGS = ("--http-address", "--http-port", "--grpc-address", "--grpc-port", "--metrics-address",
                "--metrics-port", "--http-restricted-api", "--grpc-restricted-protocol", "--allow-sagemaker",
                "--allow-vertex-ai")  # fmt: skip


def flag_value(command: list[str], name: str, default: str) -> str:
    """The value of `--name=value` or `--name value` in a command line, else `default`."""
    for index, arg in enumerate(command):
        if arg.startswith(f"--{name}="):
            return arg.split("=", 1)[1]
        if arg == f"--{name}" and index + 1 < len(command):
            return command[index + 1]
    return default


def check_command(command: list[str], stub_watchdog: bool = True) -> str | None:
    """Why the supervisor could not run this command safely, or None."""
    if not command:
        return USAGE
    if stub_watchdog and flag_value(command, "model-control-mode", "none") != "explicit":
        return (
            "the stub watchdog restarts models through model control: run tritonserver in explicit mode "
            "(--model-control-mode=explicit), or pass --no-stub-watchdog"
        )
    owned = [arg.split("=", 1)[0] for arg in command if arg.split("=", 1)[0] in _OWNED_FLAGS]
    if owned:
        return f"{owned[0]} is set by the supervisor (Triton listens on private sockets behind the front): remove it"
    return None


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    split = argv.index("--") if "--" in argv else len(argv)
    parser = argparse.ArgumentParser(prog="python3 -m ecomserve.server.supervise", usage=USAGE)
    parser.add_argument(
        "--repository", type=Path, default=Path("/models"), help="the repository folder; the front reads its limits"
    )
    parser.add_argument("--host", default="0.0.0.0")
    parser.add_argument("--http-port", type=int, default=8000)
    parser.add_argument("--grpc-port", type=int, default=8001)
    parser.add_argument("--metrics-port", type=int, default=8002, help="the front's metrics port")
    parser.add_argument("--api-port", type=int, default=8080, help="the HTTP API (OpenAI, Cohere, TEI schemas)")
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/ecomserve"))
    parser.add_argument(
        "--admin-key-file", type=Path, help=f"file holding the admin key (a mounted Secret); else ${ADMIN_KEY_ENV}"
    )
    parser.add_argument(
        "--api-key-file",
        type=Path,
        help=f"file holding the inference API key (a mounted Secret); else ${API_KEY_ENV}; none: no key needed",
    )
    parser.add_argument(
        "--log-files",
        action="store_true",
        help="write tritonserver's and the front's output to files under --work-dir, not to stdout",
    )
    parser.add_argument(
        "--no-stub-watchdog",
        dest="stub_watchdog",
        action="store_false",
        help="do not restart models whose stub died (then model control need not be explicit)",
    )
    return parser.parse_args(argv[:split]), argv[split + 1 :]


def main(argv: list[str] | None = None) -> int:
    args, command = parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.WARNING, format="ecomserve supervise: %(message)s")
    problem = check_command(command, args.stub_watchdog)
    if problem:
        print(f"ecomserve supervise: {problem}", file=sys.stderr)
        return 2
    server = TritonServer(
        ServerOptions(
            repository=args.repository,
            host=args.host,
            ports=Ports(args.http_port, args.grpc_port, args.metrics_port, args.api_port),
            work_dir=args.work_dir,
            admin_key=read_admin_key(args.admin_key_file),
            api_key=read_api_key(args.api_key_file),
            recover_stubs=args.stub_watchdog,
            log_to_files=args.log_files,
            triton_command=command,
        )
    )
    try:
        server.start()
    except EcomserveError as exc:
        print(f"ecomserve supervise: {exc}", file=sys.stderr)
        return 1
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: server.request_stop())
    code = server.wait()
    if not server.stop_requested:
        print(f"ecomserve supervise: {server.failure}", file=sys.stderr)
        return 1
    # A signal's death reads as 128 + signal, as a shell reports it.
    return 0 if code is None else code if code >= 0 else 128 - code


if __name__ == "__main__":
    sys.exit(main())
