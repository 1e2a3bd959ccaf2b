"""Admission at the front: a budget of texts in flight, shared by every public model.

Triton bounds `embed`'s queue, but `rank`, `classify` and `search` are python models without a
scheduler queue: under 200 clients they accepted everything and latency grew to a minute. All of
them spend the same encoders, so the front counts what each request asks of them (its BYTES
elements) and refuses at once, with 503 / UNAVAILABLE, what would push the total past the budget.
What it accepts waits behind at most a budget's worth of texts, which bounds its latency. A single
request larger than the budget is still served when nothing else is in flight."""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

from ecomserve.front.kserve import BadRequest

RETRY_AFTER_S = 1


class Overloaded(BadRequest):
    def __init__(self, message: str):
        super().__init__(message, status=503)


@dataclass
class Admission:
    """Single-threaded (the front's event loop), so plain counters suffice."""

    max_texts_in_flight: int
    in_flight: int = 0
    refused: int = 0
    admitted: int = 0

    @contextmanager
    def admit(self, cost: int):
        if self.in_flight and self.in_flight + cost > self.max_texts_in_flight:
            self.refused += 1
            raise Overloaded(
                f"server busy: {self.in_flight} texts in flight, {cost} more would pass the front's queue "
                f"(serving.front.max_texts_in_flight {self.max_texts_in_flight}); retry after {RETRY_AFTER_S} s"
            )
        self.in_flight += cost
        self.admitted += 1
        try:
            yield
        finally:
            self.in_flight -= cost
