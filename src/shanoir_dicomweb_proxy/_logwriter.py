"""Lines queued by the event loop and written by a thread of their own, a batch at a time.

The log and the audit log both go through :class:`BatchedWriter`: a request pays for an append
to a deque, never for formatting or a write. The thread wakes on a clock, not per line: woken
per line it contended for the GIL with the event loop (logging's ``QueueListener`` cost 12-20 %
of the proxy's time on small requests).

Worker processes share their stderr (and may share the audit log). A write to a pipe of at most
``PIPE_BUF`` bytes is never interleaved with another process's; a longer one may be, when the
pipe is full and its reader slow. So each write holds whole lines and, unless one line alone is
longer, at most ``PIPE_BUF`` bytes: several lines per system call, none cut in two.
"""

from __future__ import annotations

import collections
import logging
import select
import threading
from collections.abc import Callable
from typing import Generic, TypeVar

__all__ = ["FLUSH_SECONDS", "BatchedWriter"]

#: How often the writer thread writes what was queued meanwhile.
FLUSH_SECONDS = 0.1

#: The most a write may hold and still never be interleaved with another process's.
_ATOMIC_BYTES = select.PIPE_BUF

T = TypeVar("T")

_logger = logging.getLogger(__name__)


class BatchedWriter(Generic[T]):
    """Items put by any thread; every ``FLUSH_SECONDS``, and at :meth:`close`, a thread renders
    what was queued (``render``: the text of one item, whole lines; ``None`` to drop it) and
    hands it to ``write`` in pieces of whole items, each at most ``PIPE_BUF`` bytes.

    Until :meth:`start`, items are only queued: :meth:`close` still writes them. A closed
    writer may be started again.
    """

    def __init__(
        self,
        render: Callable[[T], str | None],
        write: Callable[[str], None],
        *,
        name: str,
        start: bool = True,
    ) -> None:
        self._render = render
        self._write_text = write
        self._queued: collections.deque[T] = collections.deque()
        self._lock = threading.Lock()  # close() writes too, in case the thread did not end
        self._name = name
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if start:
            self.start()

    @property
    def running(self) -> bool:
        """Whether the writer thread runs (not before :meth:`start`, nor after :meth:`close`)."""
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> None:
        if not self.running:
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
            self._thread.start()

    def put(self, item: T) -> None:
        self._queued.append(item)  # deque.append is atomic: no lock on the request path

    def _run(self) -> None:
        while not self._stop.wait(FLUSH_SECONDS):
            try:
                self.write()
            except Exception:  # the thread must go on, or the queue only grows
                _logger.exception("the %s thread could not write a batch", self._name)

    def write(self) -> None:
        """Write what is queued now (the thread does, every ``FLUSH_SECONDS``)."""
        queued, render = self._queued, self._render
        with self._lock:
            parts: list[str] = []
            size = 0
            while queued:
                text = render(queued.popleft())
                if text is None:
                    continue
                length = len(text) if text.isascii() else len(text.encode())
                if parts and size + length > _ATOMIC_BYTES:
                    self._write_text("".join(parts))
                    parts, size = [], 0
                parts.append(text)
                size += length
            if parts:
                self._write_text("".join(parts))

    def close(self) -> None:
        """Stop the thread, then write what is left."""
        self._stop.set()
        thread = self._thread
        if thread is not None and thread.is_alive() and thread is not threading.current_thread():
            thread.join(5)
        self.write()
