"""One daemon thread that runs file reads and writes in order, off the event loop.

Not a ThreadPoolExecutor: its workers are joined when the interpreter exits (and asyncio.run
joins the loop's default executor), so one read hung on a dead mount (a FUSE or NFS file system
that no longer answers) would keep the whole daemon from stopping. A daemon thread is left
behind instead; only the kernel holds it, until the mount answers.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from concurrent.futures import Executor, Future
from functools import partial
from typing import Any, TypeVar

T = TypeVar("T")


class IoThread(Executor):
    """One daemon thread running submitted calls in order; never joined."""

    def __init__(self, name: str) -> None:
        self._calls: queue.SimpleQueue[tuple[Future[Any], Callable[[], Any]] | None] = (
            queue.SimpleQueue()
        )
        self._closed = False
        threading.Thread(target=self._serve, name=name, daemon=True).start()

    def submit(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> Future[T]:
        if self._closed:
            raise RuntimeError(f"{self!r} was shut down")
        future: Future[T] = Future()
        self._calls.put((future, partial(fn, *args, **kwargs)))
        return future

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Let the thread end after the call it runs now (``wait`` is ignored: never joined)."""
        self._closed = True
        if cancel_futures:
            while True:
                try:
                    item = self._calls.get_nowait()
                except queue.Empty:
                    break
                if item is not None:
                    item[0].cancel()
        self._calls.put(None)

    def _serve(self) -> None:
        while (item := self._calls.get()) is not None:
            future, call = item
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(call())
            except BaseException as exc:  # handed to the caller, as an executor does
                future.set_exception(exc)
