"""Which of Triton's APIs a client reaches through the front, on both protocols, and with which key.

Health: liveness and readiness, open to every client (probes carry no key). Open: metadata, config,
statistics and inference, with the inference API key when the server has one. Admin: the model-repository API, with the
admin key (`ecomserve publish`, `rollback`, `models` and the stub watchdog use it). Closed to
everyone: system and CUDA shared memory (a client could register any file in /dev/shm and read or
overwrite it through inference), trace and log settings, and streaming inference (it would bypass
admission; ecomserve's models answer one response per request)."""

from __future__ import annotations

import hmac
import os
import re
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

from ecomserve.contract import ADMIN_KEY_ENV, API_KEY_ENV


class Access(Enum):
    HEALTH = "health"
    OPEN = "open"
    INFER = "infer"
    ADMIN = "admin"
    CLOSED = "closed"
    UNKNOWN = "unknown"


_MODEL = r"/v2/models/(?P<model>[A-Za-z0-9_.-]{1,128})(?:/versions/[0-9]{1,18})?"
_HTTP_ROUTES: list[tuple[str, re.Pattern[str], Access]] = [
    ("GET", re.compile(r"/v2/health/(?:live|ready)"), Access.HEALTH),
    ("GET", re.compile(r"/v2"), Access.OPEN),
    ("GET", re.compile(r"/v2/models/stats"), Access.OPEN),
    ("GET", re.compile(_MODEL + r"(?:/ready|/config|/stats)?"), Access.OPEN),
    ("POST", re.compile(_MODEL + r"/infer"), Access.INFER),
    ("POST", re.compile(r"/v2/repository/index"), Access.ADMIN),
    ("POST", re.compile(r"/v2/repository/models/[A-Za-z0-9_.-]{1,128}/(?:load|unload)"), Access.ADMIN),
]
_CLOSED_HTTP = re.compile(
    r"/v2/(?:systemsharedmemory|cudasharedmemory|trace|logging)(?:/.*)?|" + _MODEL + r"/(?:trace|generate).*"
)

_SERVICE = "/inference.GRPCInferenceService/"
GRPC_ACCESS = {
    **{_SERVICE + name: Access.HEALTH for name in ("ServerLive", "ServerReady")},
    **{_SERVICE + name: Access.OPEN for name in (
        "ModelReady", "ServerMetadata", "ModelMetadata", "ModelConfig", "ModelStatistics",
    )},
    _SERVICE + "ModelInfer": Access.INFER,
    **{_SERVICE + name: Access.ADMIN for name in ("RepositoryIndex", "RepositoryModelLoad", "RepositoryModelUnload")},
    **{_SERVICE + name: Access.CLOSED for name in (
        "ModelStreamInfer", "SystemSharedMemoryStatus", "SystemSharedMemoryRegister", "SystemSharedMemoryUnregister",
        "CudaSharedMemoryStatus", "CudaSharedMemoryRegister", "CudaSharedMemoryUnregister", "TraceSetting",
        "LogSettings",
    )},
    "/grpc.health.v1.Health/Check": Access.HEALTH,
}  # fmt: skip


def http_access(method: str, path: str) -> tuple[Access, str | None]:
    """The access class of an HTTP call, and the model it names (inference only)."""
    method = "GET" if method == "HEAD" else method
    for wanted, pattern, access in _HTTP_ROUTES:
        match = pattern.fullmatch(path)
        if match and method == wanted:
            return access, match.groupdict().get("model")
    if _CLOSED_HTTP.fullmatch(path):
        return Access.CLOSED, None
    return Access.UNKNOWN, None


def closed_message(api: str) -> str:
    return f"{api} is closed on this server (ecomserve serves inference, health, metadata and statistics)"


def read_key(key_file: Path | None, env_name: str) -> str | None:
    """A key from `key_file` (a 0600 file, a mounted Secret), else from $`env_name`, which is then dropped
    from this process's environment so no child inherits it; None when neither has one."""
    key = os.environ.pop(env_name, None)
    if key_file is not None:
        key = key_file.read_text().strip()
    return key or None


def read_admin_key(key_file: Path | None) -> str | None:
    return read_key(key_file, ADMIN_KEY_ENV)


def read_api_key(key_file: Path | None) -> str | None:
    return read_key(key_file, API_KEY_ENV)


def key_matches(given: str | None, key: str | None) -> bool:
    return bool(given and key and hmac.compare_digest(given.encode(), key.encode()))


def bearer_token(authorization: str | None) -> str | None:
    """The token of an `Authorization: Bearer <token>` header (scheme case-insensitive, as RFC 6750 allows)."""
    if not authorization:
        return None
    scheme, _, token = authorization.partition(" ")
    return token.strip() if scheme.lower() == "bearer" else None


@dataclass(frozen=True)
class Keys:
    """The front's two keys. The inference API key (optional) guards every call but health on every port;
    the admin key guards the model-repository API and, being the stronger key, passes the API key's check
    too (ecomserve's own tools and the stub watchdog carry only it)."""

    admin: str | None = None
    api: str | None = None

    def admits(self, access: Access, authorization: str | None, admin_header: str | None) -> bool:
        """Whether a call of class `access` with these headers passes the API key's check."""
        if self.api is None or access is Access.HEALTH:
            return True
        return key_matches(bearer_token(authorization), self.api) or key_matches(admin_header, self.admin)

    def is_admin(self, admin_header: str | None) -> bool:
        return key_matches(admin_header, self.admin)


def unauthorized_message() -> str:
    return "this server needs its API key: send 'Authorization: Bearer <key>'"
