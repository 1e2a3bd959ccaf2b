"""What every endpoint shares: the models, the text rules, the served model's id, the API's counters."""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

from ecomserve.front.api.errors import ApiError, Reason
from ecomserve.front.api.texts import TextRules
from ecomserve.front.api.triton import TritonModels
from ecomserve.spec import PipelineSpec


def model_id(spec: PipelineSpec) -> str:
    """The id clients name the pipeline by: its one encoder's model (all-MiniLM-L6-v2 for the default),
    or its encoders' names joined with '+'."""
    if len(spec.encoders) > 1:
        return "+".join(encoder.name for encoder in spec.encoders)
    source = spec.encoders[0].source
    return source.removeprefix("bundled:") if source.startswith("bundled:") else Path(source).name


@dataclass
class ApiCounters:
    """Requests and their time per endpoint, for the metrics port."""

    requests: Counter = field(default_factory=Counter)  # (endpoint, status) → count
    seconds: Counter = field(default_factory=Counter)  # endpoint → total seconds

    def record(self, endpoint: str, status: int, seconds: float) -> None:
        self.requests[endpoint, status] += 1
        self.seconds[endpoint] += seconds

    def prometheus(self) -> str:
        lines = [
            "# HELP ecomserve_api_requests_total HTTP API requests by endpoint and status",
            "# TYPE ecomserve_api_requests_total counter",
            *(
                f'ecomserve_api_requests_total{{endpoint="{endpoint}",code="{status}"}} {count}'
                for (endpoint, status), count in sorted(self.requests.items())
            ),
            "# HELP ecomserve_api_request_seconds_total time spent answering HTTP API requests, by endpoint",
            "# TYPE ecomserve_api_request_seconds_total counter",
            *(
                f'ecomserve_api_request_seconds_total{{endpoint="{endpoint}"}} {seconds:.6f}'
                for endpoint, seconds in sorted(self.seconds.items())
            ),
        ]
        return "\n".join(lines) + "\n"


@dataclass
class ApiContext:
    """`spec` is the repository's (its limits and encoders); `rules` hold the live release's tokenizers."""

    spec: PipelineSpec
    models: TritonModels
    rules: TextRules
    created: int = field(default_factory=lambda: int(time.time()))
    counters: ApiCounters = field(default_factory=ApiCounters)

    @cached_property
    def model_id(self) -> str:
        return model_id(self.spec)

    def check_model(self, given: str | None) -> None:
        """A request may name the model as its id, with an owner prefix (sentence-transformers/…), or not at all."""
        if given is None or given == self.model_id or given.endswith("/" + self.model_id):
            return
        raise ApiError(
            Reason.NOT_FOUND,
            f"model {given!r} not found; this server serves {self.model_id!r} (GET /v1/models)",
            "model",
        )

    async def check_dimensions(self, dimensions: int | None, param: str = "dimensions") -> None:
        if dimensions is not None and dimensions > (width := await self.models.width()):
            raise ApiError(Reason.INVALID, f"{param}: {dimensions} is more than the model's {width} dimensions", param)
