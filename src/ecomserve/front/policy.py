"""Which of Triton's APIs a client reaches through the front, on both protocols.

Open: health, metadata, config, statistics and inference. Admin: the model-repository API, with the
admin key (`ecomserve publish`, `rollback`, `models` and the stub watchdog use it). Closed to
everyone: system and CUDA shared memory (a client could register any file in /dev/shm and read or
overwrite it through inference), trace and log settings, and streaming inference (it would bypass
admission; ecomserve's models answer one response per request)."""

from __future__ import annotations

import hmac
import os
import re
from enum import Enum
from pathlib import Path

from ecomserve.contract import ADMIN_KEY_ENV


class Access(Enum):
    OPEN = "open"
    INFER = "infer"
    ADMIN = "admin"
    CLOSED = "closed"
    UNKNOWN = "unknown"


_MODEL = r"/v2/models/(?P<model>[A-Za-z0-9_.-]{1,128})(?:/versions/[0-9]{1,18})?"
_HTTP_ROUTES: list[tuple[str, re.Pattern[str], Access]] = [
    ("GET", re.compile(r"/v2(?:/health/(?:live|ready))?"), Access.OPEN),
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
    **{_SERVICE + name: Access.OPEN for name in (
        "ServerLive", "ServerReady", "ModelReady", "ServerMetadata", "ModelMetadata", "ModelConfig", "ModelStatistics",
    )},
    _SERVICE + "ModelInfer": Access.INFER,
    **{_SERVICE + name: Access.ADMIN for name in ("RepositoryIndex", "RepositoryModelLoad", "RepositoryModelUnload")},
    **{_SERVICE + name: Access.CLOSED for name in (
        "ModelStreamInfer", "SystemSharedMemoryStatus", "SystemSharedMemoryRegister", "SystemSharedMemoryUnregister",
        "CudaSharedMemoryStatus", "CudaSharedMemoryRegister", "CudaSharedMemoryUnregister", "TraceSetting",
        "LogSettings",
    )},
    "/grpc.health.v1.Health/Check": Access.OPEN,
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


def read_admin_key(key_file: Path | None) -> str | None:
    """The admin key from `key_file` (a 0600 file, a mounted Secret), else from $ECOMSERVE_ADMIN_KEY, which
    is then dropped from this process's environment so no child inherits it; None when neither has one."""
    key = os.environ.pop(ADMIN_KEY_ENV, None)
    if key_file is not None:
        key = key_file.read_text().strip()
    return key or None


def key_matches(given: str | None, key: str | None) -> bool:
    return bool(given and key and hmac.compare_digest(given.encode(), key.encode()))
