"""Abstract Locust users that send workload Calls to Triton: TritonHttpUser (KServe v2 JSON through FastHttpUser)
and TritonGrpcUser (tritonclient.grpc, made cooperative under gevent). With $ECOMSERVE_API_KEY set, every request
carries `Authorization: Bearer <key>` (a header, or gRPC metadata), which a server with an API key requires.

Both report every request through Locust's request event with the name "<protocol> <call name>" (for example
"grpc embed query"), its response time, its size and, as a failure, any transport error or wrong answer."""

import locust  # noqa: F401  first: gevent monkey-patches the standard library before anything else imports it

# isort: split
import os
import time

import grpc.experimental.gevent
import numpy as np
import tritonclient.grpc as grpcclient
from answers import WrongAnswer
from api_requests import auth_headers
from locust import FastHttpUser, User
from tritonclient.utils import InferenceServerException
from workload import SCENARIOS, Call, Int32Tensor, TextTensor, Workload, WorkloadSettings

# Without this a gRPC call blocks gevent's hub, and with it every other user in the process: the known
# gRPC + gevent hang. It must run before the first channel exists.
grpc.experimental.gevent.init_gevent()

REQUEST_TIMEOUT_S = 60.0
_HTTP_DTYPES = {"FP32": np.float32, "INT32": np.int32, "BYTES": np.object_}


def run_scenario(user) -> None:
    """The users' one task: the next request of their scenario."""
    user.send(user.workload.call(user.scenario))


class ScenarioUser:
    """What every protocol shares (here and in api_users.py): the scenario, its workload, and the think time
    between requests."""

    scenario = ""  # a workload.SCENARIOS name, set by the concrete user classes
    scenarios = SCENARIOS  # the ones this protocol can send
    protocol = ""  # "http", "grpc" or "api", set by the abstract protocol users
    tasks = [run_scenario]

    def on_start(self) -> None:
        if self.scenario not in self.scenarios:
            raise ValueError(f"{type(self).__name__}.scenario must be one of {self.scenarios}, got {self.scenario!r}")
        options = self.environment.parsed_options
        self.workload = Workload(workload_settings(options))
        self.think_time_s = getattr(options, "think_time_ms", 0) / 1000
        self.headers = auth_headers(os.environ)  # never logged, nor part of a failure message

    def wait_time(self) -> float:
        return self.think_time_s


def workload_settings(options) -> WorkloadSettings:
    """The workload's command-line options (wiring.py) or, when Locust runs as a library without them, the defaults."""
    defaults = WorkloadSettings()
    return WorkloadSettings(
        candidates=getattr(options, "candidates", defaults.candidates),
        recommend_items=getattr(options, "recommend_items", defaults.recommend_items),
        unique_texts=getattr(options, "unique_texts", defaults.unique_texts),
        data_dir=getattr(options, "data_dir", None) or defaults.data_dir,
        top_k=getattr(options, "top_k", defaults.top_k),
        search_modes=getattr(options, "search_modes", defaults.search_modes),
        filter_share=getattr(options, "filter_share", defaults.filter_share),
    )


class TritonHttpUser(ScenarioUser, FastHttpUser):
    """POST /v2/models/<model>/infer with a JSON body; --host is the HTTP endpoint (http://host:8000)."""

    abstract = True
    protocol = "http"
    host = "http://127.0.0.1:8000"
    network_timeout = REQUEST_TIMEOUT_S
    connection_timeout = REQUEST_TIMEOUT_S

    def send(self, call: Call) -> None:
        body = {
            "inputs": [
                {"name": t.name, "datatype": t.datatype, "shape": list(t.shape), "data": list(t.values)}
                for t in call.inputs
            ]
        }
        path = f"/v2/models/{call.model}/infer"
        with self.client.post(
            path,
            json=body,
            headers=dict(self.headers),  # FastHttpSession adds its own headers to the dict it is given
            name=f"http {call.name}",
            catch_response=True,
        ) as response:
            if response.status_code != 200:
                response.failure(f"HTTP {response.status_code}: {_http_error(response)}")
                return
            try:
                call.check(_http_outputs(response.json()))
            except WrongAnswer as exc:
                response.failure(f"wrong answer: {exc}")
            except (ValueError, KeyError, TypeError) as exc:  # not KServe v2 JSON
                response.failure(f"malformed response: {type(exc).__name__}: {exc}")


def _http_outputs(body: dict) -> dict[str, np.ndarray]:
    return {
        output["name"]: np.array(output["data"], dtype=_HTTP_DTYPES.get(output["datatype"])).reshape(output["shape"])
        for output in body["outputs"]
    }


def _http_error(response) -> str:
    if response.status_code == 0:  # no HTTP answer at all: connection refused, timeout …
        return str(response.error)
    try:
        return str(response.json()["error"])
    except (ValueError, KeyError, TypeError):
        return (response.text or "")[:200]


class GrpcError(Exception):
    """A gRPC call that failed: Triton's status and message."""


class _GrpcClient(grpcclient.InferenceServerClient):
    """tritonclient's gRPC client, closed by on_stop only. tritonclient closes it again in __del__, and a channel
    closed from the garbage collector (at any allocation, possibly inside gRPC's gevent poller) can deadlock:
    seen as workers that never exit, stuck in grpc Channel._close."""

    def __del__(self) -> None:
        pass


def _array(tensor: TextTensor | Int32Tensor) -> np.ndarray:
    if tensor.datatype == "BYTES":
        return np.array([text.encode("utf-8") for text in tensor.values], dtype=np.object_).reshape(tensor.shape)
    return np.array(tensor.values, dtype=np.int32).reshape(tensor.shape)


class TritonGrpcUser(ScenarioUser, User):
    """tritonclient.grpc, one channel per user; --grpc-host is the gRPC endpoint (host:8001)."""

    abstract = True
    protocol = "grpc"

    def on_start(self) -> None:
        super().on_start()
        target = getattr(self.environment.parsed_options, "grpc_host", None) or "127.0.0.1:8001"
        self.grpc_client = _GrpcClient(target)
        self.metadata = {name.lower(): value for name, value in self.headers.items()} or None  # gRPC: lowercase

    def on_stop(self) -> None:
        if hasattr(self, "grpc_client"):  # on_start may have failed before creating it
            self.grpc_client.close()

    def send(self, call: Call) -> None:
        inputs = []
        for t in call.inputs:
            tensor = grpcclient.InferInput(t.name, list(t.shape), t.datatype)
            tensor.set_data_from_numpy(_array(t))
            inputs.append(tensor)
        start_time, start = time.time(), time.perf_counter()
        size, exception = 0, None
        try:
            result = self.grpc_client.infer(call.model, inputs, client_timeout=REQUEST_TIMEOUT_S, headers=self.metadata)
        except InferenceServerException as exc:  # its repr is empty: keep status and message for the report
            exception = GrpcError(f"{exc.status() or 'no status'}: {exc.message()}")
        response_time_ms = (time.perf_counter() - start) * 1000  # decoding and checking the answer are not part of it
        if exception is None:
            response = result.get_response()
            size = response.ByteSize()
            try:
                call.check({output.name: result.as_numpy(output.name) for output in response.outputs})
            except WrongAnswer as exc:
                exception = WrongAnswer(f"wrong answer: {exc}")
            except ValueError as exc:  # tensor contents that do not match their shape or dtype
                exception = WrongAnswer(f"malformed response: {exc}")
        self.environment.events.request.fire(
            request_type="grpc",
            name=f"grpc {call.name}",
            response_time=response_time_ms,
            response_length=size,
            response=None,
            context={},
            exception=exception,
            start_time=start_time,
            url=call.model,
        )
