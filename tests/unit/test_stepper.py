"""gateway.stepper: a coroutine run without a Task reports its end once, cancellation included."""

from __future__ import annotations

import asyncio

import pytest

from gateway.stepper import Stepper


async def test_runs_to_the_end_through_futures_and_bare_yields() -> None:
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[int] = loop.create_future()
    seen: list[object] = []
    ends: list[BaseException | None] = []

    async def body() -> None:
        await asyncio.sleep(0)  # a bare yield
        seen.append(await fut)
        seen.append("after")

    runner = Stepper(loop, body(), ends.append)
    runner.start()
    await asyncio.sleep(0.01)
    assert seen == [] and ends == []  # waiting on the future
    fut.set_result(7)
    await asyncio.sleep(0.01)
    assert seen == [7, "after"]
    assert ends == [None]


async def test_an_exception_is_reported_as_the_end() -> None:
    loop = asyncio.get_running_loop()
    ends: list[BaseException | None] = []

    async def body() -> None:
        await asyncio.sleep(0)
        raise ValueError("boom")

    Stepper(loop, body(), ends.append).start()
    await asyncio.sleep(0.01)
    assert len(ends) == 1 and isinstance(ends[0], ValueError)


async def test_cancel_runs_the_cleanup_and_reports_cancelled_error() -> None:
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[None] = loop.create_future()
    cleaned: list[bool] = []
    ends: list[BaseException | None] = []

    async def body() -> None:
        try:
            await fut
        finally:
            cleaned.append(True)

    runner = Stepper(loop, body(), ends.append)
    runner.start()
    await asyncio.sleep(0.01)
    runner.cancel()
    assert cleaned == [True]
    assert len(ends) == 1 and isinstance(ends[0], asyncio.CancelledError)
    fut.set_result(None)  # a late result resumes nothing
    await asyncio.sleep(0.01)
    assert len(ends) == 1


async def test_cancel_before_the_first_step_never_runs_it() -> None:
    loop = asyncio.get_running_loop()
    ran: list[bool] = []
    ends: list[BaseException | None] = []

    async def body() -> None:
        ran.append(True)

    runner = Stepper(loop, body(), ends.append)
    runner.start()
    runner.cancel()
    await asyncio.sleep(0.01)
    assert ran == [] and ends == []


@pytest.mark.parametrize("swallow", [False, True])
async def test_cleanup_that_waits_is_let_finish(swallow: bool) -> None:
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[None] = loop.create_future()
    steps: list[str] = []
    ends: list[BaseException | None] = []

    async def body() -> None:
        try:
            await fut
        except asyncio.CancelledError:
            await asyncio.sleep(0)  # cleanup that itself waits
            steps.append("cleaned")
            if not swallow:
                raise

    runner = Stepper(loop, body(), ends.append)
    runner.start()
    await asyncio.sleep(0.01)
    runner.cancel()
    await asyncio.sleep(0.01)
    assert steps == ["cleaned"]
    assert len(ends) == 1
    assert (ends[0] is None) if swallow else isinstance(ends[0], asyncio.CancelledError)
