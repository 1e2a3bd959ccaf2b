"""The optional inference API key, on a real server that has one: every call but health needs
`Authorization: Bearer <key>` on the API port, KServe v2 HTTP and gRPC alike (no way around it through
Triton's own ports), the admin key passes too, and the key is on no command line and in no child's
environment."""

from __future__ import annotations

import uuid
from pathlib import Path

import numpy as np
import psutil
import pytest
import requests
import tritonclient.grpc as grpcclient
from support import make_tiny_bert, spec_from, start_server
from tritonclient.utils import InferenceServerException

from ecomserve.contract import ADMIN_HEADER

pytestmark = pytest.mark.integration
API_KEY = "api-" + uuid.uuid4().hex
ADMIN_KEY = "admin-" + uuid.uuid4().hex


@pytest.fixture(scope="module")
def keyed(tmp_path_factory):
    root = tmp_path_factory.mktemp("keyed")
    source = make_tiny_bert(root / "tiny", 7)
    spec = spec_from({"encoders": [{"name": "tiny", "source": str(source), "max_seq_len": 32}]})
    server = start_server(spec, root, api_key=API_KEY, admin_key=ADMIN_KEY)
    yield server
    server.stop()


def bearer(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


def kserve_embed(server, headers: dict[str, str]) -> requests.Response:
    text = f"key check {uuid.uuid4().hex}"
    body = {"inputs": [{"name": "TEXT", "datatype": "BYTES", "shape": [1, 1], "data": [text]}]}
    return requests.post(f"http://{server.http_url}/v2/models/embed/infer", json=body, headers=headers, timeout=30)


def test_the_api_needs_the_key_but_health_does_not(keyed):
    api = keyed.api_url
    body = {"input": f"a query {uuid.uuid4().hex}", "model": "tiny"}
    for headers in ({}, bearer("wrong"), {"authorization": API_KEY}):
        refused = requests.post(f"{api}/v1/embeddings", json=body, headers=headers, timeout=30)
        assert refused.status_code == 401, refused.text
        assert refused.json()["error"]["code"] == "invalid_api_key"
        assert refused.headers["www-authenticate"] == "Bearer"
    tei = requests.post(f"{api}/embed", json={"inputs": "x"}, timeout=30)
    assert tei.status_code == 401 and tei.json()["error_type"] == "Unauthorized"
    assert requests.get(f"{api}/health", timeout=10).status_code == 200
    answer = requests.post(f"{api}/v1/embeddings", json=body, headers=bearer(API_KEY), timeout=30)
    assert answer.status_code == 200 and len(answer.json()["data"][0]["embedding"]) == 32


def test_kserve_http_needs_the_key_too(keyed):
    assert kserve_embed(keyed, {}).status_code == 401
    assert kserve_embed(keyed, bearer("wrong")).status_code == 401
    assert kserve_embed(keyed, bearer(API_KEY)).status_code == 200
    assert kserve_embed(keyed, {ADMIN_HEADER: ADMIN_KEY}).status_code == 200  # the stronger key passes
    for path in ("/v2/health/ready", "/v2/health/live"):  # probes carry no key
        assert requests.get(f"http://{keyed.http_url}{path}", timeout=10).status_code == 200
    assert requests.get(f"http://{keyed.http_url}/v2/models/embed/config", timeout=10).status_code == 401
    # The API port's KServe passthrough is the same guard.
    assert requests.get(f"{keyed.api_url}/v2/models/embed/config", timeout=10).status_code == 401


def grpc_embed(server, headers: dict[str, str] | None) -> np.ndarray:
    client = grpcclient.InferenceServerClient(server.grpc_url)
    tensor = grpcclient.InferInput("TEXT", [1, 1], "BYTES")
    tensor.set_data_from_numpy(np.array([[f"grpc key {uuid.uuid4().hex}".encode()]], dtype=np.object_))
    try:
        return client.infer("embed", [tensor], headers=headers).as_numpy("EMBEDDING")
    finally:
        client.close()


def test_grpc_needs_the_key_too(keyed):
    for headers in (None, bearer("wrong")):
        with pytest.raises(InferenceServerException) as refused:
            grpc_embed(keyed, headers)
        assert "UNAUTHENTICATED" in str(refused.value.status()) and "API key" in refused.value.message()
    assert grpc_embed(keyed, bearer(API_KEY)).shape == (1, 32)
    client = grpcclient.InferenceServerClient(keyed.grpc_url)
    try:
        assert client.is_server_ready()  # health, without a key
    finally:
        client.close()


def test_the_key_is_on_no_command_line_and_in_no_childs_environment(keyed):
    for process in psutil.process_iter(["cmdline"]):
        assert API_KEY not in " ".join(process.info["cmdline"] or ()), process
    for pid in (keyed.pid, keyed.front_pid):
        assert API_KEY.encode() not in Path(f"/proc/{pid}/environ").read_bytes()
