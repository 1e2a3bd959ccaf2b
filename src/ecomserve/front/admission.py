"""Admission at the front: a budget of texts in flight, shared by every public model, and a short line before it.

Triton bounds `embed`'s queue, but `rank`, `classify` and `search` are python models without a
scheduler queue: under 200 clients they accepted everything and latency grew to a minute. All of
them spend the same encoders, so the front counts what each request asks of them (its BYTES
elements) and admits a request only while the total stays within the budget. What it admits waits
behind at most a budget's worth of texts, which bounds its latency. A single request larger than the
budget is still served when nothing else is in flight.

A request that does not fit waits in line, first come first served, for at most `max_wait_s`, and only
while the line holds at most `max_texts_waiting` texts; past either bound it is refused with 503 /
UNAVAILABLE. Refusing at once made clients that retry straight away (most load generators, many naive
clients) spend the front's CPU on refusals: 16 clients of `rank` 1 + 100 got half the texts/s of 4
(README, "Security and failure behaviour"). A short line keeps them waiting, not spinning."""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from ecomserve.front.kserve import BadRequest

RETRY_AFTER_S = 1


class Overloaded(BadRequest):
    def __init__(self, message: str):
        super().__init__(message, status=503)


@dataclass
class Admission:
    """Single-threaded (the front's event loop), so plain counters suffice."""

    max_texts_in_flight: int
    max_texts_waiting: int = 0
    max_wait_s: float = 0.0
    in_flight: int = 0
    waiting: int = 0
    refused: int = 0
    admitted: int = 0
    _line: deque[tuple[int, asyncio.Future[None]]] = field(default_factory=deque, init=False, repr=False)

    @asynccontextmanager
    async def admit(self, cost: int) -> AsyncIterator[None]:
        if self._line or not self._fits(cost):  # nobody jumps the line
            await self._wait_in_line(cost)
        else:
            self.in_flight += cost
        self.admitted += 1
        try:
            yield
        finally:
            self._release(cost)

    def _fits(self, cost: int) -> bool:
        return not self.in_flight or self.in_flight + cost <= self.max_texts_in_flight

    async def _wait_in_line(self, cost: int) -> None:
        """Returns once admitted (counted in flight); raises Overloaded if the line is full or the wait runs out."""
        if self.waiting + cost > self.max_texts_waiting or self.max_wait_s <= 0:
            raise self._refusal(cost, "")
        turn = asyncio.get_running_loop().create_future()
        entry = (cost, turn)
        self._line.append(entry)
        self.waiting += cost
        try:
            # shield: a timeout must not cancel a turn that was given in the same loop iteration
            await asyncio.wait_for(asyncio.shield(turn), self.max_wait_s)
        except TimeoutError:
            if not turn.done():  # else admitted just as the wait ended
                self._leave_line(entry)
                raise self._refusal(cost, f" after waiting {self.max_wait_s:g} s") from None
        except BaseException:  # the client went away
            if turn.done():
                self._release(cost)
            else:
                self._leave_line(entry)
            raise

    def _leave_line(self, entry: tuple[int, asyncio.Future[None]]) -> None:
        cost, turn = entry
        turn.cancel()
        self._line.remove(entry)
        self.waiting -= cost
        self._let_in()  # the next in line may fit where this one did not

    def _release(self, cost: int) -> None:
        self.in_flight -= cost
        self._let_in()

    def _let_in(self) -> None:
        while self._line and self._fits(self._line[0][0]):
            cost, turn = self._line.popleft()
            self.waiting -= cost
            self.in_flight += cost
            turn.set_result(None)

    def _refusal(self, cost: int, waited: str) -> Overloaded:
        self.refused += 1
        return Overloaded(
            f"server busy: {self.in_flight} texts in flight and {self.waiting} waiting, {cost} more would pass the "
            f"front's queue (serving.front.max_texts_in_flight {self.max_texts_in_flight}, max_texts_waiting "
            f"{self.max_texts_waiting}){waited}; retry after {RETRY_AFTER_S} s"
        )
