"""The one ASGI app behind the front's uvicorn server (one event loop, one signal handler): a request is
routed by the port it came in on — KServe v2 (HTTP port), the HTTP API (API port), metrics.

The KServe passthrough is the hot path, so this is plain ASGI with Starlette's Request and Response but
without its router and middleware stack."""

from __future__ import annotations

import logging
from typing import Protocol

from starlette.requests import Request
from starlette.responses import Response

from ecomserve.front.responses import error_response

log = logging.getLogger("ecomserve.front")


class Side(Protocol):
    """What serves one port: opened at startup, closed at shutdown."""

    async def open(self) -> None: ...

    async def close(self) -> None: ...

    async def handle(self, request: Request) -> Response: ...


class FrontApp:
    def __init__(self, sides: dict[int, Side]):
        self.sides = sides

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        request = Request(scope, receive)
        try:
            response = await self.sides[scope["server"][1]].handle(request)
        except Exception:  # a bug must cost one request a 500, never the connection or the process
            log.exception("request %s %s failed in the front", request.method, request.url.path)
            response = error_response("internal error in the front; see its log", 500)
        await response(scope, receive, send)

    async def _lifespan(self, receive, send) -> None:
        unique = list({id(side): side for side in self.sides.values()}.values())
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                for side in unique:
                    await side.open()
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                for side in reversed(unique):
                    await side.close()
                await send({"type": "lifespan.shutdown.complete"})
                return
