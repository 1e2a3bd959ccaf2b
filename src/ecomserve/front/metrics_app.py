"""The public metrics port: Triton's Prometheus metrics, read from its private socket, followed by
the front's own counters. Triton's metrics server is not exposed itself, so a connection flood on
this port meets the front's limits, not Triton's file descriptors."""

from __future__ import annotations

from dataclasses import dataclass

import aiohttp
from starlette.requests import Request
from starlette.responses import Response

from ecomserve.front.admission import Admission
from ecomserve.front.api.context import ApiCounters
from ecomserve.front.connections import closed_over_limit
from ecomserve.front.responses import error_response

CONTENT_TYPE = "text/plain; version=0.0.4"


def front_metrics(admission: Admission) -> str:
    counters = [
        ("ecomserve_front_admitted_total", "counter", "inference requests admitted", admission.admitted),
        ("ecomserve_front_refused_total", "counter", "inference requests refused as overload", admission.refused),
        ("ecomserve_front_texts_in_flight", "gauge", "texts admitted and not yet answered", admission.in_flight),
        ("ecomserve_front_texts_waiting", "gauge", "texts waiting in line for admission", admission.waiting),
        ("ecomserve_front_connections_closed_over_limit_total", "counter",
         "HTTP connections closed at once because max_connections were open", closed_over_limit()),
    ]  # fmt: skip
    return "".join(
        f"# HELP {name} {text}\n# TYPE {name} {kind}\n{name} {value}\n" for name, kind, text, value in counters
    )


@dataclass
class MetricsFront:
    metrics_socket: str
    admission: Admission
    api: ApiCounters | None = None  # the HTTP API's counters, when it runs

    async def open(self) -> None:
        connector = aiohttp.UnixConnector(path=self.metrics_socket, limit=4)
        self._session = aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=10))

    async def close(self) -> None:
        await self._session.close()

    async def handle(self, request: Request) -> Response:
        if request.url.path != "/metrics" or request.method not in ("GET", "HEAD"):
            return error_response("the metrics port serves GET /metrics only", 404)
        try:
            async with self._session.get("http://triton/metrics") as upstream:
                triton = await upstream.text()
        except (aiohttp.ClientError, TimeoutError):
            triton = "# tritonserver's metrics are unavailable (starting or restarting)\n"
        api = self.api.prometheus() if self.api else ""
        return Response(triton + front_metrics(self.admission) + api, media_type=CONTENT_TYPE)
