"""The chart's model reload Job script (files/reload_models.py), run against a stand-in for Triton's HTTP
API: every model of the release loaded with the admin key, embed last, then waited for.

Checked without a cluster, like every tests/test_k8s_*.py (helpers: tests/k8s_tools.py)."""

from __future__ import annotations

import json
import os
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from k8s_tools import (
    CHART,
    run,
)

from ecomserve import contract
from ecomserve.front import policy as front_policy

ADMIN_KEY = "k3y-for-the-stand-in_0"
# The repository index of a release with a split layout (one entry per model version, as Triton lists them).
RELEASE_INDEX = [
    {"name": "classify", "version": "1", "state": "READY"},
    {"name": "embed", "version": "2", "state": "READY"},
    {"name": "fusion", "version": "1", "state": "READY"},
    {"name": "fusion", "version": "2", "state": "READY"},
    {"name": "minilm_encoder", "version": "2", "state": "READY"},
    {"name": "minilm_tokenizer", "version": "2", "state": "READY"},
    {"name": "rank", "version": "1", "state": "READY"},
    {"name": "search", "version": "1", "state": "READY"},
]


class FakeTriton(BaseHTTPRequestHandler):
    """Triton's HTTP API as the reload Job sees it, through the front: the repository API refuses requests
    without the admin key (403, the front's message); loading `broken` fails; `embed` answers not ready
    `not_ready_polls` times, then ready. Records (method, path, admin header) of every call."""

    calls: list[tuple[str, str, str | None]] = []
    not_ready_polls = 0

    def do_POST(self):  # noqa: N802 (http.server's naming)
        self._record()
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        if self.headers.get("ecomserve-admin-key") != ADMIN_KEY:
            self._answer({"error": f"{self.path} needs the admin key in the ecomserve-admin-key header"}, 403)
        elif self.path == "/v2/repository/index":
            self._answer(RELEASE_INDEX, 200)
        elif self.path.endswith("/broken/load"):
            self._answer({"error": "failed to load 'broken'"}, 400)
        else:
            self._answer({}, 200)

    def do_GET(self):  # noqa: N802
        self._record()
        if self.path == "/v2/models/embed/ready":
            ready = FakeTriton.not_ready_polls <= 0
            FakeTriton.not_ready_polls -= 1
            self._answer({} if ready else {"error": "model not ready"}, 200 if ready else 400)
        elif self.path == "/v2/models/embed":
            self._answer({"name": "embed", "versions": ["2"], "platform": "ensemble"}, 200)
        else:
            self._answer({"error": "unknown"}, 404)

    def _record(self):
        self.calls.append((self.command, self.path, self.headers.get("ecomserve-admin-key")))

    def _answer(self, body, status: int):
        payload = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args):
        pass


@pytest.fixture
def fake_triton():
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeTriton)
    threading.Thread(target=server.serve_forever, daemon=True).start()

    def reload(models: str = "", key: str = ADMIN_KEY, not_ready_polls: int = 0, timeout_s: int = 30):
        FakeTriton.calls, FakeTriton.not_ready_polls = [], not_ready_polls
        env = {
            **os.environ, "TRITON_SERVICE": "127.0.0.1", "TRITON_HTTP_PORT": str(server.server_port),
            "RELOAD_MODELS": models, "ECOMSERVE_ADMIN_KEY": key, "LOAD_TIMEOUT_S": str(timeout_s),
        }  # fmt: skip
        return run([sys.executable, CHART / "files" / "reload_models.py"], env=env)

    yield reload
    server.shutdown()
    server.server_close()


def test_reload_job_loads_the_release_on_every_pod_embed_last(fake_triton):
    result = fake_triton(not_ready_polls=1)
    assert result.returncode == 0, result.stdout + result.stderr
    repository_calls = [call for call in FakeTriton.calls if call[1].startswith("/v2/repository/")]
    assert [(method, path) for method, path, _ in repository_calls] == [
        ("POST", "/v2/repository/index"),
        ("POST", "/v2/repository/models/fusion/load"),
        ("POST", "/v2/repository/models/minilm_encoder/load"),
        ("POST", "/v2/repository/models/minilm_tokenizer/load"),
        ("POST", "/v2/repository/models/embed/load"),
    ], "every versioned model once, in index order, embed last; rank, classify and search are not reloaded"
    assert all(key == ADMIN_KEY for _, _, key in repository_calls), "every repository call needs the admin key"
    others = [call for call in FakeTriton.calls if call not in repository_calls]
    assert others[:2] == [("GET", "/v2/models/embed/ready", None)] * 2, "waits until embed is ready"
    assert all(key is None for _, _, key in others), "the key goes to the repository API only"
    assert FakeTriton.calls.index(others[0]) > FakeTriton.calls.index(repository_calls[-1]), "ready after the loads"
    assert "embed ready, serving release 2" in result.stdout
    assert ADMIN_KEY not in result.stdout + result.stderr
    # The pods' front passes each of these calls on: the repository API with the key, the rest to anyone.
    script = (CHART / "files" / "reload_models.py").read_text()
    assert f'ADMIN_HEADER = "{contract.ADMIN_HEADER}"' in script
    for method, path, key in FakeTriton.calls:
        expected = front_policy.Access.ADMIN if key else front_policy.Access.OPEN
        assert front_policy.http_access(method, path)[0] is expected, (method, path)


def test_reload_job_fails_on_a_refused_or_failed_load_or_embed_not_ready(fake_triton):
    wrong_key = fake_triton(key="not-the-key")
    assert wrong_key.returncode == 1
    refused = "repository index: HTTP 403: /v2/repository/index needs the admin key in the ecomserve-admin-key header"
    assert refused in wrong_key.stderr
    assert "not-the-key" not in wrong_key.stdout + wrong_key.stderr
    failed = fake_triton("rank,broken")
    assert failed.returncode == 1
    assert "broken: HTTP 400: failed to load 'broken'" in failed.stderr
    assert [path for _, path, _ in FakeTriton.calls][:2] == [
        "/v2/repository/models/rank/load", "/v2/repository/models/broken/load"
    ], "an explicit rollout.reload.models list is loaded as given"  # fmt: skip
    never_ready = fake_triton(not_ready_polls=100, timeout_s=1)
    assert never_ready.returncode == 1
    assert "embed: not ready after 1 s (HTTP 400: model not ready)" in never_ready.stderr
