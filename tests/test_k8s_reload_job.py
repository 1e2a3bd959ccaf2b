"""The chart's model reload Job script (files/reload_models.py), run against a stand-in for Triton's HTTP
API: every model of the release loaded with the admin key, embed last, then waited for; with an inference API
key, every call carries it. Both keys come from files (mounted Secrets), never from the environment.

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
API_KEY = "inference-k3y-for-the-stand-in_1"
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
    `not_ready_polls` times, then ready. With `api_key`, every call without `Authorization: Bearer <api_key>`
    is refused (401). Records (method, path, admin header) and the Authorization header of every call."""

    calls: list[tuple[str, str, str | None]] = []
    authorizations: list[str | None] = []
    not_ready_polls = 0
    api_key: str | None = None

    def do_POST(self):  # noqa: N802 (http.server's naming)
        self._record()
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        if not self._authorized():
            self._answer({"error": "Unauthorized: missing or wrong API key"}, 401)
        elif self.headers.get("ecomserve-admin-key") != ADMIN_KEY:
            self._answer({"error": f"{self.path} needs the admin key in the ecomserve-admin-key header"}, 403)
        elif self.path == "/v2/repository/index":
            self._answer(RELEASE_INDEX, 200)
        elif self.path.endswith("/broken/load"):
            self._answer({"error": "failed to load 'broken'"}, 400)
        else:
            self._answer({}, 200)

    def do_GET(self):  # noqa: N802
        self._record()
        if not self._authorized():
            self._answer({"error": "Unauthorized: missing or wrong API key"}, 401)
        elif self.path == "/v2/models/embed/ready":
            ready = FakeTriton.not_ready_polls <= 0
            FakeTriton.not_ready_polls -= 1
            self._answer({} if ready else {"error": "model not ready"}, 200 if ready else 400)
        elif self.path == "/v2/models/embed":
            self._answer({"name": "embed", "versions": ["2"], "platform": "ensemble"}, 200)
        else:
            self._answer({"error": "unknown"}, 404)

    def _record(self):
        self.calls.append((self.command, self.path, self.headers.get("ecomserve-admin-key")))
        self.authorizations.append(self.headers.get("Authorization"))

    def _authorized(self) -> bool:
        return self.api_key is None or self.headers.get("Authorization") == f"Bearer {self.api_key}"

    def _answer(self, body, status: int):
        payload = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args):
        pass


@pytest.fixture
def fake_triton(tmp_path):
    """Runs the script against the stand-in. The admin key is written to a file (with a trailing newline, as
    a file written by hand has) that ECOMSERVE_ADMIN_KEY_FILE names; admin_key_file names another file
    instead, or with "" leaves the variable unset. extra_env is added last."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeTriton)
    threading.Thread(target=server.serve_forever, daemon=True).start()

    def reload(
        models="", key=ADMIN_KEY, not_ready_polls=0, timeout_s=30, api_key=None, api_key_file=None,
        admin_key_file=None, extra_env=(),
    ):  # fmt: skip
        FakeTriton.calls, FakeTriton.authorizations, FakeTriton.not_ready_polls = [], [], not_ready_polls
        FakeTriton.api_key = api_key
        if admin_key_file is None:
            admin_key_file = tmp_path / "admin-key"
            admin_key_file.write_text(key + "\n")
        env = {
            **os.environ, "TRITON_SERVICE": "127.0.0.1", "TRITON_HTTP_PORT": str(server.server_port),
            "RELOAD_MODELS": models, "LOAD_TIMEOUT_S": str(timeout_s),
        }  # fmt: skip
        for name in ("ECOMSERVE_ADMIN_KEY", "ECOMSERVE_ADMIN_KEY_FILE", "ECOMSERVE_API_KEY_FILE"):
            env.pop(name, None)
        if admin_key_file != "":
            env["ECOMSERVE_ADMIN_KEY_FILE"] = str(admin_key_file)
        if api_key_file is not None:
            env["ECOMSERVE_API_KEY_FILE"] = str(api_key_file)
        env.update(extra_env)
        return run([sys.executable, CHART / "files" / "reload_models.py"], env=env)

    yield reload
    FakeTriton.api_key = None
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


def test_reload_job_sends_the_api_key_from_its_file(fake_triton, tmp_path):
    key_file = tmp_path / "api-key"
    key_file.write_text(API_KEY + "\n")  # a trailing newline (a file written by hand) is not part of the key
    result = fake_triton(api_key=API_KEY, api_key_file=key_file, not_ready_polls=1)
    assert result.returncode == 0, result.stdout + result.stderr
    assert FakeTriton.calls and FakeTriton.authorizations == [f"Bearer {API_KEY}"] * len(FakeTriton.calls)
    repository_calls = [call for call in FakeTriton.calls if call[1].startswith("/v2/repository/")]
    assert all(key == ADMIN_KEY for _, _, key in repository_calls), "the admin key as well, where it is needed"
    assert API_KEY not in result.stdout + result.stderr
    # The pods' front admits each call: the inference key on every one, the admin key on the repository API.
    keys = front_policy.Keys(admin=ADMIN_KEY, api=API_KEY)
    for (method, path, admin), authorization in zip(FakeTriton.calls, FakeTriton.authorizations, strict=True):
        assert keys.admits(front_policy.http_access(method, path)[0], authorization, admin), (method, path)
    # Without the key (apiKey off in the chart, but on in the pods) every call is refused, and the Job fails.
    missing = fake_triton(api_key=API_KEY)
    assert missing.returncode == 1 and "repository index: HTTP 401" in missing.stderr
    unreadable = fake_triton(api_key=API_KEY, api_key_file=tmp_path / "absent")
    assert unreadable.returncode == 1 and f"{tmp_path / 'absent'}" in unreadable.stderr
    assert not FakeTriton.calls, "no call without the key it was told to send"
    key_file.write_text("")
    empty = fake_triton(api_key=API_KEY, api_key_file=key_file)
    assert empty.returncode == 1 and "is empty" in empty.stderr


def test_reload_job_reads_the_admin_key_from_its_file_only(fake_triton, tmp_path):
    """A missing, empty or unusable admin key file, or none named, stops the Job before any call, with a message
    naming the file (never the key); the key in the environment (the old ECOMSERVE_ADMIN_KEY) is not read."""
    absent = tmp_path / "no-such-key"
    unreadable = fake_triton(admin_key_file=absent)
    assert unreadable.returncode == 1
    assert f"cannot read the admin key file {absent}: No such file or directory" in unreadable.stderr
    assert not FakeTriton.calls, "no call without the admin key"
    empty_file = tmp_path / "empty-admin-key"
    empty_file.write_text("\n")
    empty = fake_triton(admin_key_file=empty_file)
    assert empty.returncode == 1 and f"the admin key file {empty_file} is empty" in empty.stderr
    assert not FakeTriton.calls
    bad_file = tmp_path / "bad-admin-key"
    bad_file.write_text(f"{ADMIN_KEY}\n{ADMIN_KEY}\n")  # a newline inside: no header can carry it
    bad = fake_triton(admin_key_file=bad_file)
    assert bad.returncode == 1 and f"the admin key file {bad_file} holds characters" in bad.stderr
    assert ADMIN_KEY not in bad.stdout + bad.stderr and not FakeTriton.calls
    from_env = fake_triton(admin_key_file="", extra_env={"ECOMSERVE_ADMIN_KEY": ADMIN_KEY})
    assert from_env.returncode == 1
    assert "ECOMSERVE_ADMIN_KEY_FILE is not set" in from_env.stderr
    assert "not read from the environment" in from_env.stderr
    assert ADMIN_KEY not in from_env.stdout + from_env.stderr and not FakeTriton.calls
    # The file wins over a stale variable: the key sent is the file's.
    stale = fake_triton(extra_env={"ECOMSERVE_ADMIN_KEY": "stale-key"})
    assert stale.returncode == 0, stale.stdout + stale.stderr
    assert {key for _, path, key in FakeTriton.calls if path.startswith("/v2/repository/")} == {ADMIN_KEY}
    # With both key files named, a bad admin key file stops the Job before the API key matters.
    api_file = tmp_path / "api-key"
    api_file.write_text(API_KEY)
    both = fake_triton(api_key=API_KEY, api_key_file=api_file, admin_key_file=absent)
    assert both.returncode == 1 and "admin key file" in both.stderr and not FakeTriton.calls
    assert API_KEY not in both.stdout + both.stderr
