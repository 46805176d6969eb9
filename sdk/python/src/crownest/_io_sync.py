"""What the sync client does differently from the async one: the same
names as ``_io_async.py``, for ``_sync.py`` (generated from ``_async.py``
by ``tools/gen_sync.py``).

Here: callbacks are plain functions; sleeping is ``time.sleep``; blocking
file I/O runs in place; a background worker (``files.watch``) is a daemon
thread, stopped by shutting its connection's socket down (a blocked read
on a closed socket would not wake up) and joining it."""

from __future__ import annotations

import os
import tempfile
import threading
import time
from collections.abc import Callable, Iterable
from typing import IO, Any, TypeVar

from ._shared import WatchEvent, WorkspaceRunEvent

T = TypeVar("T")

#: Fetches one page of a list (from a cursor): its items and the next cursor.
PageFetch = Callable[[str | None], tuple[list[T], str | None]]

Callback = Callable[[str], Any]
OutputCallback = Callable[[dict[str, Any]], Any]
#: Called with each event of a Workspace Run as it arrives.
EventCallback = Callable[[WorkspaceRunEvent], Any]
#: Called, from the watch's thread, with each change under a watched directory.
WatchCallback = Callable[[WatchEvent], Any]
#: What ``files.write`` takes: text, bytes, a binary file (from its
#: position), or an iterable of byte chunks.
FileData = str | bytes | bytearray | memoryview | IO[bytes] | Iterable[bytes]

#: How long ``Worker.stop`` waits for the thread after waking it.
_JOIN_TIMEOUT = 10.0


def sleep(seconds: float) -> None:
    time.sleep(seconds)


def call(callback: Callable[..., Any], *args: Any) -> None:
    callback(*args)


def blocking(fn: Callable[..., T], *args: Any) -> T:
    return fn(*args)


def spool(chunks: Iterable[bytes]) -> tuple[IO[bytes], int]:
    """Copies chunks of unknown total size into a temporary file (so that
    a staged upload can name its size); returns it rewound, and the size."""
    f: IO[bytes] = tempfile.TemporaryFile()  # noqa: SIM115 (the caller closes it)
    size = 0
    try:
        for chunk in chunks:
            size += f.write(bytes(chunk))
        f.seek(0, os.SEEK_SET)
    except BaseException:
        f.close()
        raise
    return f, size


def is_chunk_source(data: Any) -> bool:
    """Whether ``data`` is an iterable of chunks (not a file object or bytes)."""
    return isinstance(data, Iterable) and not isinstance(data, (str, bytes, bytearray, memoryview))


class Worker:
    """Runs ``target`` in a daemon thread."""

    def __init__(self, target: Callable[[], None], name: str) -> None:
        self._thread = threading.Thread(target=target, name=name, daemon=True)
        self._thread.start()

    def running(self) -> bool:
        return self._thread.is_alive()

    def stop(self, interrupt: Callable[[], None]) -> None:
        """Wakes the thread's blocking read with ``interrupt`` and waits
        for it to end (not when called from the thread itself, e.g. from
        its own callback)."""
        interrupt()
        if threading.current_thread() is not self._thread:
            self._thread.join(_JOIN_TIMEOUT)
