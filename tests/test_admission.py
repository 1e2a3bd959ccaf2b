"""The front's admission line on its own (the front's event loop, no server): who gets in, in which order, who is
refused and when, and that nothing is left counted when a wait ends early. Over a real server: test_overload.py."""

from __future__ import annotations

import asyncio
import time

import pytest

from ecomserve.front.admission import Admission, Overloaded


async def _hold(admission: Admission, cost: int, release: asyncio.Event, order: list[int] | None = None) -> None:
    async with admission.admit(cost):
        if order is not None:
            order.append(cost)
        await release.wait()


def test_requests_that_do_not_fit_wait_their_turn_in_order():
    async def scenario():
        admission = Admission(max_texts_in_flight=10, max_texts_waiting=20, max_wait_s=5.0)
        first_done, order = asyncio.Event(), []
        holder = asyncio.create_task(_hold(admission, 8, first_done))
        await asyncio.sleep(0)
        go = asyncio.Event()
        go.set()
        # 5 and then 1: the 1 would fit now, but comes after the 5 in line.
        waiting = [asyncio.create_task(_hold(admission, cost, go, order)) for cost in (5, 1)]
        await asyncio.sleep(0.01)
        assert (admission.in_flight, admission.waiting, order) == (8, 6, [])
        first_done.set()
        await asyncio.gather(holder, *waiting)
        assert order == [5, 1]
        assert (admission.in_flight, admission.waiting, admission.admitted, admission.refused) == (0, 0, 3, 0)

    asyncio.run(scenario())


def test_a_full_line_refuses_at_once_and_a_long_wait_refuses_after_max_wait_s():
    async def scenario():
        admission = Admission(max_texts_in_flight=10, max_texts_waiting=6, max_wait_s=0.2)
        release = asyncio.Event()
        holder = asyncio.create_task(_hold(admission, 10, release))
        await asyncio.sleep(0)
        start = time.perf_counter()
        with pytest.raises(Overloaded, match="max_texts_waiting 6") as at_once:
            async with admission.admit(7):  # more than the line holds
                pass
        assert time.perf_counter() - start < 0.05 and at_once.value.status == 503
        with pytest.raises(Overloaded, match="after waiting 0.2 s"):
            async with admission.admit(3):
                pass
        assert 0.15 < time.perf_counter() - start < 1.0
        release.set()
        await holder
        assert (admission.in_flight, admission.waiting, admission.refused) == (0, 0, 2)

    asyncio.run(scenario())


def test_a_client_that_leaves_the_line_lets_the_next_one_in():
    async def scenario():
        admission = Admission(max_texts_in_flight=10, max_texts_waiting=20, max_wait_s=5.0)
        release, go = asyncio.Event(), asyncio.Event()
        go.set()
        holder = asyncio.create_task(_hold(admission, 6, release))
        await asyncio.sleep(0)
        big = asyncio.create_task(_hold(admission, 9, go))  # waits for the holder to finish
        await asyncio.sleep(0)
        small = asyncio.create_task(_hold(admission, 3, go))  # fits now, but behind the big one
        await asyncio.sleep(0.01)
        assert not small.done()
        big.cancel()  # its client went away
        await asyncio.wait_for(small, 1.0)
        assert (admission.in_flight, admission.waiting) == (6, 0)
        release.set()
        await holder
        assert (admission.in_flight, admission.waiting) == (0, 0)
        assert big.cancelled()

    asyncio.run(scenario())


def test_without_a_line_a_request_that_does_not_fit_is_refused_at_once():
    async def scenario():
        admission = Admission(max_texts_in_flight=4)
        release = asyncio.Event()
        holder = asyncio.create_task(_hold(admission, 4, release))
        await asyncio.sleep(0)
        with pytest.raises(Overloaded, match="server busy: 4 texts in flight"):
            async with admission.admit(1):
                pass
        release.set()
        await holder
        async with admission.admit(40):  # alone, a request over the budget is served
            assert admission.in_flight == 40
        assert admission.in_flight == 0

    asyncio.run(scenario())
