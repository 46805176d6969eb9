"""What the async client does differently from the sync one, beyond
``await``: ``_async.py`` imports these, and ``_sync.py`` (generated from
it by ``tools/gen_sync.py``) imports the same names from ``_io_sync.py``.

Here: callbacks may be coroutine functions; sleeping is ``asyncio.sleep``;
blocking file I/O runs in a thread; a background worker (``files.watch``)
is an asyncio task, stopped by cancelling it."""

from __future__ import annotations

import asyncio
import inspect
import os
import tempfile
from collections.abc import AsyncIterable, Awaitable, Callable, Coroutine, Iterable
from typing import IO, Any, TypeVar

from ._shared import WatchEvent, WorkspaceRunEvent

T = TypeVar("T")

#: Fetches one page of a list (from a cursor): its items and the next cursor.
PageFetch = Callable[[str | None], Awaitable[tuple[list[T], str | None]]]

#: A log callback: a plain function or a coroutine function.
Callback = Callable[[str], Any] | Callable[[str], Awaitable[Any]]
#: A rich-output callback of a Code Run (the output object), sync or async.
OutputCallback = Callable[[dict[str, Any]], Any] | Callable[[dict[str, Any]], Awaitable[Any]]
#: Called with each event of a Workspace Run as it arrives, sync or async.
EventCallback = Callable[[WorkspaceRunEvent], Any] | Callable[[WorkspaceRunEvent], Awaitable[Any]]
#: Called with each change under a watched directory, sync or async.
WatchCallback = Callable[[WatchEvent], Any] | Callable[[WatchEvent], Awaitable[Any]]
#: What ``files.write`` takes: text, bytes, a binary file (from its
#: position), or an (async) iterable of byte chunks.
FileData = str | bytes | bytearray | memoryview | IO[bytes] | Iterable[bytes] | AsyncIterable[bytes]


async def sleep(seconds: float) -> None:
    await asyncio.sleep(seconds)


async def call(callback: Callable[..., Any], *args: Any) -> None:
    """Calls ``callback``, awaiting what it returns when that is awaitable."""
    result = callback(*args)
    if inspect.isawaitable(result):
        await result


async def blocking(fn: Callable[..., T], *args: Any) -> T:
    """Runs blocking I/O (a file read) in a thread."""
    return await asyncio.to_thread(fn, *args)


async def spool(chunks: Iterable[bytes] | AsyncIterable[bytes]) -> tuple[IO[bytes], int]:
    """Copies chunks of unknown total size into a temporary file (so that
    a staged upload can name its size); returns it rewound, and the size."""
    f: IO[bytes] = tempfile.TemporaryFile()  # noqa: SIM115 (the caller closes it)
    size = 0
    try:
        if isinstance(chunks, AsyncIterable):
            async for chunk in chunks:
                size += await asyncio.to_thread(f.write, bytes(chunk))
        else:
            for chunk in chunks:
                size += await asyncio.to_thread(f.write, bytes(chunk))
        await asyncio.to_thread(f.seek, 0, os.SEEK_SET)
    except BaseException:
        f.close()
        raise
    return f, size


def is_chunk_source(data: Any) -> bool:
    """Whether ``data`` is an iterable of chunks this client can read
    (sync or async iterables), as opposed to a file object or bytes."""
    return isinstance(data, (Iterable, AsyncIterable)) and not isinstance(data, (str, bytes, bytearray, memoryview))


class Worker:
    """Runs ``target`` (a coroutine function) as a task of the running loop."""

    def __init__(self, target: Callable[[], Coroutine[Any, Any, None]], name: str) -> None:
        self._task: asyncio.Task[None] = asyncio.get_running_loop().create_task(target(), name=name)

    def running(self) -> bool:
        return not self._task.done()

    async def stop(self, interrupt: Callable[[], None]) -> None:
        """Cancels the task and waits for it (``interrupt`` is for the
        threaded worker, whose blocking read must be woken up; a task's
        await is simply cancelled)."""
        if asyncio.current_task() is self._task:
            return  # stopped from its own callback: it ends on its own
        self._task.cancel()
        try:
            await self._task
        except asyncio.CancelledError:
            pass
