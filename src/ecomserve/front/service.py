"""The front process: public HTTP (uvicorn), gRPC (grpc.aio) and metrics in one event loop, passing
checked requests to Triton's private unix sockets.

    python -m ecomserve.front --repository model_repository --sockets DIR [--host H] [--http-port P] [--grpc-port P]
                              [--metrics-port P] [--api-port P] [--admin-key-file F] [--api-key-file F]

`ecomserve serve` starts it beside tritonserver, and so does the Kubernetes entrypoint (supervise.py). Its
limits come from the repository's spec (`serving.front`). The admin key is read from
$ECOMSERVE_ADMIN_KEY or --admin-key-file, the optional inference API key from $ECOMSERVE_API_KEY or
--api-key-file, never from the command line."""

from __future__ import annotations

import argparse
import logging
import resource
import socket
import sys
import time
from pathlib import Path

import grpc
import uvicorn

from ecomserve.contract import ADMIN_KEY_ENV, API_KEY_ENV
from ecomserve.front.admission import Admission
from ecomserve.front.api.app import ApiSide
from ecomserve.front.asgi import FrontApp, Side
from ecomserve.front.connections import bounded_protocol
from ecomserve.front.grpc_proxy import GrpcProxy
from ecomserve.front.http_app import HttpFront
from ecomserve.front.metrics_app import MetricsFront
from ecomserve.front.policy import Keys, read_admin_key, read_api_key
from ecomserve.front.upstream import TritonSockets
from ecomserve.spec import FrontSpec, PipelineSpec

log = logging.getLogger("ecomserve.front")


class RepeatFilter(logging.Filter):
    """At most `burst` records with the same message template per `window_s`; the rest are counted and
    reported once the window ends, so a fault that repeats (EMFILE on accept) cannot flood the log."""

    def __init__(self, burst: int = 5, window_s: float = 10.0):
        super().__init__()
        self.burst, self.window_s = burst, window_s
        self._seen: dict[str, tuple[float, int]] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        now, key = time.monotonic(), str(record.msg)
        started, count = self._seen.get(key, (now, 0))
        if now - started > self.window_s:
            if count > self.burst:
                record.msg = f"{record.msg} (and {count - self.burst} more like it in {self.window_s:.0f} s)"
            started, count = now, 0
        self._seen[key] = (started, count + 1)
        if len(self._seen) > 1000:
            self._seen.clear()
        return count < self.burst


def raise_fd_limit() -> int:
    """Raise the soft file-descriptor limit to the hard one: connections are capped below it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def repository_spec(repository: Path) -> PipelineSpec | None:
    """The spec the repository was built from; None for one ecomserve did not build (then the front
    guards Triton's ports with default limits, and there is no HTTP API: it needs the spec's tokenizers)."""
    from ecomserve.repository.builder import built_spec, is_built

    return built_spec(repository) if is_built(repository) else None


def tokenizer_files(repository: Path, spec: PipelineSpec) -> list[Path]:
    """Each encoder's tokenizer.json in the release `embed` serves."""
    from ecomserve.repository.builder import encoder_dirs
    from ecomserve.repository.releases import live_release
    from ecomserve.tokenization import TOKENIZER_FILE

    release = str(live_release(repository))
    return [encoder_dirs(spec.serving.layout, e, repository, release)[0] / TOKENIZER_FILE for e in spec.encoders]


def grpc_options(limits: FrontSpec) -> list[tuple[str, int]]:
    return [
        ("grpc.max_receive_message_length", limits.max_body_bytes),
        ("grpc.max_send_message_length", 64 * 1024 * 1024),
        ("grpc.max_allowed_incoming_connections", limits.max_connections),
        ("grpc.max_concurrent_streams", 128),
        ("grpc.max_connection_idle_ms", int(limits.idle_timeout_s * 1000)),
        ("grpc.server_handshake_timeout_ms", int(limits.idle_timeout_s * 1000)),
        ("grpc.max_metadata_size", 16 * 1024),
    ]


async def serve(args: argparse.Namespace, spec: PipelineSpec | None, keys: Keys) -> None:
    limits = spec.serving.front if spec else FrontSpec()
    sockets = TritonSockets(args.sockets)
    admission = Admission(limits.max_texts_in_flight, limits.max_texts_waiting, limits.max_wait_s)
    upstream = grpc.aio.insecure_channel(
        sockets.grpc_target,
        options=[
            ("grpc.max_receive_message_length", 64 * 1024 * 1024),
            ("grpc.max_send_message_length", -1),
            # Triton restarts behind the same socket: reconnect within a second, not gRPC's default minutes.
            ("grpc.initial_reconnect_backoff_ms", 100),
            ("grpc.max_reconnect_backoff_ms", 1000),
        ],
    )
    grpc_server = grpc.aio.server(
        handlers=[GrpcProxy(upstream, admission, keys, limits.request_timeout_s)], options=grpc_options(limits)
    )
    grpc_server.add_insecure_port(f"{args.host}:{args.grpc_port}")
    http_front = HttpFront(str(sockets.http_path), admission, keys, limits.max_body_bytes, limits.request_timeout_s)
    sides: dict[int, Side] = {args.http_port: http_front}
    api = None
    if spec is not None:
        files = tokenizer_files(args.repository, spec)
        api = ApiSide(spec, files, sockets.grpc_target, admission, keys, http_front)
        sides[args.api_port] = api
    else:
        log.warning("%s was not built by ecomserve: no HTTP API on port %d", args.repository, args.api_port)
    sides[args.metrics_port] = MetricsFront(str(sockets.metrics_path), admission, api.context.counters if api else None)
    http_server = uvicorn.Server(_uvicorn_config(FrontApp(sides), limits))
    await grpc_server.start()
    try:
        # Returns after SIGTERM / SIGINT, once open requests finish.
        await http_server.serve(sockets=[_listen(args.host, port) for port in sides])
    finally:
        await grpc_server.stop(grace=5)
        await upstream.close()


def _uvicorn_config(app, limits: FrontSpec) -> uvicorn.Config:
    return uvicorn.Config(
        app,
        http=bounded_protocol(limits.max_connections, limits.idle_timeout_s),
        timeout_keep_alive=int(limits.idle_timeout_s),
        backlog=2048,
        access_log=False,
        log_level="warning",
        server_header=False,
        # No X-Forwarded-* rewriting: the front is the edge, and it saves a middleware per request.
        proxy_headers=False,
    )


def _listen(host: str, port: int) -> socket.socket:
    listener = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind((host, port))
    return listener


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m ecomserve.front", description=__doc__.split("\n\n")[0])
    parser.add_argument("--repository", type=Path, required=True, help="the model repository (limits from its spec)")
    parser.add_argument("--sockets", type=Path, required=True, help="folder of Triton's unix sockets")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--http-port", type=int, default=8000)
    parser.add_argument("--grpc-port", type=int, default=8001)
    parser.add_argument("--metrics-port", type=int, default=8002)
    parser.add_argument("--api-port", type=int, default=8080, help="the HTTP API (OpenAI, Cohere, TEI schemas)")
    parser.add_argument("--admin-key-file", type=Path, help=f"file holding the admin key (else ${ADMIN_KEY_ENV})")
    parser.add_argument(
        "--api-key-file", type=Path, help=f"file holding the inference API key (else ${API_KEY_ENV}; none: open)"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    handler = logging.StreamHandler()
    handler.addFilter(RepeatFilter())
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s front %(levelname)s %(message)s", handlers=[handler])
    raise_fd_limit()
    keys = Keys(admin=read_admin_key(args.admin_key_file), api=read_api_key(args.api_key_file))
    if keys.admin is None:
        log.warning("no admin key: the model-repository API is closed to every client")
    import uvloop

    uvloop.run(serve(args, repository_spec(args.repository), keys))
    return 0
