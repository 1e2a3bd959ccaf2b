"""Hostile clients against the real server: requests built to crash it, read what is not theirs or
exhaust it. Each attack is sent through the public ports, then the server must still be ready and
give the known-good answers. Process faults and overload have their own modules
(test_process_faults.py, test_overload.py); this one holds the requests."""

from __future__ import annotations

import json
import os
import socket
import stat
import uuid
from pathlib import Path

import grpc
import numpy as np
import psutil
import pytest
import requests
import tritonclient.grpc as grpcclient
from raw_protocol import Tensor, infer
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

from ecomserve.contract import ADMIN_HEADER

pytestmark = pytest.mark.integration

KNOWN_TEXT = b"red running shoes"


def unique(prefix: str) -> bytes:
    """A text never sent before: the response cache cannot answer it."""
    return f"{prefix} {uuid.uuid4().hex[:8]}".encode()


@pytest.fixture(scope="module")
def known_embedding(default_server) -> np.ndarray:
    return infer("http", default_server, "embed", [Tensor("TEXT", "BYTES", [1, 1], [KNOWN_TEXT])]).outputs["EMBEDDING"]


def assert_still_serving(server, known_embedding) -> None:
    assert server.is_ready()
    for protocol in ("http", "grpc"):
        answer = infer(protocol, server, "embed", [Tensor("TEXT", "BYTES", [1, 1], [KNOWN_TEXT])])
        assert answer.ok, answer.message
        assert np.abs(answer.outputs["EMBEDDING"] - known_embedding).max() <= 1e-5
        fresh = infer(protocol, server, "embed", [Tensor("TEXT", "BYTES", [1, 1], [unique("hiking boots")])])
        assert fresh.ok, fresh.message


def post(server, path: str, body: bytes, headers: dict | None = None) -> requests.Response:
    return requests.post(f"http://{server.http_url}{path}", data=body, headers=headers or {}, timeout=60)


def text_request(data, shape) -> bytes:
    return json.dumps({"inputs": [{"name": "TEXT", "datatype": "BYTES", "shape": shape, "data": data}]}).encode()


# --- requests that crashed Triton 2.51 or got its 500 ------------------------------------------------------------


def test_json_nested_50000_deep_is_refused_and_the_server_lives(default_server, known_embedding):
    """This 100 KB body overflowed the stack of Triton 2.51's HTTP front end (SIGSEGV, server gone)."""
    deep = b'{"inputs":[{"name":"TEXT","datatype":"BYTES","shape":[1,1],"data":' + b"[" * 50_000 + b'"x"'
    deep += b"]" * 50_000 + b"}]}"
    pid = default_server.pid
    response = post(default_server, "/v2/models/embed/infer", deep)
    assert response.status_code == 400 and "depth" in response.json()["error"]
    # Deep nesting where the schema has no depth of its own: an extra field and parameters.
    extra = b'{"id":"x","parameters":{"p":' + b"[" * 500 + b"]" * 500 + b'},"inputs":[]}'
    response = post(default_server, "/v2/models/embed/infer", extra)
    assert response.status_code == 400 and "parameter 'p'" in response.json()["error"]
    assert default_server.pid == pid, "tritonserver was restarted: the request reached it"
    assert_still_serving(default_server, known_embedding)


MALFORMED = {
    "truncated": (b'{"inputs":[{"name":"TEXT","datatype":"BYTES","shape":[1,1],"data":["x"]', None, "malformed JSON"),
    "not json": (b"\xff\xfe<xml/>", None, "malformed JSON"),
    "non-string BYTES": (text_request([[5]], [1, 1]), None, "BYTES data holds int 5"),
    "negative dimension": (text_request(["x"], [-1, 1]), None, "shape [-1, 1] must hold integers"),
    "fractional dimension": (text_request(["x"], [1.5, 1]), None, "got 1.5"),
    "boolean dimension": (text_request(["x"], [True, 1]), None, "got True"),
    "batch of 2^62": (text_request(["x"], [2**62, 1]), None, "must hold integers from 0 to 2147483647"),
    "shape and data disagree": (text_request(["x", "y"], [1, 1]), None, "holds 1 elements but the data has 2"),
    "nested deeper than shape": (text_request([[["x"]]], [1, 1]), None, "nested deeper than its shape"),
    "mixed nesting": (text_request([["x"], "y"], [2, 1]), None, "mixes lists and values"),
    "unknown field": (b'{"inputs":[],"evil":1}', None, "unknown field 'evil'"),
    "no inputs": (b'{"inputs":[]}', None, "'inputs' must be a list of 1 to 16"),
    "header length not a number": (text_request(["x"], [1, 1]), "abc", "Inference-Header-Content-Length 'abc'"),
    "header length past the body": (text_request(["x"], [1, 1]), "999999", "Inference-Header-Content-Length"),
    "shared memory in an inference": (
        json.dumps({"inputs": [{"name": "TEXT", "datatype": "BYTES", "shape": [1, 1],
                                "parameters": {"shared_memory_region": "x", "shared_memory_byte_size": 8}}]}).encode(),
        None,
        "shared memory is closed",
    ),
}  # fmt: skip


@pytest.mark.parametrize("case", MALFORMED.keys())
def test_malformed_http_requests_get_400_naming_the_problem(default_server, known_embedding, case):
    body, header_length, words = MALFORMED[case]
    headers = {"Inference-Header-Content-Length": header_length} if header_length else {}
    response = post(default_server, "/v2/models/embed/infer", body, headers)
    assert response.status_code == 400, response.text
    assert words in response.json()["error"], response.json()
    assert_still_serving(default_server, known_embedding)


def _binary_request(tensors: list[tuple[dict, bytes]]) -> tuple[bytes, dict]:
    header = json.dumps({"inputs": [entry for entry, _ in tensors]}).encode()
    return header + b"".join(blob for _, blob in tensors), {"Inference-Header-Content-Length": str(len(header))}


@pytest.mark.parametrize(
    ("blob", "size", "words"),
    [
        (b"\x05\x00\x00\x00ab", 6, "runs past the end of the data"),
        (b"\x01\x00", 2, "ends inside an element's 4-byte length"),
        (b"\x01\x00\x00\x00a", 99, "runs past the body's binary part"),
        (b"\x01\x00\x00\x00a\x01\x00\x00\x00b", 10, "holds 1 elements but the data has 2"),
        (b"\x01\x00\x00\x00a" + b"junk", 5, "4 bytes after the tensors' binary data"),
    ],
)
def test_malformed_binary_tensors_get_400(default_server, known_embedding, blob, size, words):
    entry = {"name": "TEXT", "datatype": "BYTES", "shape": [1, 1], "parameters": {"binary_data_size": size}}
    body, headers = _binary_request([(entry, blob)])
    response = post(default_server, "/v2/models/embed/infer", body, headers)
    assert response.status_code == 400 and words in response.json()["error"], response.text
    assert_still_serving(default_server, known_embedding)


def test_the_metrics_port_serves_triton_and_front_metrics_and_nothing_else(default_server):
    text = requests.get(default_server.metrics_url, timeout=30).text
    assert "nv_inference_request_success" in text and "ecomserve_front_admitted_total" in text
    base = default_server.metrics_url.removesuffix("/metrics")
    assert requests.get(base + "/v2/health/ready", timeout=30).status_code == 404
    assert requests.post(base + "/v2/models/embed/infer", data=b"{}", timeout=30).status_code == 404
    assert requests.get(f"http://{default_server.http_url}/metrics", timeout=30).status_code == 404


def test_body_over_the_limit_is_413_before_it_is_read(default_server, known_embedding):
    limit = 8 * 1024 * 1024  # serving.front.max_body_bytes default
    response = post(default_server, "/v2/models/embed/infer", b" " * (limit + 1))
    assert response.status_code == 413 and "max_body_bytes" in response.json()["error"]
    import gzip

    bomb = gzip.compress(b" " * (limit * 2))  # 16 MiB of spaces in 16 KB
    response = post(default_server, "/v2/models/embed/infer", bomb, {"Content-Encoding": "gzip"})
    assert response.status_code == 413 and "once decompressed" in response.json()["error"]
    good = gzip.compress(text_request([[KNOWN_TEXT.decode()]], [1, 1]))
    response = post(default_server, "/v2/models/embed/infer", good, {"Content-Encoding": "gzip"})
    assert response.status_code == 200
    assert np.abs(np.array(response.json()["outputs"][0]["data"]) - known_embedding.ravel()).max() <= 1e-5
    assert_still_serving(default_server, known_embedding)


def _grpc_stub(server):
    channel = grpc.insecure_channel(server.grpc_url)
    return channel, service_pb2_grpc.GRPCInferenceServiceStub(channel)


def test_grpc_shapes_that_disagree_with_the_data_are_invalid(default_server, known_embedding):
    channel, stub = _grpc_stub(default_server)
    with channel:
        for shape, contents, raw, words in [
            ([2**62, 1], [b"x"], None, "must hold integers from 0 to"),
            ([2**20, 1], [b"x"], None, "holds 1048576 elements but the data has 1"),
            ([-1, 1], [b"x"], None, "must hold integers"),
            ([1, 1], None, b"\x09\x00\x00\x00x", "runs past the end of the data"),
        ]:
            tensor = service_pb2.ModelInferRequest.InferInputTensor(name="TEXT", datatype="BYTES", shape=shape)
            if contents is not None:
                tensor.contents.bytes_contents.extend(contents)
            request = service_pb2.ModelInferRequest(model_name="embed", inputs=[tensor])
            if raw is not None:
                request.raw_input_contents.append(raw)
            with pytest.raises(grpc.RpcError) as error:
                stub.ModelInfer(request, timeout=30)
            assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert words in error.value.details(), error.value.details()
    assert_still_serving(default_server, known_embedding)


# --- APIs no client needs --------------------------------------------------------------------------------------


@pytest.fixture
def foreign_shm_file():
    """Another process's shared-memory file, which a client must neither read nor write."""
    path = f"/dev/shm/ecomserve-test-victim-{uuid.uuid4().hex[:8]}"
    secret = b"SECRET-" + uuid.uuid4().hex.encode()
    with open(path, "wb") as handle:
        handle.write(secret.ljust(4096, b"\0"))
    yield path, secret
    os.unlink(path)


def test_shared_memory_trace_logging_are_closed_over_http(default_server, known_embedding, foreign_shm_file):
    path, secret = foreign_shm_file
    key = path.removeprefix("/dev/shm")
    base = f"http://{default_server.http_url}"
    calls = [
        ("POST", "/v2/systemsharedmemory/region/stolen/register", {"key": key, "offset": 0, "byte_size": 64}),
        ("GET", "/v2/systemsharedmemory/status", None),
        ("POST", "/v2/systemsharedmemory/unregister", None),
        ("POST", "/v2/cudasharedmemory/region/x/register", {"raw_handle": {"b64": ""}, "device_id": 0, "byte_size": 8}),
        ("GET", "/v2/trace/setting", None),
        ("POST", "/v2/trace/setting", {"trace_level": ["TIMESTAMPS"], "trace_file": "/tmp/owned"}),
        ("POST", "/v2/models/embed/trace/setting", {"trace_level": ["TIMESTAMPS"]}),
        ("GET", "/v2/logging", None),
        ("POST", "/v2/logging", {"log_file": "/tmp/owned.log", "log_verbose_level": 1}),
    ]
    for method, route, body in calls:
        response = requests.request(method, base + route, json=body, timeout=30)
        assert response.status_code == 403, (route, response.text)
        assert "closed on this server" in response.json()["error"]
    for route in ("/v2/repository/index", "/v2/repository/models/embed/unload"):
        response = requests.post(base + route, headers={ADMIN_HEADER: "guess"}, timeout=30)
        assert response.status_code == 403 and "needs the admin key" in response.json()["error"]
    assert requests.get(base + "/v2/anything/else", timeout=30).status_code == 404
    with open(path, "rb") as handle:
        assert handle.read(len(secret)) == secret
    assert_still_serving(default_server, known_embedding)


def test_shared_memory_trace_logging_are_closed_over_grpc(default_server, known_embedding, foreign_shm_file):
    path, secret = foreign_shm_file
    client = grpcclient.InferenceServerClient(default_server.grpc_url)
    calls = [
        lambda: client.register_system_shared_memory("stolen", path.removeprefix("/dev/shm"), 64),
        lambda: client.get_system_shared_memory_status(),
        lambda: client.unregister_system_shared_memory(),
        lambda: client.get_cuda_shared_memory_status(),
        lambda: client.get_trace_settings(),
        lambda: client.update_trace_settings(settings={"trace_file": "/tmp/owned"}),
        lambda: client.get_log_settings(),
        lambda: client.update_log_settings({"log_verbose_level": 1}),
    ]
    try:
        for call in calls:
            with pytest.raises(InferenceServerException, match="closed on this server"):
                call()
        with pytest.raises(InferenceServerException, match="needs the admin key"):
            client.unload_model("embed", headers={ADMIN_HEADER: "guess"})
        # Streaming inference would bypass admission: closed too.
        channel, stub = _grpc_stub(default_server)
        with channel, pytest.raises(grpc.RpcError) as error:
            list(stub.ModelStreamInfer(iter([service_pb2.ModelInferRequest(model_name="embed")]), timeout=30))
        assert error.value.code() == grpc.StatusCode.PERMISSION_DENIED
    finally:
        client.close()
    with open(path, "rb") as handle:
        assert handle.read(len(secret)) == secret
    assert_still_serving(default_server, known_embedding)


# --- the admin key and Triton's own ports -------------------------------------------------------------------


def test_no_command_line_holds_the_admin_key_and_triton_listens_only_privately(default_server):
    key = default_server.admin_key
    for process in psutil.process_iter(["cmdline"]):
        assert key not in " ".join(process.info["cmdline"] or ()), process
    for pid in (default_server.pid, default_server.front_pid):  # nor in the environment of either child
        assert key.encode() not in Path(f"/proc/{pid}/environ").read_bytes()
    triton = psutil.Process(default_server.pid)
    listening = {c.laddr.port for c in triton.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN}
    assert listening == set(), "Triton must listen only on its private sockets"
    front = psutil.Process(default_server.front_pid)
    ports = {c.laddr.port for c in front.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN}
    assert ports == set(default_server.options.ports.named().values())
    folder = default_server.sockets.folder
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    assert folder.stat().st_uid == os.getuid()


def test_the_response_cache_is_as_big_as_the_spec_says(default_server):
    """serving.response_cache_mb bounds what cached answers take (per server)."""
    from ecomserve.repository.builder import built_spec

    serving = built_spec(default_server.options.repository).serving
    assert serving.response_cache
    cache_bytes = serving.response_cache_mb << 20
    cmdline = psutil.Process(default_server.pid).cmdline()
    assert [arg for arg in cmdline if arg.startswith("--cache-config")] == [f"--cache-config=local,size={cache_bytes}"]


@pytest.mark.skipif(os.geteuid() != 0, reason="switching to another user needs root")
def test_another_local_user_cannot_reach_triton_directly(default_server):
    """What a second user on the host (uid 65534) gets when it goes around the front: a forked child drops
    to that user and tries Triton's sockets; its exit code has one bit per socket it could connect to."""
    sockets = default_server.sockets
    paths = [str(sockets.http_path), str(sockets.grpc_path), str(sockets.metrics_path)]
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 100
        try:
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
            code = 0
            for bit, path in enumerate(paths):
                with socket.socket(socket.AF_UNIX) as probe:
                    try:
                        probe.connect(path)
                        code |= 1 << bit
                    except PermissionError:
                        pass
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, "another user connected to Triton's private sockets"
