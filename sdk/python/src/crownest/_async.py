"""The asynchronous client: ``_sync.py`` with ``await``, method for method."""

from __future__ import annotations

import builtins
import asyncio
import inspect
import os
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Mapping, Sequence
from typing import IO, Any, Generic, TypeVar

import httpx

from ._archive import DIRECT_UPLOAD_MAX, PackedArchive, archive_source_size, pack_directory
from ._shared import (
    DEFAULT_MAX_RETRIES,
    DEFAULT_TIMEOUT,
    EVIDENCE_GRACE,
    OCTET_STREAM,
    CODE_STREAM_HEADERS,
    Artifact,
    Preview,
    CodeContext,
    CodeRunResult,
    FileInfo,
    FileListing,
    CollectSpec,
    CommandResult,
    CrowNestApiError,
    CrowNestConnectionError,
    CrowNestError,
    CrowNestTimeoutError,
    EvidenceBundle,
    LogEvent,
    Record,
    SSEDecoder,
    WorkspaceRun,
    WorkspaceRunEvent,
    WorkspaceRunEventPage,
    WorkspaceRunPage,
    WorkspaceRunResult,
    api_error_from_response,
    as_bytes,
    backoff_delay,
    code_context_body,
    code_event_from_sse,
    code_run_body,
    command_body,
    default_headers,
    event_stream_request,
    file_listing,
    log_event_from_sse,
    may_retry,
    may_retry_status,
    mkdir_body,
    move_body,
    new_idempotency_key,
    preview_id_of,
    preview_request,
    no_cookies,
    page_params,
    resolve_api_key,
    resolve_base_url,
    run_event_from_sse,
    run_event_page,
    run_event_params,
    run_id_of,
    network_body,
    sandbox_body,
    stdin_body,
    wait_poll_delay,
    workspace_run_body,
    workspace_run_list_params,
    workspace_run_page,
)

T = TypeVar("T")
#: A log callback may be a plain function or a coroutine function.
AsyncCallback = Callable[[str], Any] | Callable[[str], Awaitable[Any]]
#: A rich-output callback of a Code Run (the output object), sync or async.
AsyncOutputCallback = Callable[[dict[str, Any]], Any] | Callable[[dict[str, Any]], Awaitable[Any]]
#: Called with each event of a Workspace Run as it arrives, sync or async.
AsyncEventCallback = Callable[[WorkspaceRunEvent], Any] | Callable[[WorkspaceRunEvent], Awaitable[Any]]
#: An archive to upload: its bytes, a path to the ``.tar.gz``, or a binary file.
ArchiveSource = bytes | str | os.PathLike[str] | IO[bytes]
#: Chunk size of a streamed archive upload.
_UPLOAD_CHUNK = 1024 * 1024


async def _call(callback: AsyncCallback, data: str) -> None:
    result = callback(data)
    if inspect.isawaitable(result):
        await result


async def _call_output(callback: AsyncOutputCallback, data: dict[str, Any]) -> None:
    result = callback(data)
    if inspect.isawaitable(result):
        await result


class AsyncPager(Generic[T]):
    """``async for`` over every item of a paginated list, fetching pages lazily."""

    def __init__(self, fetch: Callable[[str | None], Awaitable[tuple[list[T], str | None]]]) -> None:
        self._fetch = fetch

    async def pages(self) -> AsyncIterator[list[T]]:
        cursor: str | None = None
        while True:
            items, cursor = await self._fetch(cursor)
            yield items
            if not cursor:
                return

    async def __aiter__(self) -> AsyncIterator[T]:
        async for page in self.pages():
            for item in page:
                yield item


class AsyncCrowNest:
    """Asynchronous CrowNest client; the same surface as :class:`CrowNest`
    with ``await`` (and ``async for`` for lists and logs)."""

    def __init__(
        self,
        api_key: str | None = None,
        base_url: str | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        *,
        max_retries: int = DEFAULT_MAX_RETRIES,
    ) -> None:
        self.base_url = resolve_base_url(base_url)
        self.timeout = timeout
        self.max_retries = max_retries
        self._http = httpx.AsyncClient(
            base_url=self.base_url,
            cookies=no_cookies(),
            headers=default_headers(resolve_api_key(api_key)),
            timeout=httpx.Timeout(timeout, connect=min(timeout, 10.0)),
        )
        self.sandboxes = AsyncSandboxes(self)
        self.artifacts = AsyncArtifacts(self)
        self.templates = AsyncTemplates(self)
        self.workspace_runs = AsyncWorkspaceRuns(self)

    # -- lifecycle

    async def close(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> AsyncCrowNest:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def health(self) -> Record:
        """``GET /v1/health``."""
        return Record(await self._request("GET", "/v1/health"))

    # -- transport

    async def _send(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        content: bytes | AsyncIterable[bytes] | None = None,
        params: Mapping[str, Any] | httpx.QueryParams | None = None,
        idempotency_key: str | None = None,
        headers: Mapping[str, str] | None = None,
        signed: bool = False,
    ) -> httpx.Response:
        """One API call, with retries. ``signed``: ``path`` is a signed
        transfer URL, sent once without the API key."""
        hdrs = dict(headers or {})
        if idempotency_key:
            hdrs["Idempotency-Key"] = idempotency_key
        attempt = 0
        while True:
            request = self._http.build_request(method, path, json=json, content=content, params=params, headers=hdrs)
            if signed:
                del request.headers["x-api-key"]
            try:
                response = await self._http.send(request)
            except httpx.TransportError as exc:
                retryable = not signed and may_retry(method, idempotency_key is not None, exc)
                if attempt >= self.max_retries or not retryable:
                    raise CrowNestConnectionError(f"{method} {request.url.path}: {exc!r}") from exc
                await asyncio.sleep(backoff_delay(attempt))
                attempt += 1
                continue
            if response.status_code >= 400:
                error = api_error_from_response(
                    response.status_code, response.content, response.headers.get("x-request-id")
                )
                if attempt < self.max_retries and may_retry_status(error, idempotency_key is not None):
                    await asyncio.sleep(backoff_delay(attempt))
                    attempt += 1
                    continue
                raise error
            return response

    async def _request(self, method: str, path: str, **kw: Any) -> Any:
        return (await self._send(method, path, **kw)).json()

    async def _page(self, path: str, limit: int | None, cursor: str | None) -> tuple[list[Any], str | None]:
        body = await self._request("GET", path, params=page_params(limit, cursor))
        return list(body["data"]), body.get("nextCursor")

    async def _log_stream(self, path: str, after: int | None) -> AsyncIterator[LogEvent]:
        last = after
        failures = 0
        while True:
            headers = {"accept": "text/event-stream"}
            if last is not None:
                headers["Last-Event-ID"] = str(last)
            try:
                async with self._http.stream("GET", path, headers=headers) as response:
                    if response.status_code >= 400:
                        await response.aread()
                        raise api_error_from_response(
                            response.status_code, response.content, response.headers.get("x-request-id")
                        )
                    decoder = SSEDecoder()
                    async for line in response.aiter_lines():
                        sse = decoder.feed(line)
                        if sse is None:
                            continue
                        event = log_event_from_sse(sse)
                        if event is None:
                            continue
                        failures = 0
                        if event.id is not None:
                            last = event.id
                        yield event
                        if event.type == "exit":
                            return
            except httpx.TransportError as exc:
                if not isinstance(exc, httpx.ReadTimeout):
                    if failures >= self.max_retries:
                        raise CrowNestConnectionError(f"GET {path}: {exc!r}") from exc
                    await asyncio.sleep(backoff_delay(failures))
                    failures += 1
                continue
            if failures >= self.max_retries:
                raise CrowNestConnectionError(f"GET {path}: the log stream ended before the exit event")
            await asyncio.sleep(backoff_delay(failures))
            failures += 1

    async def _run_events(self, run_id: str, after_seq: int) -> AsyncIterator[WorkspaceRunEvent]:
        """``_sync.CrowNest._run_events``: the run's SSE event log to its
        ``terminal`` event, resumed after a dropped connection, every
        ``seq`` once and in order."""
        path = f"/v1/workspace-runs/{run_id}/events"
        last = after_seq
        failures = 0
        while True:
            headers, params = event_stream_request(last)
            try:
                async with self._http.stream("GET", path, headers=headers, params=params) as response:
                    if response.status_code >= 400:
                        await response.aread()
                        raise api_error_from_response(
                            response.status_code, response.content, response.headers.get("x-request-id")
                        )
                    decoder = SSEDecoder()
                    async for line in response.aiter_lines():
                        sse = decoder.feed(line)
                        if sse is None:
                            continue
                        event = run_event_from_sse(sse, response.status_code)
                        if event is None or event.seq <= last:
                            continue
                        failures = 0
                        if event.seq > last + 1:
                            async for missing in self._run_events_between(path, last, event.seq):
                                last = missing.seq
                                yield missing
                        last = event.seq
                        yield event
                        if event.type == "terminal":
                            return
            except httpx.TransportError as exc:
                if not isinstance(exc, httpx.ReadTimeout):
                    if failures >= self.max_retries:
                        raise CrowNestConnectionError(f"GET {path}: {exc!r}") from exc
                    await asyncio.sleep(backoff_delay(failures))
                    failures += 1
                continue
            if failures >= self.max_retries:
                raise CrowNestConnectionError(f"GET {path}: the event stream ended before the terminal event")
            await asyncio.sleep(backoff_delay(failures))
            failures += 1

    async def _run_events_between(self, path: str, after: int, before: int) -> AsyncIterator[WorkspaceRunEvent]:
        while after + 1 < before:
            params = run_event_params(after, min(1000, before - after - 1))
            page = run_event_page(await self._request("GET", path, params=params), after)
            events = [e for e in page.data if after < e.seq < before]
            if not events or events[0].seq != after + 1:
                raise CrowNestError(f"GET {path}: the event log has no event {after + 1}")
            for event in events:
                if event.seq != after + 1:
                    raise CrowNestError(f"GET {path}: the event log has no event {after + 1}")
                after = event.seq
                yield event

    async def _code_stream(
        self,
        path: str,
        body: dict[str, Any],
        idempotency_key: str,
        on_stdout: AsyncCallback | None,
        on_stderr: AsyncCallback | None,
        on_output: AsyncOutputCallback | None,
    ) -> dict[str, Any]:
        headers = {**CODE_STREAM_HEADERS, "Idempotency-Key": idempotency_key}
        attempt = 0
        while True:
            try:
                async with self._http.stream("POST", path, json=body, headers=headers) as response:
                    if response.status_code >= 400:
                        await response.aread()
                        error = api_error_from_response(
                            response.status_code, response.content, response.headers.get("x-request-id")
                        )
                        if attempt < self.max_retries and may_retry_status(error, True):
                            await asyncio.sleep(backoff_delay(attempt))
                            attempt += 1
                            continue
                        raise error
                    decoder = SSEDecoder()
                    async for line in response.aiter_lines():
                        sse = decoder.feed(line)
                        if sse is None:
                            continue
                        event = code_event_from_sse(sse, response.status_code)
                        if event is None:
                            continue
                        kind, payload = event
                        if kind == "stdout" and on_stdout:
                            await _call(on_stdout, payload)
                        elif kind == "stderr" and on_stderr:
                            await _call(on_stderr, payload)
                        elif kind == "output" and on_output:
                            await _call_output(on_output, payload)
                        elif kind == "complete":
                            return dict(payload)
            except httpx.TransportError as exc:
                if attempt >= self.max_retries or not may_retry("POST", True, exc):
                    raise CrowNestConnectionError(f"POST {path}: {exc!r}") from exc
                await asyncio.sleep(backoff_delay(attempt))
                attempt += 1
                continue
            if attempt >= self.max_retries:
                raise CrowNestConnectionError(f"POST {path}: the run stream ended before its complete event")
            await asyncio.sleep(backoff_delay(attempt))
            attempt += 1


# ---------------------------------------------------------------- sandboxes


class AsyncSandboxHandle(Record):
    """A sandbox with its bound sub-clients ``.commands``, ``.code``, ``.files``, ``.artifacts`` and ``.previews``."""

    def __init__(self, client: AsyncCrowNest, data: Mapping[str, Any]) -> None:
        super().__init__(data)
        self._client = client
        self.commands = AsyncCommands(client, self.id)
        self.code = AsyncCode(client, self.id)
        self.artifacts = AsyncSandboxArtifacts(client, self.id)
        self.files = AsyncFiles(client, self.id)
        self.previews = AsyncPreviews(client, self.id)

    @property
    def id(self) -> str:
        return str(self._data["id"])

    @property
    def status(self) -> str:
        return str(self._data["status"])

    async def refresh(self) -> AsyncSandboxHandle:
        self._data = await self._client._request("GET", f"/v1/sandboxes/{self.id}")
        return self

    async def kill(self) -> AsyncSandboxHandle:
        self._data = await self._client._request("DELETE", f"/v1/sandboxes/{self.id}")
        return self

    async def set_network(
        self,
        *,
        mode: str | None = None,
        allow: Sequence[str] | None = None,
        deny: Sequence[str] | None = None,
    ) -> AsyncSandboxHandle:
        """Narrows the sandbox's egress policy within its template's
        (``PATCH /v1/sandboxes/{id}/network``, scope ``sandboxes:network``);
        new connections follow it at once. Wider than the template is
        ``network_policy_too_wide``."""
        self._data = await self._client._request(
            "PATCH", f"/v1/sandboxes/{self.id}/network", json=network_body(mode, allow, deny)
        )
        return self


class AsyncSandboxes:
    def __init__(self, client: AsyncCrowNest) -> None:
        self._client = client

    async def create(
        self,
        template: str,
        *,
        ttl_ms: int | None = None,
        metadata: Mapping[str, Any] | None = None,
        network: Mapping[str, Any] | None = None,
        env: Mapping[str, str] | None = None,
        idempotency_key: str | None = None,
    ) -> AsyncSandboxHandle:
        data = await self._client._request(
            "POST",
            "/v1/sandboxes",
            json=sandbox_body(template, ttl_ms, metadata, network, env),
            idempotency_key=idempotency_key or new_idempotency_key(),
        )
        return AsyncSandboxHandle(self._client, data)

    async def get(self, sandbox_id: str) -> AsyncSandboxHandle:
        return AsyncSandboxHandle(self._client, await self._client._request("GET", f"/v1/sandboxes/{sandbox_id}"))

    def list(self, *, limit: int | None = None) -> AsyncPager[AsyncSandboxHandle]:
        async def fetch(cursor: str | None) -> tuple[list[AsyncSandboxHandle], str | None]:
            items, nxt = await self._client._page("/v1/sandboxes", limit, cursor)
            return [AsyncSandboxHandle(self._client, d) for d in items], nxt

        return AsyncPager(fetch)


# ---------------------------------------------------------------- commands


class AsyncCommandHandle(CommandResult):
    def __init__(self, client: AsyncCrowNest, data: Mapping[str, Any]) -> None:
        super().__init__(data)
        self._client = client

    @property
    def _path(self) -> str:
        return f"/v1/sandboxes/{self._data['sandboxId']}/commands/{self.id}"

    async def refresh(self) -> AsyncCommandHandle:
        self._data = await self._client._request("GET", self._path)
        return self

    def logs(self, *, after: int | None = None) -> AsyncIterator[LogEvent]:
        """``async for`` over the log: stdout/stderr events, then ``exit``."""
        return self._client._log_stream(f"{self._path}/logs", after)

    async def wait(
        self, *, on_stdout: AsyncCallback | None = None, on_stderr: AsyncCallback | None = None
    ) -> CommandResult:
        if self.status == "running" or on_stdout or on_stderr:
            async for event in self.logs():
                if event.type == "stdout" and on_stdout:
                    await _call(on_stdout, event.data)
                elif event.type == "stderr" and on_stderr:
                    await _call(on_stderr, event.data)
        await self.refresh()
        return CommandResult(self._data)

    async def send_stdin(self, data: str | bytes | None = None, *, close: bool = False) -> AsyncCommandHandle:
        self._data = await self._client._request("POST", f"{self._path}/stdin", json=stdin_body(data, close))
        return self

    async def signal(self, signal: str | int) -> AsyncCommandHandle:
        self._data = await self._client._request("POST", f"{self._path}/signal", json={"signal": str(signal)})
        return self

    async def cancel(self) -> AsyncCommandHandle:
        self._data = await self._client._request("POST", f"{self._path}/cancel")
        return self


class AsyncCommands:
    def __init__(self, client: AsyncCrowNest, sandbox_id: str) -> None:
        self._client = client
        self._sandbox_id = sandbox_id

    async def run(
        self,
        command: str,
        *,
        cwd: str | None = None,
        env: Mapping[str, str] | None = None,
        timeout_ms: int | None = None,
        collect: list[CollectSpec] | None = None,
        on_stdout: AsyncCallback | None = None,
        on_stderr: AsyncCallback | None = None,
        idempotency_key: str | None = None,
    ) -> CommandResult:
        key = idempotency_key or new_idempotency_key()
        if on_stdout is None and on_stderr is None:
            body = command_body(
                command, cwd=cwd, env=env, timeout_ms=timeout_ms, collect=collect, background=False, stdin=False
            )
            data = await self._client._request(
                "POST", f"/v1/sandboxes/{self._sandbox_id}/commands", json=body, idempotency_key=key
            )
            return CommandResult(data)
        handle = await self.start(
            command, cwd=cwd, env=env, timeout_ms=timeout_ms, collect=collect, idempotency_key=key
        )
        return await handle.wait(on_stdout=on_stdout, on_stderr=on_stderr)

    async def start(
        self,
        command: str,
        *,
        cwd: str | None = None,
        env: Mapping[str, str] | None = None,
        timeout_ms: int | None = None,
        collect: list[CollectSpec] | None = None,
        stdin: bool = False,
        idempotency_key: str | None = None,
    ) -> AsyncCommandHandle:
        body = command_body(
            command, cwd=cwd, env=env, timeout_ms=timeout_ms, collect=collect, background=True, stdin=stdin
        )
        data = await self._client._request(
            "POST",
            f"/v1/sandboxes/{self._sandbox_id}/commands",
            json=body,
            idempotency_key=idempotency_key or new_idempotency_key(),
        )
        return AsyncCommandHandle(self._client, data)

    async def get(self, command_id: str) -> AsyncCommandHandle:
        data = await self._client._request("GET", f"/v1/sandboxes/{self._sandbox_id}/commands/{command_id}")
        return AsyncCommandHandle(self._client, data)

    def list(self, *, limit: int | None = None) -> AsyncPager[AsyncCommandHandle]:
        async def fetch(cursor: str | None) -> tuple[list[AsyncCommandHandle], str | None]:
            items, nxt = await self._client._page(f"/v1/sandboxes/{self._sandbox_id}/commands", limit, cursor)
            return [AsyncCommandHandle(self._client, d) for d in items], nxt

        return AsyncPager(fetch)


# ---------------------------------------------------------------- code


class AsyncCode:
    """Code Contexts and Code Runs of the sandbox; see :class:`crownest.Code`."""

    def __init__(self, client: AsyncCrowNest, sandbox_id: str) -> None:
        self._client = client
        self._base = f"/v1/sandboxes/{sandbox_id}/code"

    async def create_context(
        self, language: str = "python", *, cwd: str | None = None, env: Mapping[str, str] | None = None
    ) -> CodeContext:
        body = code_context_body(language, cwd, env)
        return CodeContext(await self._client._request("POST", f"{self._base}/contexts", json=body))

    async def list_contexts(self) -> list[CodeContext]:
        body = await self._client._request("GET", f"{self._base}/contexts")
        return [CodeContext(c) for c in body["data"]]

    async def get_context(self, context_id: str) -> CodeContext:
        return CodeContext(await self._client._request("GET", f"{self._base}/contexts/{context_id}"))

    async def delete_context(self, context_id: str | Mapping[str, Any]) -> None:
        cid = context_id if isinstance(context_id, str) else str(context_id["id"])
        await self._client._send("DELETE", f"{self._base}/contexts/{cid}")

    async def run(
        self,
        code: str,
        *,
        language: str = "python",
        context_id: str | Mapping[str, Any] | None = None,
        on_stdout: AsyncCallback | None = None,
        on_stderr: AsyncCallback | None = None,
        on_output: AsyncOutputCallback | None = None,
        artifact_policy: str | None = None,
        timeout_ms: int | None = None,
        idempotency_key: str | None = None,
    ) -> CodeRunResult:
        """Runs a snippet in a Code Context; streamed to the callbacks
        (plain or coroutine functions) when any is given."""
        body = code_run_body(
            code, language=language, context_id=context_id, artifact_policy=artifact_policy, timeout_ms=timeout_ms
        )
        key = idempotency_key or new_idempotency_key()
        path = f"{self._base}/runs"
        if on_stdout is None and on_stderr is None and on_output is None:
            return CodeRunResult(await self._client._request("POST", path, json=body, idempotency_key=key))
        return CodeRunResult(await self._client._code_stream(path, body, key, on_stdout, on_stderr, on_output))


# ---------------------------------------------------------------- artifacts


class AsyncSandboxArtifacts:
    def __init__(self, client: AsyncCrowNest, sandbox_id: str) -> None:
        self._client = client
        self._sandbox_id = sandbox_id

    async def create(self, path: str, *, name: str | None = None, idempotency_key: str | None = None) -> Artifact:
        body: dict[str, Any] = {"path": path}
        if name is not None:
            body["name"] = name
        data = await self._client._request(
            "POST",
            f"/v1/sandboxes/{self._sandbox_id}/artifacts",
            json=body,
            idempotency_key=idempotency_key or new_idempotency_key(),
        )
        return Artifact(data)

    def list(self, *, limit: int | None = None) -> AsyncPager[Artifact]:
        async def fetch(cursor: str | None) -> tuple[list[Artifact], str | None]:
            items, nxt = await self._client._page(f"/v1/sandboxes/{self._sandbox_id}/artifacts", limit, cursor)
            return [Artifact(d) for d in items], nxt

        return AsyncPager(fetch)


class AsyncArtifacts:
    def __init__(self, client: AsyncCrowNest) -> None:
        self._client = client

    async def get(self, artifact_id: str) -> Artifact:
        return Artifact(await self._client._request("GET", f"/v1/artifacts/{artifact_id}"))

    def list(self, *, limit: int | None = None) -> AsyncPager[Artifact]:
        async def fetch(cursor: str | None) -> tuple[list[Artifact], str | None]:
            items, nxt = await self._client._page("/v1/artifacts", limit, cursor)
            return [Artifact(d) for d in items], nxt

        return AsyncPager(fetch)

    async def download(self, artifact_id: str) -> bytes:
        return (await self._client._send("GET", f"/v1/artifacts/{artifact_id}/content")).content


# ---------------------------------------------------------------- files


class AsyncFiles:
    """Files of the sandbox's /workspace; paths are relative to /workspace
    or absolute under it."""

    def __init__(self, client: AsyncCrowNest, sandbox_id: str) -> None:
        self._client = client
        self._base = f"/v1/sandboxes/{sandbox_id}/files"

    async def write(self, path: str, data: str | bytes) -> FileInfo:
        """Writes a whole file (str is UTF-8 encoded; at most 32 MiB, larger
        files: ``upload``). Missing parent directories are created."""
        response = await self._client._send(
            "PUT", self._base, params={"path": path}, content=as_bytes(data), headers=OCTET_STREAM
        )
        return FileInfo(response.json())

    async def read(self, path: str) -> bytes:
        """A file's bytes."""
        return (await self._client._send("GET", self._base, params={"path": path})).content

    async def read_text(self, path: str, encoding: str = "utf-8") -> str:
        return (await self.read(path)).decode(encoding)

    async def delete(self, path: str, *, recursive: bool = False) -> None:
        """Removes a file, a symlink or a directory (non-empty ones with
        ``recursive=True``)."""
        params: dict[str, Any] = {"path": path}
        if recursive:
            params["recursive"] = "true"
        await self._client._send("DELETE", self._base, params=params)

    async def list(self, path: str | None = None) -> FileListing:
        """A directory's entries (default: /workspace)."""
        params = {"path": path} if path is not None else None
        return file_listing(await self._client._request("GET", f"{self._base}/list", params=params))

    async def stat(self, path: str) -> FileInfo:
        return FileInfo(await self._client._request("GET", f"{self._base}/stat", params={"path": path}))

    async def mkdir(self, path: str, *, parents: bool = False) -> FileInfo:
        return FileInfo(await self._client._request("POST", f"{self._base}/mkdir", json=mkdir_body(path, parents)))

    async def move(self, source: str, destination: str, *, overwrite: bool = False) -> FileInfo:
        """Moves (renames) a file or directory within /workspace."""
        body = move_body(source, destination, overwrite)
        return FileInfo(await self._client._request("POST", f"{self._base}/move", json=body))

    async def upload_url(self, path: str, *, size_bytes: int | None = None) -> Record:
        """Stages an upload: ``{url, method: "PUT", expiresAt, maxBytes}``, a
        signed URL for one PUT of the raw bytes, without an API key."""
        body: dict[str, Any] = {"path": path}
        if size_bytes is not None:
            body["sizeBytes"] = size_bytes
        return Record(await self._client._request("POST", f"{self._base}/uploads", json=body))

    async def download_url(self, path: str) -> Record:
        """Stages a download: ``{url, method: "GET", expiresAt, sizeBytes}``,
        a signed URL for one GET, without an API key."""
        return Record(await self._client._request("POST", f"{self._base}/downloads", json={"path": path}))

    async def upload(self, path: str, data: str | bytes) -> FileInfo:
        """Writes a file of any size through a staged upload."""
        payload = as_bytes(data)
        target = await self.upload_url(path, size_bytes=len(payload))
        response = await self._client._send(
            target["method"], target["url"], content=payload, headers=OCTET_STREAM, signed=True
        )
        return FileInfo(response.json())

    async def download(self, path: str) -> bytes:
        """Reads a file of any size through a staged download."""
        target = await self.download_url(path)
        return (await self._client._send(target["method"], target["url"], signed=True)).content


# ---------------------------------------------------------------- templates


class AsyncTemplates:
    def __init__(self, client: AsyncCrowNest) -> None:
        self._client = client

    async def list(self) -> list[Record]:
        return [Record(t) for t in (await self._client._request("GET", "/v1/templates"))["data"]]


# ---------------------------------------------------------------- previews


class AsyncPreviews:
    """Ports of the sandbox exposed as authenticated URLs; see :class:`crownest.Previews`."""

    def __init__(self, client: AsyncCrowNest, sandbox_id: str) -> None:
        self._client = client
        self._base = f"/v1/sandboxes/{sandbox_id}/previews"

    async def create(self, port: int, *, idempotency_key: str | None = None) -> Preview:
        """Exposes ``port`` (a server in the sandbox listening on it)."""
        data = await self._client._request(
            "POST", self._base, json={"port": port}, idempotency_key=idempotency_key or new_idempotency_key()
        )
        return Preview(data)

    async def get(self, preview_id: str) -> Preview:
        return Preview(await self._client._request("GET", f"{self._base}/{preview_id}"))

    def list(self, *, limit: int | None = None) -> AsyncPager[Preview]:
        async def fetch(cursor: str | None) -> tuple[list[Preview], str | None]:
            items, nxt = await self._client._page(self._base, limit, cursor)
            return [Preview(d) for d in items], nxt

        return AsyncPager(fetch)

    async def delete(self, preview: str | Mapping[str, Any]) -> Preview:
        """Closes the preview; its URL stops working at once."""
        return Preview(await self._client._request("DELETE", f"{self._base}/{preview_id_of(preview)}"))

    async def fetch(
        self,
        preview: Mapping[str, Any],
        path: str = "",
        *,
        method: str = "GET",
        content: str | bytes | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> httpx.Response:
        """Sends one request to the app behind ``preview`` with this
        client's API key, and returns the app's response as it is; see
        :meth:`crownest.Previews.fetch` (``*.localhost`` URLs go to 127.0.0.1)."""
        target = preview_request(preview, path, headers)
        return await self._client._http.request(
            method, target.url, content=content, headers=target.headers, extensions=target.extensions
        )


# ---------------------------------------------------------------- workspace runs


async def _read_archive(source: ArchiveSource) -> bytes:
    if isinstance(source, (bytes, bytearray, memoryview)):
        return bytes(source)
    if isinstance(source, (str, os.PathLike)):
        path = source

        def read() -> bytes:
            with open(path, "rb") as f:
                return f.read()

        return await asyncio.to_thread(read)
    return await asyncio.to_thread(source.read)


async def _stream_archive(source: str | os.PathLike[str] | IO[bytes], size: int) -> AsyncIterator[bytes]:
    """``size`` bytes of a file (a path, or a binary file from its
    position), read in a thread chunk by chunk."""
    owned = isinstance(source, (str, os.PathLike))
    f: IO[bytes] = open(source, "rb") if isinstance(source, (str, os.PathLike)) else source  # noqa: SIM115
    try:
        left = size
        while left > 0:
            chunk = await asyncio.to_thread(f.read, min(_UPLOAD_CHUNK, left))
            if not chunk:
                return
            left -= len(chunk)
            yield chunk
    finally:
        if owned:
            f.close()


async def _call_event(callback: AsyncEventCallback, event: WorkspaceRunEvent) -> None:
    result = callback(event)
    if inspect.isawaitable(result):
        await result


class AsyncWorkspaceRuns:
    """Workspace Runs (see :class:`crownest.WorkspaceRuns`), with ``await``
    and ``async for`` over ``list`` and ``events``."""

    def __init__(self, client: AsyncCrowNest) -> None:
        self._client = client

    @staticmethod
    def _path(run: str | Mapping[str, Any], suffix: str = "") -> str:
        return f"/v1/workspace-runs/{run_id_of(run)}{suffix}"

    async def create(
        self,
        command: str,
        *,
        archive: Mapping[str, Any],
        template: str | None = None,
        artifacts: Sequence[CollectSpec] | None = None,
        timeout_ms: int | None = None,
        env: Mapping[str, str] | None = None,
        keep_sandbox: bool | None = None,
        metadata: Mapping[str, Any] | None = None,
        idempotency_key: str | None = None,
    ) -> WorkspaceRun:
        """Creates a run (``awaiting_archive``) for ``archive={"sizeBytes", "sha256"}``."""
        body = workspace_run_body(
            command,
            archive=archive,
            template=template,
            artifacts=artifacts,
            timeout_ms=timeout_ms,
            env=env,
            keep_sandbox=keep_sandbox,
            metadata=metadata,
        )
        data = await self._client._request(
            "POST", "/v1/workspace-runs", json=body, idempotency_key=idempotency_key or new_idempotency_key()
        )
        return WorkspaceRun(data)

    async def get(self, run: str | Mapping[str, Any]) -> WorkspaceRun:
        return WorkspaceRun(await self._client._request("GET", self._path(run)))

    async def list_page(
        self,
        *,
        status: str | None = None,
        metadata: Mapping[str, Any] | None = None,
        limit: int | None = None,
        cursor: str | None = None,
    ) -> WorkspaceRunPage:
        """One page of runs, newest first (``data``, ``next_cursor``)."""
        params = httpx.QueryParams(workspace_run_list_params(status, metadata, limit, cursor))
        return workspace_run_page(await self._client._request("GET", "/v1/workspace-runs", params=params))

    def list(
        self,
        *,
        status: str | None = None,
        metadata: Mapping[str, Any] | None = None,
        limit: int | None = None,
        cursor: str | None = None,
    ) -> AsyncPager[WorkspaceRun]:
        """``async for`` over every matching run, newest first."""

        async def fetch(after: str | None) -> tuple[list[WorkspaceRun], str | None]:
            page = await self.list_page(status=status, metadata=metadata, limit=limit, cursor=after or cursor)
            return page.data, page.next_cursor

        return AsyncPager(fetch)

    async def archive_upload_url(self, run: str | Mapping[str, Any]) -> Record:
        """Stages an archive upload: ``{url, method: "PUT", expiresAt, maxBytes}``."""
        return Record(await self._client._request("POST", self._path(run, "/archive/uploads")))

    async def upload_archive(
        self, run: str | Mapping[str, Any], archive: ArchiveSource, *, staged: bool | None = None
    ) -> WorkspaceRun:
        """Uploads the run's ``.tar.gz``: direct up to 32 MiB, staged above
        (or with ``staged=True``), streamed from a file."""
        size = archive_source_size(archive)
        if not (staged if staged is not None else size > DIRECT_UPLOAD_MAX):
            data = await self._client._request(
                "PUT", self._path(run, "/archive"), content=await _read_archive(archive), headers=OCTET_STREAM
            )
            return WorkspaceRun(data)
        target = await self.archive_upload_url(run)
        headers = {**OCTET_STREAM, "content-length": str(size)}
        content: bytes | AsyncIterable[bytes]
        if isinstance(archive, (bytes, bytearray, memoryview)):
            content = bytes(archive)
        else:
            content = _stream_archive(archive, size)
        response = await self._client._send(
            target["method"], target["url"], content=content, headers=headers, signed=True
        )
        return WorkspaceRun(response.json())

    async def start(self, run: str | Mapping[str, Any]) -> WorkspaceRun:
        return WorkspaceRun(await self._client._request("POST", self._path(run, "/start")))

    async def cancel(self, run: str | Mapping[str, Any]) -> WorkspaceRun:
        return WorkspaceRun(await self._client._request("POST", self._path(run, "/cancel")))

    async def list_events(
        self, run: str | Mapping[str, Any], *, after_seq: int | None = None, limit: int | None = None
    ) -> WorkspaceRunEventPage:
        params = run_event_params(after_seq, limit)
        body = await self._client._request("GET", self._path(run, "/events"), params=params)
        return run_event_page(body, after_seq or 0)

    def events(self, run: str | Mapping[str, Any], *, after_seq: int = 0) -> AsyncIterator[WorkspaceRunEvent]:
        """``async for`` over the run's events after ``after_seq`` to the
        ``terminal`` event, resumed after a dropped connection."""
        return self._client._run_events(run_id_of(run), after_seq)

    async def wait(self, run: str | Mapping[str, Any], *, timeout: float | None = None) -> WorkspaceRun:
        """Polls the run until it is terminal and its evidence written (up
        to 30 s after the end); ``CrowNestTimeoutError`` after ``timeout`` s."""
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        grace: float | None = None
        attempt = 0
        while True:
            current = await self.get(run)
            if current.terminal:
                grace = grace if grace is not None else loop.time() + EVIDENCE_GRACE
                if current.get("evidenceReady") is not False or loop.time() >= grace:
                    return current
            delay = wait_poll_delay(attempt)
            if deadline is not None:
                left = deadline - loop.time()
                if left <= 0:
                    raise CrowNestTimeoutError(f"workspace run {current.id} is still {current.status} after {timeout} s")
                delay = min(delay, left)
            await asyncio.sleep(delay)
            attempt += 1

    async def evidence(self, run: str | Mapping[str, Any]) -> EvidenceBundle:
        return EvidenceBundle(await self._client._request("GET", self._path(run, "/evidence")))

    async def evidence_keys(self) -> builtins.list[Record]:
        """The server's evidence signing keys (``GET /v1/evidence-keys``):
        ``keyId``, ``algorithm`` (``ed25519``), ``publicKey`` (base64)."""
        return [Record(k) for k in (await self._client._request("GET", "/v1/evidence-keys"))["data"]]

    async def _evidence_when_ready(self, run: str | Mapping[str, Any], timeout: float = 60.0) -> EvidenceBundle:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        attempt = 0
        while True:
            try:
                return await self.evidence(run)
            except CrowNestApiError as e:
                if e.code != "evidence_not_ready" or loop.time() >= deadline:
                    raise
            await asyncio.sleep(wait_poll_delay(attempt))
            attempt += 1

    async def run_directory(
        self,
        directory: str | os.PathLike[str],
        command: str,
        *,
        artifacts: Sequence[CollectSpec] | None = None,
        template: str | None = None,
        env: Mapping[str, str] | None = None,
        timeout_ms: int | None = None,
        metadata: Mapping[str, Any] | None = None,
        keep_sandbox: bool | None = None,
        include_git: bool = False,
        on_event: AsyncEventCallback | None = None,
        staged: bool | None = None,
    ) -> WorkspaceRunResult:
        """Packs ``directory`` (in a thread), creates, uploads, starts and
        follows the run, and returns ``(run, evidence)`` once it is terminal."""
        packed: PackedArchive = await asyncio.to_thread(pack_directory, directory, include_git=include_git)
        with packed:
            created = await self.create(
                command,
                archive=packed.archive,
                template=template,
                artifacts=artifacts,
                timeout_ms=timeout_ms,
                env=env,
                keep_sandbox=keep_sandbox,
                metadata=metadata,
            )
            try:
                await self.upload_archive(created, packed.file, staged=staged)
                await self.start(created)
            except BaseException:
                try:
                    await self.cancel(created)
                except CrowNestError:
                    pass
                raise
        async for event in self.events(created):
            if on_event is not None:
                await _call_event(on_event, event)
        final = await self.wait(created)
        return WorkspaceRunResult(final, await self._evidence_when_ready(created))
