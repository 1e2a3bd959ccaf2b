"""Abstract Locust user for ecomserve's HTTP API: ApiUser sends workload Calls to embed, rank, search and similar as
OpenAI's POST /v1/embeddings, Cohere's POST /v1/rerank and ecomserve's POST /v1/search and /v1/similar
(api_requests.py) through FastHttpUser, to --api-url.

It reports every request through Locust's request event with the name "api <call name>" (for example
"api embed query"), its response time, its size and, as a failure, any transport error, refusal (429 overload
named as such) or wrong answer; and, when --api-model is not given, one "api models" per user: the
GET /v1/models whose first id its requests then name."""

import locust  # noqa: F401  first: gevent monkey-patches the standard library before anything else imports it

# isort: split
from dataclasses import replace

from answers import WrongAnswer, check_api_models
from api_requests import API_SCENARIOS, MODELS_PATH, error_text, failure_message, from_call
from locust import FastHttpUser
from triton_users import REQUEST_TIMEOUT_S, ScenarioUser
from workload import Call, Workload

DEFAULT_API_URL = "http://127.0.0.1:8080"


class ApiUser(ScenarioUser, FastHttpUser):
    """The API on --api-url (http://host:8080), not --host; `Authorization: Bearer $ECOMSERVE_API_KEY` when set
    (ScenarioUser reads it)."""

    abstract = True
    protocol = "api"
    scenarios = API_SCENARIOS
    network_timeout = REQUEST_TIMEOUT_S
    connection_timeout = REQUEST_TIMEOUT_S

    def __init__(self, environment):
        # FastHttpUser builds its client on self.host, which Locust sets on every class from --host (Triton's HTTP
        # endpoint): the instance's own, set first, wins.
        self.host = (getattr(environment.parsed_options, "api_url", None) or DEFAULT_API_URL).rstrip("/")
        super().__init__(environment)

    def on_start(self) -> None:
        super().on_start()
        # Unique texts always: the API answers through embed's response cache, and a cached answer proves nothing.
        self.workload = Workload(replace(self.workload.settings, unique_texts=True))
        options = self.environment.parsed_options
        self.model = getattr(options, "api_model", "") or None
        self.encoding_format = getattr(options, "api_encoding_format", "float")

    def send(self, call: Call) -> None:
        model = self.model or self._listed_model()
        if model is None:
            return  # the listing failed, and was reported
        request = from_call(call, model, self.encoding_format)
        with self.client.post(
            request.path,
            json=request.body,
            headers=dict(self.headers),  # FastHttpSession adds its own headers to the dict it is given
            name=f"api {request.name}",
            catch_response=True,
        ) as response:
            self._check(response, request.check)

    def _listed_model(self) -> str | None:
        """The first model GET /v1/models lists, kept for the user's later requests."""
        with self.client.get(MODELS_PATH, headers=dict(self.headers), name="api models", catch_response=True) as r:
            ids = self._check(r, check_api_models)
        if ids:
            self.model = ids[0]
        return self.model

    def _check(self, response, check):
        """check(the JSON answer), or the response marked failed and None."""
        if response.status_code != 200:
            response.failure(self._refusal(response))
            return None
        try:
            return check(response.json())
        except WrongAnswer as exc:
            response.failure(f"wrong answer: {exc}")
        except (ValueError, TypeError) as exc:  # not JSON
            response.failure(f"malformed response: {type(exc).__name__}: {exc}")
        return None

    def _refusal(self, response) -> str:
        if response.status_code == 0:  # no HTTP answer at all: connection refused, timeout …
            return str(response.error)
        retry_after = response.headers.get("retry-after") if response.headers else None
        return failure_message(response.status_code, error_text(response.text), retry_after, bool(self.headers))
