"""Where Triton listens when the front owns the public ports: unix sockets in a private folder, for
HTTP, gRPC and metrics alike (a public Triton port of any kind could be flooded with connections).

Only the front (and the same user's tools) reach Triton there: the folder is 0700, so no other local
user can connect, which also keeps Triton's own APIs (shared memory, model control) out of their
reach. Triton 2.51 takes `unix:PATH` as its HTTP and gRPC addresses and appends the port to the gRPC
one, so the gRPC socket's file name ends in ':<port>'."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

# Any number works: it only becomes part of the gRPC socket's file name.
_GRPC_PORT = 8001
# sockaddr_un holds 108 bytes.
MAX_SOCKET_PATH = 107


@dataclass(frozen=True)
class TritonSockets:
    folder: Path

    @property
    def http_path(self) -> Path:
        return self.folder / "http.sock"

    @property
    def grpc_path(self) -> Path:
        return self.folder / f"grpc.sock:{_GRPC_PORT}"

    @property
    def metrics_path(self) -> Path:
        return self.folder / "metrics.sock"

    @property
    def grpc_target(self) -> str:
        return f"unix:{self.grpc_path}"

    def triton_args(self) -> list[str]:
        paths = (self.http_path, self.grpc_path, self.metrics_path)
        too_long = [str(path) for path in paths if len(str(path)) > MAX_SOCKET_PATH]
        if too_long:
            raise ValueError(f"socket path {too_long[0]} is longer than {MAX_SOCKET_PATH} bytes: use a shorter folder")
        return [
            f"--http-address=unix:{self.http_path}",
            f"--grpc-address=unix:{self.folder / 'grpc.sock'}",
            f"--grpc-port={_GRPC_PORT}",
            f"--metrics-address=unix:{self.metrics_path}",
        ]
