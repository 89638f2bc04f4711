"""The body reads' deadline: ``asyncio.timeout`` on Python 3.11+, the stand-in on 3.10.

Both must behave alike where the server relies on them: another task (the drain) moves a
deadline to now and the block raises a timeout in its own task, and a cancellation the deadline
did not cause stays a cancellation. CI runs these on both versions (.ci/run).
"""

from __future__ import annotations

import asyncio

import pytest

from vision_server.api.deadlines import Deadline, deadline


async def test_the_block_times_out_at_its_deadline() -> None:
    with pytest.raises(asyncio.TimeoutError):
        async with deadline(0.01) as moving:
            await asyncio.Event().wait()
    assert moving.expired()


async def test_another_task_moving_the_deadline_to_now_ends_the_block_not_itself() -> None:
    entered = asyncio.Event()
    held: list[Deadline] = []

    async def reading() -> str:
        async with deadline(3600) as moving:
            held.append(moving)
            entered.set()
            await asyncio.Event().wait()
        return "never"

    reader = asyncio.ensure_future(reading())
    await entered.wait()
    loop = asyncio.get_running_loop()
    held[0].reschedule(loop.time())  # what Uploads.cut_short does, from the drain's task
    with pytest.raises(asyncio.TimeoutError):
        await reader
    assert held[0].expired()
    await asyncio.sleep(0)  # this task was not cancelled along the way


async def test_a_block_that_ends_in_time_leaves_no_timer_behind() -> None:
    async with deadline(None) as moving:
        assert moving.when() is None
        soon = asyncio.get_running_loop().time() + 0.01
        moving.reschedule(soon)
        assert moving.when() == soon
    await asyncio.sleep(0.05)  # a timer left behind would cancel this task here
    assert not moving.expired()


async def test_a_cancellation_before_the_deadline_stays_a_cancellation() -> None:
    entered = asyncio.Event()

    async def reading() -> None:
        async with deadline(3600):
            entered.set()
            await asyncio.Event().wait()

    reader = asyncio.ensure_future(reading())
    await entered.wait()
    reader.cancel()
    with pytest.raises(asyncio.CancelledError):
        await reader


async def test_an_expired_deadline_cannot_be_moved() -> None:
    """``Uploads.cut_short`` skips those: a body whose time ran out ends as a timeout."""
    with pytest.raises(asyncio.TimeoutError):
        async with deadline(0) as moving:
            await asyncio.sleep(1)
    assert moving.expired()
    with pytest.raises(RuntimeError):
        moving.reschedule(None)
