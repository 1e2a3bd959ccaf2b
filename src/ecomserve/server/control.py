"""Triton's model-repository API (load, readiness, index) as ecomserve's tools call it: over HTTP,
with the admin key on every call; and where that key comes from."""

from __future__ import annotations

import json
import os
import secrets
import time
from dataclasses import dataclass
from pathlib import Path

from ecomserve.contract import ADMIN_HEADER, ADMIN_KEY_ENV
from ecomserve.errors import ServerError
from ecomserve.files import write_private_text

READY_TIMEOUT_S = 300.0
ADMIN_KEY_FILE = "admin.key"
# Set in a model's configuration by restart(): when ecomserve last restarted its instances.
RESTART_PARAMETER = "ecomserve_restarted_ns"


def admin_key(work_dir: Path, create: bool = False) -> str:
    """$ECOMSERVE_ADMIN_KEY, else the key `ecomserve serve` keeps in <work_dir>/admin.key (made once, 0600)."""
    if os.environ.get(ADMIN_KEY_ENV):
        return os.environ[ADMIN_KEY_ENV]
    path = work_dir / ADMIN_KEY_FILE
    if path.is_file():
        return path.read_text().strip()
    if not create:
        raise ServerError(f"no admin key: set {ADMIN_KEY_ENV} or run this where `ecomserve serve` wrote {path}")
    key = secrets.token_urlsafe(24)
    write_private_text(path, key + "\n")
    return key


@dataclass
class ModelControl:
    """One HTTP client; tritonclient's is gevent-based, so use it from the thread that made it."""

    url: str
    key: str

    def __post_init__(self):
        import tritonclient.http as httpclient

        self._client = httpclient.InferenceServerClient(self.url, connection_timeout=30.0, network_timeout=600.0)
        self._headers = {ADMIN_HEADER: self.key}

    def load(self, model: str) -> None:
        from tritonclient.utils import InferenceServerException

        try:
            self._client.load_model(model, headers=self._headers)
        except InferenceServerException as exc:
            raise ServerError(f"the server could not load '{model}': {exc.message()}") from None

    def restart(self, model: str) -> None:
        """Start fresh instances of `model` with the configuration it runs with now; Triton swaps them in once
        ready. A load does that only for changed files or a changed configuration (ignoring instance_group
        and version_policy), so the restart is stamped into a parameter the models do not read."""
        from tritonclient.utils import InferenceServerException

        try:
            config = self._client.get_model_config(model, headers=self._headers)
            config.setdefault("parameters", {})[RESTART_PARAMETER] = {"string_value": str(time.time_ns())}
            self._client.load_model(model, headers=self._headers, config=json.dumps(config))
        except InferenceServerException as exc:
            raise ServerError(f"the server could not restart '{model}': {exc.message()}") from None

    def wait_ready(self, model: str, version: int, timeout_s: float = READY_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout_s
        while not self._client.is_model_ready(model, str(version), headers=self._headers):
            if time.monotonic() > deadline:
                raise ServerError(f"'{model}' version {version} not ready after {timeout_s:.0f} s")
            time.sleep(0.2)

    def index(self) -> list[dict]:
        from tritonclient.utils import InferenceServerException

        try:
            return self._client.get_model_repository_index(headers=self._headers)
        except InferenceServerException as exc:
            raise ServerError(f"model repository index refused: {exc.message()} (check the admin key)") from None

    def close(self) -> None:
        self._client.close()
