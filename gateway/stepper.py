"""Running a coroutine without an asyncio Task.

A Task costs a context, a scheduling round per step and a done-callback list; the
proxy's exchanges and the front end's accounting steps need none of that. A
`Stepper` resumes its coroutine from the done callback of the future it waits on,
and reports the end once (`on_end(None)`, or the exception it ended with).
It must only drive code that does not need `asyncio.current_task()` (no
`asyncio.timeout`, no `asyncio.wait_for`): that code gets its own Task.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any


class Stepper:
    __slots__ = ("cancelled", "coro", "loop", "on_end", "waited")

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        coro: Coroutine[Any, Any, Any],
        on_end: Callable[[BaseException | None], None],
    ) -> None:
        self.loop = loop
        self.coro = coro
        self.on_end = on_end
        self.waited: Any = None
        self.cancelled = False

    def start(self) -> None:
        """Run the first step in the next loop turn (never from inside the caller's callback)."""
        self.loop.call_soon(self.step)

    def step(self, _: object = None) -> None:
        if self.cancelled:
            return
        self.waited = None
        try:
            waited = self.coro.send(None)
        except StopIteration:
            self.on_end(None)
            return
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as exc:
            self.on_end(exc)
            return
        self._wait(waited)

    def _wait(self, waited: Any) -> None:
        if waited is None:  # a bare yield: go on in the next loop turn
            self.loop.call_soon(self.step)
        else:
            waited._asyncio_future_blocking = False  # what a Task does with the future it is given
            self.waited = waited
            waited.add_done_callback(self.step)

    def cancel(self) -> None:
        """Raise CancelledError where the coroutine waits (its cleanup runs); its end is reported."""
        waited = self.waited
        self.cancelled = True
        if waited is None:
            self.coro.close()  # not started yet (or finished): it never runs
            return
        waited.remove_done_callback(self.step)
        self.waited = None
        try:
            waited = self.coro.throw(asyncio.CancelledError())
        except StopIteration:
            self.on_end(None)
            return
        except BaseException as exc:
            self.on_end(exc)
            return
        # Still cleaning up (it should not wait, but if it does, let it finish).
        self.cancelled = False
        self._wait(waited)


__all__ = ["Stepper"]
