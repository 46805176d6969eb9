"""The synchronous client. Generated from ``_async.py`` by
``tools/gen_sync.py`` (unasync): do not edit by hand; edit ``_async.py``
and run ``python tools/gen_sync.py`` in sdk/python. What differs between
the two beyond ``await`` lives in ``_io_sync.py`` / ``_io_async.py``."""

from __future__ import annotations

import builtins
import os
import shutil
import socket
import tempfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import IO, Any, Generic, TypeVar

import httpx

from . import _io_sync as _io
from ._archive import DIRECT_UPLOAD_MAX, PackedArchive, archive_source_size, pack_directory
from ._io_sync import Callback, EventCallback, FileData, OutputCallback, PageFetch, WatchCallback
from ._shared import (
    CODE_STREAM_HEADERS,
    DEFAULT_MAX_RETRIES,
    DEFAULT_TIMEOUT,
    DIRECT_FILE_MAX,
    EVIDENCE_GRACE,
    FILE_CHUNK,
    OCTET_STREAM,
    Artifact,
    ArtifactPolicy,
    AuditEvent,
    CodeContext,
    CodeLanguage,
    CodeRunResult,
    CollectSpec,
    CommandResult,
    CrowNestApiError,
    CrowNestConnectionError,
    CrowNestError,
    CrowNestTimeoutError,
    Deadline,
    EvidenceBundle,
    FileInfo,
    FileListing,
    LogEvent,
    Preview,
    Record,
    SandboxMetrics,
    SSEDecoder,
    TimeParam,
    WorkspaceRun,
    WorkspaceRunEvent,
    WorkspaceRunEventPage,
    WorkspaceRunPage,
    WorkspaceRunResult,
    WriteEntry,
    api_error_from_response,
    as_bytes,
    audit_params,
    backoff_delay,
    code_context_body,
    code_event_from_sse,
    code_run_body,
    command_body,
    context_id_of,
    deadline_error,
    default_headers,
    event_stream_request,
    file_listing,
    file_source_size,
    log_event_from_sse,
    may_retry,
    metrics_event_from_sse,
    mkdir_body,
    move_body,
    network_body,
    new_idempotency_key,
    no_cookies,
    page_params,
    preview_id_of,
    preview_request,
    resolve_api_key,
    resolve_base_url,
    run_event_from_sse,
    run_event_page,
    run_event_params,
    run_id_of,
    sandbox_body,
    sandbox_list_params,
    status_retry_delay,
    stdin_body,
    transport_error,
    usage_params,
    wait_poll_delay,
    watch_event_from_sse,
    watch_params,
    workspace_run_body,
    workspace_run_list_params,
    workspace_run_page,
)
from ._types import (
    EvidenceKeyView,
    Health,
    SandboxStatus,
    SandboxView,
    TemplateView,
    TransferView,
    UsageReport,
)

T = TypeVar("T")
#: An archive to upload: its bytes, a path to the ``.tar.gz``, or a binary file.
ArchiveSource = bytes | str | os.PathLike[str] | IO[bytes]
#: Headers of an SSE request.
_SSE = {"accept": "text/event-stream"}
#: How long a watch stream may stay silent before its connection counts as
#: dead: the server sends a keep-alive comment every 15 s.
_WATCH_IDLE_TIMEOUT = 60.0


class Pager(Generic[T]):
    """Iterates every item of a paginated list (``for`` with the sync
    client, ``async for`` with the async one), fetching pages lazily;
    ``pages()`` iterates the pages."""

    def __init__(self, fetch: PageFetch[T]) -> None:
        self._fetch = fetch

    def pages(self) -> Iterator[list[T]]:
        cursor: str | None = None
        while True:
            items, cursor = self._fetch(cursor)
            yield items
            if not cursor:
                return

    def __iter__(self) -> Iterator[T]:
        for page in self.pages():
            for item in page:
                yield item


class CrowNest:
    """A CrowNest client (``CrowNest`` blocks, ``AsyncCrowNest`` is the same
    surface with ``await``).

    ``api_key`` defaults to ``CROWNEST_API_KEY``; ``base_url`` to
    ``CROWNEST_BASE_URL``, else ``http://127.0.0.1:7420`` (a local server);
    ``timeout`` (seconds, ``None``: none) bounds each call, retries
    included: a blocking ``commands.run`` waits for the command within it.
    The methods that block take ``request_timeout=`` to set it for one call.
    ``max_retries`` is how many times a failed request may be retried (see
    the README: what is retried, and Retry-After)."""

    def __init__(
        self,
        api_key: str | None = None,
        base_url: str | None = None,
        timeout: float | None = DEFAULT_TIMEOUT,
        *,
        max_retries: int = DEFAULT_MAX_RETRIES,
    ) -> None:
        self.base_url = resolve_base_url(base_url)
        self.timeout = timeout
        self.max_retries = max_retries
        self._http = httpx.Client(
            base_url=self.base_url,
            cookies=no_cookies(),
            headers=default_headers(resolve_api_key(api_key)),
            timeout=Deadline(timeout).timeout(),
        )
        self.sandboxes = Sandboxes(self)
        self.artifacts = Artifacts(self)
        self.templates = Templates(self)
        self.workspace_runs = WorkspaceRuns(self)
        self.usage = Usage(self)
        self.audit = Audit(self)

    # -- lifecycle

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> CrowNest:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def health(self) -> Record[Health]:
        """``GET /v1/health``."""
        return Record(self._request("GET", "/v1/health"))

    # -- transport

    def _deadline(self, request_timeout: float | None) -> Deadline:
        """One call's deadline: ``request_timeout``, else the client's ``timeout``."""
        return Deadline(request_timeout if request_timeout is not None else self.timeout)

    def _send(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        content: bytes | Iterable[bytes] | None = None,
        params: Mapping[str, Any] | httpx.QueryParams | None = None,
        idempotency_key: str | None = None,
        headers: Mapping[str, str] | None = None,
        signed: bool = False,
        stream: bool = False,
        deadline: Deadline | None = None,
    ) -> httpx.Response:
        """One API call, with retries, within ``deadline`` (default: the
        client's ``timeout``): each attempt gets what is left of it, and no
        retry sleeps past it. Retried: a connection that failed before the
        request went out; an idempotent or keyed request whose connection
        dropped, or that got 502/503/504; a 429 with Retry-After; a keyed
        request whose key is still in use. ``Retry-After`` sets the wait.
        A streamed body (not bytes) cannot be sent twice and is not retried.
        ``signed``: ``path`` is a signed transfer URL, sent once without the
        API key. ``stream``: the body is left unread (the caller closes it)."""
        deadline = deadline or self._deadline(None)
        hdrs = dict(headers or {})
        keyed = idempotency_key is not None
        if idempotency_key is not None:
            hdrs["Idempotency-Key"] = idempotency_key
        replayable = not signed and (content is None or isinstance(content, bytes))
        shown = "/v1/transfers/…" if signed else path  # a transfer URL's token stays out of errors
        attempt = 0
        while True:
            if deadline.expired():
                raise deadline_error(method, shown, deadline)
            request = self._http.build_request(
                method, path, json=json, content=content, params=params, headers=hdrs, timeout=deadline.timeout()
            )
            if signed:
                del request.headers["x-api-key"]
            try:
                response = self._http.send(request, stream=stream)
            except httpx.TransportError as exc:
                delay = backoff_delay(attempt)
                retry = replayable and attempt < self.max_retries and may_retry(method, keyed, exc)
                if not retry or not deadline.allows(delay):
                    raise transport_error(method, shown, exc, deadline) from exc
                _io.sleep(delay)
                attempt += 1
                continue
            if response.status_code >= 400:
                if stream:
                    try:
                        response.read()
                    finally:
                        response.close()
                error = api_error_from_response(
                    response.status_code, response.content, response.headers.get("x-request-id")
                )
                wait = status_retry_delay(error, response.headers.get("retry-after"), method, keyed, attempt)
                if wait is not None and replayable and attempt < self.max_retries and deadline.allows(wait):
                    _io.sleep(wait)
                    attempt += 1
                    continue
                raise error
            return response

    def _request(self, method: str, path: str, **kw: Any) -> Any:
        return (self._send(method, path, **kw)).json()

    def _page(self, path: str, limit: int | None, cursor: str | None) -> tuple[list[Any], str | None]:
        body = self._request("GET", path, params=page_params(limit, cursor))
        return list(body["data"]), body.get("nextCursor")

    def _log_stream(self, path: str, after: int | None, deadline: Deadline | None = None) -> Iterator[LogEvent]:
        """Follows an SSE log until its ``exit`` event, reconnecting with
        ``Last-Event-ID`` after a dropped connection; within ``deadline``
        when one is given (else as long as the command runs)."""
        last = after
        failures = 0
        while True:
            if deadline is not None and deadline.expired():
                raise deadline_error("GET", path, deadline)
            headers = dict(_SSE)
            if last is not None:
                headers["Last-Event-ID"] = str(last)
            timeout = deadline.timeout() if deadline is not None else httpx.USE_CLIENT_DEFAULT
            try:
                with self._http.stream("GET", path, headers=headers, timeout=timeout) as response:
                    if response.status_code >= 400:
                        response.read()
                        raise api_error_from_response(
                            response.status_code, response.content, response.headers.get("x-request-id")
                        )
                    decoder = SSEDecoder()
                    for line in response.iter_lines():
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
                    _io.sleep(backoff_delay(failures))
                    failures += 1
                continue
            # The stream ended without an exit event: reconnect after `last`.
            if failures >= self.max_retries:
                raise CrowNestConnectionError(f"GET {path}: the log stream ended before the exit event")
            _io.sleep(backoff_delay(failures))
            failures += 1

    def _run_events(self, run_id: str, after_seq: int) -> Iterator[WorkspaceRunEvent]:
        """Follows a Workspace Run's SSE event log to its ``terminal`` event.
        After a dropped connection it reconnects with ``Last-Event-ID`` /
        ``afterSeq`` of the last event seen; an event already seen is
        skipped, and a hole in the numbering is filled from ``GET …/events``,
        so every ``seq`` is yielded once, in order."""
        path = f"/v1/workspace-runs/{run_id}/events"
        last = after_seq
        failures = 0
        while True:
            headers, params = event_stream_request(last)
            try:
                with self._http.stream("GET", path, headers=headers, params=params) as response:
                    if response.status_code >= 400:
                        response.read()
                        raise api_error_from_response(
                            response.status_code, response.content, response.headers.get("x-request-id")
                        )
                    decoder = SSEDecoder()
                    for line in response.iter_lines():
                        sse = decoder.feed(line)
                        if sse is None:
                            continue
                        event = run_event_from_sse(sse, response.status_code)
                        if event is None or event.seq <= last:
                            continue
                        failures = 0
                        if event.seq > last + 1:
                            for missing in self._run_events_between(path, last, event.seq):
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
                    _io.sleep(backoff_delay(failures))
                    failures += 1
                continue
            # The stream ended before the terminal event: reconnect after `last`.
            if failures >= self.max_retries:
                raise CrowNestConnectionError(f"GET {path}: the event stream ended before the terminal event")
            _io.sleep(backoff_delay(failures))
            failures += 1

    def _run_events_between(self, path: str, after: int, before: int) -> Iterator[WorkspaceRunEvent]:
        """The events numbered ``after + 1 … before - 1``, from the JSON pages."""
        while after + 1 < before:
            params = run_event_params(after, min(1000, before - after - 1))
            page = run_event_page(self._request("GET", path, params=params), after)
            events = [e for e in page.data if after < e.seq < before]
            if not events or events[0].seq != after + 1:
                raise CrowNestError(f"GET {path}: the event log has no event {after + 1}")
            for event in events:
                if event.seq != after + 1:
                    raise CrowNestError(f"GET {path}: the event log has no event {after + 1}")
                after = event.seq
                yield event

    def _code_stream(
        self,
        path: str,
        body: dict[str, Any],
        idempotency_key: str,
        on_stdout: Callback | None,
        on_stderr: Callback | None,
        on_output: OutputCallback | None,
        deadline: Deadline,
    ) -> dict[str, Any]:
        """POSTs a streamed Code Run and passes its events to the callbacks
        until the ``complete`` event, whose RunCodeResult it returns. After a
        dropped connection it asks again with the same Idempotency-Key: the
        server then waits for the run and replays its ``complete`` event.
        Retries, as in ``_send``, stay within ``deadline``."""
        headers = {**CODE_STREAM_HEADERS, "Idempotency-Key": idempotency_key}
        attempt = 0
        while True:
            if deadline.expired():
                raise deadline_error("POST", path, deadline)
            try:
                with self._http.stream(
                    "POST", path, json=body, headers=headers, timeout=deadline.timeout()
                ) as response:
                    if response.status_code >= 400:
                        response.read()
                        error = api_error_from_response(
                            response.status_code, response.content, response.headers.get("x-request-id")
                        )
                        wait = status_retry_delay(error, response.headers.get("retry-after"), "POST", True, attempt)
                        if wait is not None and attempt < self.max_retries and deadline.allows(wait):
                            _io.sleep(wait)
                            attempt += 1
                            continue
                        raise error
                    decoder = SSEDecoder()
                    for line in response.iter_lines():
                        sse = decoder.feed(line)
                        if sse is None:
                            continue
                        event = code_event_from_sse(sse, response.status_code)
                        if event is None:
                            continue
                        kind, payload = event
                        if kind == "stdout" and on_stdout:
                            _io.call(on_stdout, payload)
                        elif kind == "stderr" and on_stderr:
                            _io.call(on_stderr, payload)
                        elif kind == "output" and on_output:
                            _io.call(on_output, payload)
                        elif kind == "complete":
                            return dict(payload)
            except httpx.TransportError as exc:
                delay = backoff_delay(attempt)
                if attempt >= self.max_retries or not may_retry("POST", True, exc) or not deadline.allows(delay):
                    raise transport_error("POST", path, exc, deadline) from exc
                _io.sleep(delay)
                attempt += 1
                continue
            delay = backoff_delay(attempt)
            if attempt >= self.max_retries or not deadline.allows(delay):
                raise CrowNestConnectionError(f"POST {path}: the run stream ended before its complete event")
            _io.sleep(delay)
            attempt += 1


# ---------------------------------------------------------------- sandboxes


class SandboxHandle(Record[SandboxView]):
    """A sandbox (``id``, ``status``, ``template``, ``expiresAt``, …) with
    the sub-clients bound to it: ``.commands``, ``.code``, ``.files``,
    ``.artifacts`` and ``.previews``. As a context manager (``with``, or
    ``async with`` for the async handle) it kills the sandbox on exit."""

    def __init__(self, client: CrowNest, data: Mapping[str, Any]) -> None:
        super().__init__(data)
        self._client = client
        self.commands = Commands(client, self.id)
        self.code = Code(client, self.id)
        self.artifacts = SandboxArtifacts(client, self.id)
        self.files = Files(client, self.id)
        self.previews = Previews(client, self.id)

    @property
    def id(self) -> str:
        return str(self._data["id"])

    @property
    def status(self) -> SandboxStatus:
        status: SandboxStatus = self._data["status"]
        return status

    def __enter__(self) -> SandboxHandle:
        return self

    def __exit__(self, exc_type: object, exc: BaseException | None, tb: object) -> None:
        """Kills the sandbox; one already destroyed (410) is fine. When the
        block raised, a failed kill is added to that exception as a note
        instead of replacing it."""
        try:
            self.kill()
        except CrowNestApiError as e:
            if e.code == "sandbox_destroyed":
                return
            if exc is None:
                raise
            exc.add_note(f"and killing sandbox {self.id} on leaving the block failed: {e!r}")
        except CrowNestError as e:
            if exc is None:
                raise
            exc.add_note(f"and killing sandbox {self.id} on leaving the block failed: {e!r}")

    def refresh(self) -> SandboxHandle:
        """Re-reads the sandbox (``GET /v1/sandboxes/{id}``) into this handle."""
        self._data = self._client._request("GET", f"/v1/sandboxes/{self.id}")
        return self

    def kill(self) -> SandboxHandle:
        """Destroys the sandbox (``DELETE /v1/sandboxes/{id}``); the handle
        then holds its ``destroyed`` tombstone."""
        self._data = self._client._request("DELETE", f"/v1/sandboxes/{self.id}")
        return self

    def set_timeout(self, ttl_ms: int) -> SandboxHandle:
        """Sets the sandbox to expire ``ttl_ms`` milliseconds from now
        (longer or shorter than what is left; ``POST …/timeout``) and
        updates this handle (``expiresAt``). Outside the server's TTL bounds:
        ``invalid_request``. E2B's ``set_timeout`` takes seconds; this takes
        milliseconds, like ``ttl_ms`` of ``create``."""
        self._data = (self._client.sandboxes.set_timeout(self.id, ttl_ms))._data
        return self

    def metrics(self) -> SandboxMetrics:
        """One sample of the sandbox's resource use (``GET …/metrics``)."""
        return self._client.sandboxes.metrics(self.id)

    def metrics_stream(self) -> Iterator[SandboxMetrics]:
        """A sample every second (SSE) until the sandbox ends."""
        return self._client.sandboxes.metrics_stream(self.id)

    def set_network(
        self,
        *,
        mode: str | None = None,
        allow: Sequence[str] | None = None,
        deny: Sequence[str] | None = None,
    ) -> SandboxHandle:
        """Narrows the sandbox's egress policy within its template's
        (``PATCH /v1/sandboxes/{id}/network``, scope ``sandboxes:network``);
        new connections follow it at once. Wider than the template is
        ``network_policy_too_wide``."""
        self._data = self._client._request(
            "PATCH", f"/v1/sandboxes/{self.id}/network", json=network_body(mode, allow, deny)
        )
        return self


class Sandboxes:
    def __init__(self, client: CrowNest) -> None:
        self._client = client

    def create(
        self,
        template: str,
        *,
        ttl_ms: int | None = None,
        metadata: Mapping[str, Any] | None = None,
        network: Mapping[str, Any] | None = None,
        env: Mapping[str, str] | None = None,
        idempotency_key: str | None = None,
        request_timeout: float | None = None,
    ) -> SandboxHandle:
        """Creates a sandbox from a template and starts it. ``env`` sets
        variables for every command and code context of the sandbox (over
        the template's ``[env]``); its values are never returned. The
        handle is a context manager that kills the sandbox on exit."""
        data = self._client._request(
            "POST",
            "/v1/sandboxes",
            json=sandbox_body(template, ttl_ms, metadata, network, env),
            idempotency_key=idempotency_key or new_idempotency_key(),
            deadline=self._client._deadline(request_timeout),
        )
        return SandboxHandle(self._client, data)

    def get(self, sandbox_id: str) -> SandboxHandle:
        return SandboxHandle(self._client, self._client._request("GET", f"/v1/sandboxes/{sandbox_id}"))

    def kill(self, sandbox_id: str) -> SandboxHandle:
        """Destroys a sandbox by id, in one request (no ``get`` first);
        returns its ``destroyed`` tombstone. Already destroyed:
        ``sandbox_destroyed`` (410)."""
        return SandboxHandle(self._client, self._client._request("DELETE", f"/v1/sandboxes/{sandbox_id}"))

    def set_timeout(self, sandbox_id: str, ttl_ms: int) -> SandboxHandle:
        """Sets a live sandbox to expire ``ttl_ms`` milliseconds from now
        (``POST /v1/sandboxes/{id}/timeout``); see ``SandboxHandle.set_timeout``."""
        data = self._client._request(
            "POST",
            f"/v1/sandboxes/{sandbox_id}/timeout",
            json={"ttlMs": ttl_ms},
            idempotency_key=new_idempotency_key(),
        )
        return SandboxHandle(self._client, data)

    def metrics(self, sandbox_id: str) -> SandboxMetrics:
        """One sample of a sandbox's resource use: ``cpuUsageSeconds`` (CPU
        time so far), ``cpuPercent`` (over the last interval, 100 = one CPU),
        ``memoryUsedBytes`` / ``memoryLimitBytes``, ``pids`` / ``pidsLimit``,
        ``workspaceUsedBytes`` / ``workspaceLimitBytes``, ``networkBytesIn`` /
        ``networkBytesOut``, ``vcpus``, ``timestamp``."""
        data: SandboxMetrics = self._client._request("GET", f"/v1/sandboxes/{sandbox_id}/metrics")
        return data

    def metrics_stream(self, sandbox_id: str) -> Iterator[SandboxMetrics]:
        """A metrics sample every second (``GET …/metrics?stream=true``),
        until the sandbox ends (the stream's ``end`` event). A dropped
        connection is reconnected (samples are points in time: none is
        owed); a sandbox that ended meanwhile ends the iteration."""
        path = f"/v1/sandboxes/{sandbox_id}/metrics"
        client = self._client
        failures = 0
        seen = False
        while True:
            try:
                with client._http.stream("GET", path, params={"stream": "true"}, headers=_SSE) as response:
                    if response.status_code >= 400:
                        response.read()
                        error = api_error_from_response(
                            response.status_code, response.content, response.headers.get("x-request-id")
                        )
                        if seen and error.code == "sandbox_destroyed":
                            return
                        raise error
                    decoder = SSEDecoder()
                    for line in response.iter_lines():
                        sse = decoder.feed(line)
                        if sse is None:
                            continue
                        event = metrics_event_from_sse(sse, response.status_code)
                        if event is None:
                            continue
                        kind, payload = event
                        if kind == "end":
                            return
                        failures = 0
                        seen = True
                        sample: SandboxMetrics = payload
                        yield sample
            except httpx.TransportError as exc:
                if failures >= client.max_retries:
                    raise CrowNestConnectionError(f"GET {path}: {exc!r}") from exc
            else:
                if failures >= client.max_retries:
                    raise CrowNestConnectionError(f"GET {path}: the metrics stream ended before its end event")
            _io.sleep(backoff_delay(failures))
            failures += 1

    def list(
        self,
        *,
        status: SandboxStatus | None = None,
        template: str | None = None,
        metadata: Mapping[str, Any] | None = None,
        created_after: TimeParam | None = None,
        created_before: TimeParam | None = None,
        limit: int | None = None,
    ) -> Pager[SandboxHandle]:
        """The org's sandboxes (live ones and tombstones), newest first,
        pages fetched lazily (``limit`` is the page size). Filters, all of
        which must match: ``status``, ``template``, ``metadata`` (each
        ``KEY: VALUE``; a non-string value matches by its JSON text),
        ``created_after`` / ``created_before`` (exclusive; an aware
        ``datetime`` or an RFC 3339 string)."""
        query = sandbox_list_params(
            status=status,
            template=template,
            metadata=metadata,
            created_after=created_after,
            created_before=created_before,
            limit=None,
            cursor=None,
        )

        def fetch(cursor: str | None) -> tuple[builtins.list[SandboxHandle], str | None]:
            params = httpx.QueryParams([*query, *page_params(limit, cursor).items()])
            body = self._client._request("GET", "/v1/sandboxes", params=params)
            return [SandboxHandle(self._client, d) for d in body["data"]], body.get("nextCursor")

        return Pager(fetch)


# ---------------------------------------------------------------- commands


class CommandHandle(CommandResult):
    """A command record plus what can be done to the command."""

    def __init__(self, client: CrowNest, data: Mapping[str, Any]) -> None:
        super().__init__(data)
        self._client = client

    @property
    def _path(self) -> str:
        return f"/v1/sandboxes/{self._data['sandboxId']}/commands/{self.id}"

    def refresh(self) -> CommandHandle:
        self._data = self._client._request("GET", self._path)
        return self

    def logs(self, *, after: int | None = None) -> Iterator[LogEvent]:
        """Streams the log (stdout/stderr events, then ``exit``) from the
        start, or after event number ``after``; a finished command's log is
        replayed."""
        return self._client._log_stream(f"{self._path}/logs", after)

    def wait(self, *, on_stdout: Callback | None = None, on_stderr: Callback | None = None) -> CommandResult:
        """Waits for the command to end and returns its final record. With
        callbacks, every stdout/stderr chunk is passed to them as it arrives."""
        return self._wait(on_stdout, on_stderr, None)

    def _wait(
        self, on_stdout: Callback | None, on_stderr: Callback | None, deadline: Deadline | None
    ) -> CommandResult:
        if self.status == "running" or on_stdout or on_stderr:
            for event in self._client._log_stream(f"{self._path}/logs", None, deadline):
                if event.type == "stdout" and on_stdout:
                    _io.call(on_stdout, event.data)
                elif event.type == "stderr" and on_stderr:
                    _io.call(on_stderr, event.data)
        self.refresh()
        return CommandResult(self._data)

    def send_stdin(self, data: str | bytes | None = None, *, close: bool = False) -> CommandHandle:
        """Writes text or bytes to the command's stdin (it must have been
        started with ``stdin=True``); ``close=True`` closes it after."""
        self._data = self._client._request("POST", f"{self._path}/stdin", json=stdin_body(data, close))
        return self

    def signal(self, signal: str | int) -> CommandHandle:
        """Sends a signal (``"SIGTERM"``, ``"INT"``, ``9``, …)."""
        self._data = self._client._request("POST", f"{self._path}/signal", json={"signal": str(signal)})
        return self

    def cancel(self) -> CommandHandle:
        """Kills the command; it ends ``canceled``."""
        self._data = self._client._request("POST", f"{self._path}/cancel")
        return self


class Commands:
    def __init__(self, client: CrowNest, sandbox_id: str) -> None:
        self._client = client
        self._sandbox_id = sandbox_id

    def run(
        self,
        command: str,
        *,
        cwd: str | None = None,
        env: Mapping[str, str] | None = None,
        timeout_ms: int | None = None,
        collect: builtins.list[CollectSpec] | None = None,
        on_stdout: Callback | None = None,
        on_stderr: Callback | None = None,
        idempotency_key: str | None = None,
        request_timeout: float | None = None,
    ) -> CommandResult:
        """Runs a command to completion and returns its record (``exitCode``,
        ``stdout``, ``stderr``, ``status``, …); a non-zero exit is a result,
        not an exception. With ``on_stdout`` / ``on_stderr`` it starts the
        command in the background and streams its log to the callbacks, then
        returns the final record. The whole call, retries included, ends by
        ``request_timeout`` (default: the client's ``timeout``): a
        ``timeout_ms`` longer than that needs a ``request_timeout`` as long."""
        key = idempotency_key or new_idempotency_key()
        deadline = self._client._deadline(request_timeout)
        if on_stdout is None and on_stderr is None:
            body = command_body(
                command, cwd=cwd, env=env, timeout_ms=timeout_ms, collect=collect, background=False, stdin=False
            )
            data = self._client._request(
                "POST", f"/v1/sandboxes/{self._sandbox_id}/commands", json=body, idempotency_key=key, deadline=deadline
            )
            return CommandResult(data)
        handle = self._start(command, cwd, env, timeout_ms, collect, False, key, deadline)
        return handle._wait(on_stdout, on_stderr, deadline)

    def start(
        self,
        command: str,
        *,
        cwd: str | None = None,
        env: Mapping[str, str] | None = None,
        timeout_ms: int | None = None,
        collect: builtins.list[CollectSpec] | None = None,
        stdin: bool = False,
        idempotency_key: str | None = None,
    ) -> CommandHandle:
        """Starts a command in the background and returns a handle to it
        (``wait()``, ``logs()``, ``send_stdin()``, ``signal()``, ``cancel()``).
        ``stdin=True`` keeps its stdin open for ``send_stdin``."""
        key = idempotency_key or new_idempotency_key()
        return self._start(command, cwd, env, timeout_ms, collect, stdin, key, None)

    def _start(
        self,
        command: str,
        cwd: str | None,
        env: Mapping[str, str] | None,
        timeout_ms: int | None,
        collect: builtins.list[CollectSpec] | None,
        stdin: bool,
        key: str,
        deadline: Deadline | None,
    ) -> CommandHandle:
        body = command_body(
            command, cwd=cwd, env=env, timeout_ms=timeout_ms, collect=collect, background=True, stdin=stdin
        )
        data = self._client._request(
            "POST", f"/v1/sandboxes/{self._sandbox_id}/commands", json=body, idempotency_key=key, deadline=deadline
        )
        return CommandHandle(self._client, data)

    def get(self, command_id: str) -> CommandHandle:
        data = self._client._request("GET", f"/v1/sandboxes/{self._sandbox_id}/commands/{command_id}")
        return CommandHandle(self._client, data)

    def list(self, *, limit: int | None = None) -> Pager[CommandHandle]:
        def fetch(cursor: str | None) -> tuple[builtins.list[CommandHandle], str | None]:
            items, nxt = self._client._page(f"/v1/sandboxes/{self._sandbox_id}/commands", limit, cursor)
            return [CommandHandle(self._client, d) for d in items], nxt

        return Pager(fetch)


# ---------------------------------------------------------------- code


class Code:
    """Code Contexts (persistent interpreters) and Code Runs (snippets run
    in them) of the sandbox. Languages: ``python`` (the default),
    ``javascript``, ``typescript``."""

    def __init__(self, client: CrowNest, sandbox_id: str) -> None:
        self._client = client
        self._base = f"/v1/sandboxes/{sandbox_id}/code"

    def create_context(
        self,
        language: CodeLanguage = "python",
        *,
        cwd: str | None = None,
        env: Mapping[str, str] | None = None,
        request_timeout: float | None = None,
    ) -> CodeContext:
        """Starts a new interpreter for ``language``."""
        body = code_context_body(language, cwd, env)
        data = self._client._request(
            "POST", f"{self._base}/contexts", json=body, deadline=self._client._deadline(request_timeout)
        )
        return CodeContext(data)

    def list_contexts(self) -> builtins.list[CodeContext]:
        return [CodeContext(c) for c in (self._client._request("GET", f"{self._base}/contexts"))["data"]]

    def get_context(self, context_id: str) -> CodeContext:
        return CodeContext(self._client._request("GET", f"{self._base}/contexts/{context_id}"))

    def restart_context(
        self, context_id: str | Mapping[str, Any], *, request_timeout: float | None = None
    ) -> CodeContext:
        """Restarts the context's interpreter (``POST …/restart``): the same
        context id, a fresh interpreter (its variables and imports are gone)."""
        cid = context_id_of(context_id)
        data = self._client._request(
            "POST", f"{self._base}/contexts/{cid}/restart", deadline=self._client._deadline(request_timeout)
        )
        return CodeContext(data)

    def delete_context(self, context_id: str | Mapping[str, Any]) -> None:
        """Stops the context's interpreter (its state is gone)."""
        self._client._send("DELETE", f"{self._base}/contexts/{context_id_of(context_id)}")

    def run(
        self,
        code: str,
        *,
        language: CodeLanguage = "python",
        context_id: str | Mapping[str, Any] | None = None,
        on_stdout: Callback | None = None,
        on_stderr: Callback | None = None,
        on_output: OutputCallback | None = None,
        artifact_policy: ArtifactPolicy | None = None,
        timeout_ms: int | None = None,
        idempotency_key: str | None = None,
        request_timeout: float | None = None,
    ) -> CodeRunResult:
        """Runs a snippet in a Code Context (``context_id``: an id or a
        context; default: the sandbox's default context for ``language``)
        and returns the result. An exception in the code is ``result["error"]``,
        not an SDK exception. With ``on_stdout`` / ``on_stderr`` /
        ``on_output`` the run is streamed and each chunk or rich output is
        passed to them as it is produced. The call ends by
        ``request_timeout`` (default: the client's ``timeout``)."""
        body = code_run_body(
            code, language=language, context_id=context_id, artifact_policy=artifact_policy, timeout_ms=timeout_ms
        )
        key = idempotency_key or new_idempotency_key()
        path = f"{self._base}/runs"
        deadline = self._client._deadline(request_timeout)
        if on_stdout is None and on_stderr is None and on_output is None:
            return CodeRunResult(
                self._client._request("POST", path, json=body, idempotency_key=key, deadline=deadline)
            )
        return CodeRunResult(
            self._client._code_stream(path, body, key, on_stdout, on_stderr, on_output, deadline)
        )


# ---------------------------------------------------------------- artifacts


class SandboxArtifacts:
    def __init__(self, client: CrowNest, sandbox_id: str) -> None:
        self._client = client
        self._sandbox_id = sandbox_id

    def create(self, path: str, *, name: str | None = None, idempotency_key: str | None = None) -> Artifact:
        """Promotes a file of /workspace into durable artifact storage."""
        body: dict[str, Any] = {"path": path}
        if name is not None:
            body["name"] = name
        data = self._client._request(
            "POST",
            f"/v1/sandboxes/{self._sandbox_id}/artifacts",
            json=body,
            idempotency_key=idempotency_key or new_idempotency_key(),
        )
        return Artifact(data)

    def list(self, *, limit: int | None = None) -> Pager[Artifact]:
        def fetch(cursor: str | None) -> tuple[builtins.list[Artifact], str | None]:
            items, nxt = self._client._page(f"/v1/sandboxes/{self._sandbox_id}/artifacts", limit, cursor)
            return [Artifact(d) for d in items], nxt

        return Pager(fetch)


class Artifacts:
    def __init__(self, client: CrowNest) -> None:
        self._client = client

    def get(self, artifact_id: str) -> Artifact:
        return Artifact(self._client._request("GET", f"/v1/artifacts/{artifact_id}"))

    def list(self, *, limit: int | None = None) -> Pager[Artifact]:
        def fetch(cursor: str | None) -> tuple[builtins.list[Artifact], str | None]:
            items, nxt = self._client._page("/v1/artifacts", limit, cursor)
            return [Artifact(d) for d in items], nxt

        return Pager(fetch)

    def download(self, artifact_id: str) -> bytes:
        """The artifact's content."""
        return (self._client._send("GET", f"/v1/artifacts/{artifact_id}/content")).content


# ---------------------------------------------------------------- files


def _file_chunks(f: IO[bytes], size: int) -> Iterator[bytes]:
    """``size`` bytes of a binary file from its position, chunk by chunk
    (the async client reads each chunk in a thread)."""
    left = size
    while left > 0:
        chunk = _io.blocking(f.read, min(FILE_CHUNK, left))
        if not chunk:
            return
        left -= len(chunk)
        yield chunk


def _spool_file(source: IO[bytes]) -> tuple[IO[bytes], int]:
    """A binary file of unknown size (a pipe) copied to a temporary file."""
    f: IO[bytes] = tempfile.TemporaryFile()  # noqa: SIM115 (the caller closes it)
    try:
        shutil.copyfileobj(source, f, FILE_CHUNK)
        size = f.tell()
        f.seek(0)
    except BaseException:
        f.close()
        raise
    return f, size


class WatchHandle:
    """A running ``files.watch``: ``path`` is the watched directory (as the
    server resolved it). ``stop()`` ends it; so does leaving a ``with``
    block (``async with`` for the async handle). ``running`` is false once
    it ended; ``error`` is what ended it otherwise than by ``stop()`` (the
    connection dropped, the server closed the stream, or ``on_event``
    raised), else ``None``. The sync client calls ``on_event`` from the
    watch's own thread; the async client from a task of the event loop."""

    def __init__(self, client: CrowNest, url: str, params: dict[str, str], on_event: WatchCallback) -> None:
        self._client = client
        self._url = url
        self._params = params
        self._on_event = on_event
        self._response: httpx.Response | None = None
        self._lines: Iterator[str] | None = None
        self._decoder = SSEDecoder()
        self._worker: _io.Worker | None = None
        self._stopped = False
        self.path = ""
        self.error: BaseException | None = None

    def _open(self, deadline: Deadline) -> WatchHandle:
        """Opens the stream and waits (within ``deadline``) for ``ready``:
        the watches are in place, changes from now on are reported."""
        client = self._client
        # Reads are bounded by the keep-alive interval, not by `deadline`,
        # which is for the wait for `ready` alone (checked at every line).
        left = deadline.left()
        connect = min(10.0, max(left, 0.001)) if left is not None else 10.0
        timeout = httpx.Timeout(_WATCH_IDLE_TIMEOUT, connect=connect)
        request = client._http.build_request("GET", self._url, params=self._params, headers=_SSE, timeout=timeout)
        try:
            response = client._http.send(request, stream=True)
        except httpx.TransportError as exc:
            raise transport_error("GET", self._url, exc, deadline) from exc
        if response.status_code >= 400:
            try:
                response.read()
            finally:
                response.close()
            raise api_error_from_response(response.status_code, response.content, response.headers.get("x-request-id"))
        self._response = response
        self._lines = response.iter_lines()
        try:
            for line in self._lines:
                sse = self._decoder.feed(line)
                if sse is None:
                    if deadline.expired():
                        raise deadline_error("GET", self._url, deadline)
                    continue
                event = watch_event_from_sse(sse, response.status_code)
                if event is not None and event[0] == "ready":
                    self.path = event[1]["path"]
                    break
            else:
                raise CrowNestConnectionError(f"GET {self._url}: the watch stream ended before it was ready")
        except httpx.TransportError as exc:
            response.close()
            raise transport_error("GET", self._url, exc, deadline) from exc
        except BaseException:
            response.close()
            raise
        self._worker = _io.Worker(self._pump, f"crownest-watch-{self.path}")
        return self

    def _pump(self) -> None:
        """The background loop: each change to ``on_event``, until ``stop()``."""
        assert self._lines is not None and self._response is not None
        try:
            for line in self._lines:
                sse = self._decoder.feed(line)
                if sse is None:
                    continue
                event = watch_event_from_sse(sse, self._response.status_code)
                if event is None or event[0] != "change":
                    continue
                if self._stopped:
                    return
                _io.call(self._on_event, event[1])
            if not self._stopped:
                self.error = CrowNestConnectionError(f"GET {self._url}: the server ended the watch stream")
        except (httpx.TransportError, CrowNestError) as exc:
            if not self._stopped:
                self.error = exc
        except Exception as exc:  # noqa: BLE001 (on_event's own failure ends the watch, kept in .error)
            self.error = exc
        finally:
            self._response.close()

    @property
    def running(self) -> bool:
        return self._worker is not None and self._worker.running() and not self._stopped

    def _interrupt(self) -> None:
        """Wakes a read blocked on the stream's socket (the sync client's
        thread): shutting the socket down ends the read at once."""
        stream = self._response.extensions.get("network_stream") if self._response is not None else None
        sock = stream.get_extra_info("socket") if stream is not None else None
        if isinstance(sock, socket.socket):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def stop(self) -> None:
        """Ends the watch: no ``on_event`` call starts after this returns."""
        self._stopped = True
        if self._worker is not None:
            self._worker.stop(self._interrupt)
        if self._response is not None:
            self._response.close()

    def __enter__(self) -> WatchHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class Files:
    """Files of the sandbox's /workspace; paths are relative to /workspace
    or absolute under it. Up to 32 MiB a file goes in one request, larger
    ones through staged transfer URLs (``write``, ``read_stream`` choose)."""

    def __init__(self, client: CrowNest, sandbox_id: str) -> None:
        self._client = client
        self._base = f"/v1/sandboxes/{sandbox_id}/files"

    def write(self, path: str, data: FileData, *, request_timeout: float | None = None) -> FileInfo:
        """Writes a whole file; missing parent directories are created.
        ``data``: text (UTF-8 encoded), bytes, a binary file object (read
        from its position) or an iterable of byte chunks (the async client
        also takes an async iterable). Files and iterables are streamed, not
        held in memory; above 32 MiB the file goes through a staged upload
        URL, which must know the size: taken from ``fstat`` or by seeking,
        else (a pipe, an iterable) by spooling the data to a temporary file
        first. ``request_timeout`` bounds the call."""
        deadline = self._client._deadline(request_timeout)
        if isinstance(data, (str, bytes, bytearray, memoryview)):
            payload = as_bytes(data)
            if len(payload) > DIRECT_FILE_MAX:
                return self._staged_put(path, payload, len(payload), deadline)
            response = self._client._send(
                "PUT", self._base, params={"path": path}, content=payload, headers=OCTET_STREAM, deadline=deadline
            )
            return FileInfo(response.json())
        owned: IO[bytes] | None = None
        source: IO[bytes]
        size: int
        if hasattr(data, "read"):
            source = data  # type: ignore[assignment]
            known = file_source_size(source)
            if known is None:
                source, size = _io.blocking(_spool_file, source)
                owned = source
            else:
                size = known
        elif _io.is_chunk_source(data):
            source, size = _io.spool(data)
            owned = source
        else:
            raise TypeError(f"cannot write {type(data).__name__}: give str, bytes, a binary file or byte chunks")
        try:
            if size > DIRECT_FILE_MAX:
                return self._staged_put(path, _file_chunks(source, size), size, deadline)
            headers = {**OCTET_STREAM, "content-length": str(size)}
            response = self._client._send(
                "PUT",
                self._base,
                params={"path": path},
                content=_file_chunks(source, size),
                headers=headers,
                deadline=deadline,
            )
            return FileInfo(response.json())
        finally:
            if owned is not None:
                owned.close()

    def _staged_put(
        self, path: str, content: bytes | Iterable[bytes], size: int, deadline: Deadline
    ) -> FileInfo:
        target = self._client._request(
            "POST", f"{self._base}/uploads", json={"path": path, "sizeBytes": size}, deadline=deadline
        )
        headers = {**OCTET_STREAM, "content-length": str(size)}
        response = self._client._send(
            target["method"], target["url"], content=content, headers=headers, signed=True, deadline=deadline
        )
        return FileInfo(response.json())

    def write_files(
        self, files: Sequence[WriteEntry], *, request_timeout: float | None = None
    ) -> builtins.list[FileInfo]:
        """Writes several files (``[{"path": ..., "data": str | bytes}]``),
        one ``PUT`` each, in order; returns their infos. A failure stops
        there: the files before it are written."""
        return [self.write(f["path"], f["data"], request_timeout=request_timeout) for f in files]

    def read(self, path: str, *, request_timeout: float | None = None) -> bytes:
        """A file's bytes (held in memory; ``read_stream`` for large files)."""
        deadline = self._client._deadline(request_timeout)
        return (self._client._send("GET", self._base, params={"path": path}, deadline=deadline)).content

    def read_text(self, path: str, encoding: str = "utf-8") -> str:
        return (self.read(path)).decode(encoding)

    def read_stream(
        self, path: str, *, chunk_size: int = FILE_CHUNK, request_timeout: float | None = None
    ) -> Iterator[bytes]:
        """A file's bytes as chunks (``for`` / ``async for``), never all in
        memory: up to 32 MiB from ``GET …/files``, larger files through a
        staged download URL. ``request_timeout`` bounds each wait for data."""
        deadline = self._client._deadline(request_timeout)
        info = self.stat(path)
        if int(info.get("size") or 0) > DIRECT_FILE_MAX:
            target = self._client._request("POST", f"{self._base}/downloads", json={"path": path}, deadline=deadline)
            response = self._client._send(target["method"], target["url"], signed=True, stream=True, deadline=deadline)
        else:
            response = self._client._send("GET", self._base, params={"path": path}, stream=True, deadline=deadline)
        try:
            for chunk in response.iter_bytes(chunk_size):
                yield chunk
        except httpx.TransportError as exc:
            raise transport_error("GET", self._base, exc, deadline) from exc
        finally:
            response.close()

    def exists(self, path: str) -> bool:
        """Whether ``path`` exists in /workspace (a file, directory or
        symlink; ``GET …/files/exists``). A path outside it:
        ``path_outside_workspace``."""
        body = self._client._request("GET", f"{self._base}/exists", params={"path": path})
        return body.get("exists") is True

    def delete(self, path: str, *, recursive: bool = False) -> None:
        """Removes a file, a symlink or a directory (non-empty ones with
        ``recursive=True``)."""
        params: dict[str, Any] = {"path": path}
        if recursive:
            params["recursive"] = "true"
        self._client._send("DELETE", self._base, params=params)

    def list(self, path: str | None = None) -> FileListing:
        """A directory's entries (default: /workspace)."""
        params = {"path": path} if path is not None else None
        return file_listing(self._client._request("GET", f"{self._base}/list", params=params))

    def stat(self, path: str) -> FileInfo:
        return FileInfo(self._client._request("GET", f"{self._base}/stat", params={"path": path}))

    def mkdir(self, path: str, *, parents: bool = False) -> FileInfo:
        return FileInfo(self._client._request("POST", f"{self._base}/mkdir", json=mkdir_body(path, parents)))

    def move(self, source: str, destination: str, *, overwrite: bool = False) -> FileInfo:
        """Moves (renames) a file or directory within /workspace."""
        body = move_body(source, destination, overwrite)
        return FileInfo(self._client._request("POST", f"{self._base}/move", json=body))

    def watch(
        self,
        path: str | None,
        on_event: WatchCallback,
        *,
        recursive: bool = True,
        request_timeout: float | None = None,
    ) -> WatchHandle:
        """Watches a directory (``None``: /workspace) for changes and calls
        ``on_event`` with each as a dict: ``{"type": "create" | "modify" |
        "delete" | "rename", "path", "isDir", "oldPath" (rename only)}``, or
        ``{"type": "overflow", "dropped": n}`` when the sandbox's bounded
        queue dropped events. Returns once the watches are in place (the
        stream's ``ready``, within ``request_timeout``): a change made after
        that is reported. The returned handle's ``stop()`` ends it, as does
        leaving it as a context manager. The sync client calls ``on_event``
        from a background thread, the async client from a task (a coroutine
        function is awaited). Watches per sandbox are limited:
        ``too_many_watches``."""
        handle = WatchHandle(self._client, f"{self._base}/watch", watch_params(path, recursive), on_event)
        return handle._open(self._client._deadline(request_timeout))

    def upload_url(self, path: str, *, size_bytes: int | None = None) -> Record[TransferView]:
        """Stages an upload: ``{url, method: "PUT", expiresAt, maxBytes}``, a
        signed URL for one PUT of the raw bytes, without an API key."""
        body: dict[str, Any] = {"path": path}
        if size_bytes is not None:
            body["sizeBytes"] = size_bytes
        return Record(self._client._request("POST", f"{self._base}/uploads", json=body))

    def download_url(self, path: str) -> Record[TransferView]:
        """Stages a download: ``{url, method: "GET", expiresAt, sizeBytes}``,
        a signed URL for one GET, without an API key."""
        return Record(self._client._request("POST", f"{self._base}/downloads", json={"path": path}))

    def upload(self, path: str, data: str | bytes, *, request_timeout: float | None = None) -> FileInfo:
        """Writes a file of any size through a staged upload (``write``
        does that by itself above 32 MiB)."""
        payload = as_bytes(data)
        return self._staged_put(path, payload, len(payload), self._client._deadline(request_timeout))

    def download(self, path: str, *, request_timeout: float | None = None) -> bytes:
        """Reads a file of any size through a staged download, into memory."""
        deadline = self._client._deadline(request_timeout)
        target = self._client._request("POST", f"{self._base}/downloads", json={"path": path}, deadline=deadline)
        return (self._client._send(target["method"], target["url"], signed=True, deadline=deadline)).content


# ---------------------------------------------------------------- templates


class Templates:
    def __init__(self, client: CrowNest) -> None:
        self._client = client

    def list(self) -> builtins.list[Record[TemplateView]]:
        """``GET /v1/templates``: the templates, their resources, built or not."""
        return [Record(t) for t in (self._client._request("GET", "/v1/templates"))["data"]]


# ---------------------------------------------------------------- usage and audit


class Usage:
    """Compute usage of the caller's sandboxes (``GET /v1/usage``, scope ``usage:read``)."""

    def __init__(self, client: CrowNest) -> None:
        self._client = client

    def get(
        self,
        *,
        from_: TimeParam | None = None,
        to: TimeParam | None = None,
        group_by: str | None = None,
    ) -> UsageReport:
        """Usage in ``[from_, to)`` (default: the last 30 days; an aware
        ``datetime`` or an RFC 3339 string), grouped by ``group_by``:
        ``sandbox`` (default), ``project`` or ``day`` (UTC). Returns
        ``{from, to, groupBy, data: [{key, seconds, computeUnitSeconds,
        egressBytesIn, egressBytesOut, pricingVersion}], totalComputeUnitSeconds}``."""
        report: UsageReport = self._client._request("GET", "/v1/usage", params=usage_params(from_, to, group_by))
        return report


class Audit:
    """Audit events of the caller's org (``GET /v1/audit-events``, scope ``audit:read``)."""

    def __init__(self, client: CrowNest) -> None:
        self._client = client

    def list(
        self,
        *,
        resource_id: str | None = None,
        action: str | None = None,
        from_: TimeParam | None = None,
        to: TimeParam | None = None,
        limit: int | None = None,
    ) -> Pager[AuditEvent]:
        """Every matching event, newest first, pages fetched lazily
        (``limit`` is the page size, 1 … 200): about ``resource_id``
        (``sbx_…``, ``cmd_…``, ``key_…``), of ``action`` (``sandbox.create``,
        ``sandbox.timeout``, …), at or after ``from_`` and before ``to``."""

        def fetch(cursor: str | None) -> tuple[builtins.list[AuditEvent], str | None]:
            params = audit_params(resource_id=resource_id, action=action, from_=from_, to=to, limit=limit, cursor=cursor)
            body = self._client._request("GET", "/v1/audit-events", params=params)
            return [AuditEvent(e) for e in body["data"]], body.get("nextCursor")

        return Pager(fetch)


# ---------------------------------------------------------------- previews


class Previews:
    """Ports of the sandbox exposed as authenticated URLs. A request to a
    preview's ``url`` needs an API key with scope ``previews:access`` (as
    :meth:`fetch` sends it), or the preview's ``token`` (a browser opens
    ``browserUrl``)."""

    def __init__(self, client: CrowNest, sandbox_id: str) -> None:
        self._client = client
        self._base = f"/v1/sandboxes/{sandbox_id}/previews"

    def create(self, port: int, *, idempotency_key: str | None = None) -> Preview:
        """Exposes ``port`` (a server in the sandbox listening on it)."""
        data = self._client._request(
            "POST", self._base, json={"port": port}, idempotency_key=idempotency_key or new_idempotency_key()
        )
        return Preview(data)

    def get(self, preview_id: str) -> Preview:
        return Preview(self._client._request("GET", f"{self._base}/{preview_id}"))

    def list(self, *, limit: int | None = None) -> Pager[Preview]:
        def fetch(cursor: str | None) -> tuple[builtins.list[Preview], str | None]:
            items, nxt = self._client._page(self._base, limit, cursor)
            return [Preview(d) for d in items], nxt

        return Pager(fetch)

    def delete(self, preview: str | Mapping[str, Any]) -> Preview:
        """Closes the preview; its URL stops working at once."""
        return Preview(self._client._request("DELETE", f"{self._base}/{preview_id_of(preview)}"))

    def fetch(
        self,
        preview: Mapping[str, Any],
        path: str = "",
        *,
        method: str = "GET",
        content: str | bytes | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> httpx.Response:
        """Sends one request to the app behind ``preview`` (``path`` is
        relative to its URL) with this client's API key, and returns the
        app's response as it is (any status, redirects not followed; 502
        ``preview_unreachable`` while nothing listens on the port). A
        preview URL under ``localhost`` (``http://prv-….localhost:PORT/``,
        the default) is reached on 127.0.0.1 with its ``Host``, as a
        browser would, since the system resolver may not know the name."""
        target = preview_request(preview, path, headers)
        return self._client._http.request(
            method, target.url, content=content, headers=target.headers, extensions=target.extensions
        )


# ---------------------------------------------------------------- workspace runs


def _read_archive(source: ArchiveSource) -> bytes:
    if isinstance(source, (bytes, bytearray, memoryview)):
        return bytes(source)
    if isinstance(source, (str, os.PathLike)):
        path = source

        def read() -> bytes:
            with open(path, "rb") as f:
                return f.read()

        return _io.blocking(read)
    return _io.blocking(source.read)


def _archive_chunks(source: str | os.PathLike[str] | IO[bytes], size: int) -> Iterator[bytes]:
    """``size`` bytes of an archive (a path, or a binary file from its
    position), chunk by chunk."""
    if isinstance(source, (str, os.PathLike)):
        with open(source, "rb") as f:
            for chunk in _file_chunks(f, size):
                yield chunk
    else:
        for chunk in _file_chunks(source, size):
            yield chunk


class WorkspaceRuns:
    """Workspace Runs: upload a ``.tar.gz`` of a checkout, run one command on
    it in a fresh sandbox, follow its event log, keep the files named as
    artifacts, and get a signed Evidence Bundle. :meth:`run_directory` does
    all of it for a local directory."""

    def __init__(self, client: CrowNest) -> None:
        self._client = client

    @staticmethod
    def _path(run: str | Mapping[str, Any], suffix: str = "") -> str:
        return f"/v1/workspace-runs/{run_id_of(run)}{suffix}"

    def create(
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
        """Creates a run (``awaiting_archive``) for an archive of
        ``archive={"sizeBytes", "sha256"}``; ``template`` defaults to
        ``python-node`` on the server, ``artifacts`` are ``{path, name?}``
        relative to /workspace."""
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
        data = self._client._request(
            "POST", "/v1/workspace-runs", json=body, idempotency_key=idempotency_key or new_idempotency_key()
        )
        return WorkspaceRun(data)

    def get(self, run: str | Mapping[str, Any]) -> WorkspaceRun:
        return WorkspaceRun(self._client._request("GET", self._path(run)))

    def list_page(
        self,
        *,
        status: str | None = None,
        metadata: Mapping[str, Any] | None = None,
        limit: int | None = None,
        cursor: str | None = None,
    ) -> WorkspaceRunPage:
        """One page of runs, newest first (``data``, ``next_cursor``),
        filtered by ``status`` and ``metadata`` (every key must match)."""
        params = httpx.QueryParams(workspace_run_list_params(status, metadata, limit, cursor))
        return workspace_run_page(self._client._request("GET", "/v1/workspace-runs", params=params))

    def list(
        self,
        *,
        status: str | None = None,
        metadata: Mapping[str, Any] | None = None,
        limit: int | None = None,
        cursor: str | None = None,
    ) -> Pager[WorkspaceRun]:
        """Every matching run, newest first, pages fetched lazily (from
        ``cursor`` when given); ``limit`` is the page size."""

        def fetch(after: str | None) -> tuple[builtins.list[WorkspaceRun], str | None]:
            page = self.list_page(status=status, metadata=metadata, limit=limit, cursor=after or cursor)
            return page.data, page.next_cursor

        return Pager(fetch)

    def archive_upload_url(self, run: str | Mapping[str, Any]) -> Record[TransferView]:
        """Stages an archive upload: ``{url, method: "PUT", expiresAt,
        maxBytes}``, a signed URL for one PUT of the raw bytes, no API key."""
        return Record(self._client._request("POST", self._path(run, "/archive/uploads")))

    def upload_archive(
        self, run: str | Mapping[str, Any], archive: ArchiveSource, *, staged: bool | None = None
    ) -> WorkspaceRun:
        """Uploads the run's ``.tar.gz`` (bytes, a path, or a binary file from
        its position): up to 32 MiB in one ``PUT …/archive``, larger ones
        (or with ``staged=True``) through a staged upload, streamed from the
        file. The server checks size and SHA-256 (``archive_size_mismatch``,
        ``archive_digest_mismatch``; the run then still awaits an archive)."""
        size = archive_source_size(archive)
        if not (staged if staged is not None else size > DIRECT_UPLOAD_MAX):
            data = self._client._request(
                "PUT", self._path(run, "/archive"), content=_read_archive(archive), headers=OCTET_STREAM
            )
            return WorkspaceRun(data)
        target = self.archive_upload_url(run)
        headers = {**OCTET_STREAM, "content-length": str(size)}
        content: bytes | Iterable[bytes]
        if isinstance(archive, (bytes, bytearray, memoryview)):
            content = bytes(archive)
        else:
            content = _archive_chunks(archive, size)
        response = self._client._send(
            target["method"], target["url"], content=content, headers=headers, signed=True
        )
        return WorkspaceRun(response.json())

    def start(self, run: str | Mapping[str, Any]) -> WorkspaceRun:
        """Queues the run (its archive must have been uploaded)."""
        return WorkspaceRun(self._client._request("POST", self._path(run, "/start")))

    def cancel(self, run: str | Mapping[str, Any]) -> WorkspaceRun:
        """Stops the command and ends the run ``canceled`` (with evidence)."""
        return WorkspaceRun(self._client._request("POST", self._path(run, "/cancel")))

    def list_events(
        self, run: str | Mapping[str, Any], *, after_seq: int | None = None, limit: int | None = None
    ) -> WorkspaceRunEventPage:
        """One page of the run's event log after ``after_seq`` (``data``,
        ``next_after_seq``, ``terminal``); ``limit`` 1 … 1000."""
        params = run_event_params(after_seq, limit)
        body = self._client._request("GET", self._path(run, "/events"), params=params)
        return run_event_page(body, after_seq or 0)

    def events(self, run: str | Mapping[str, Any], *, after_seq: int = 0) -> Iterator[WorkspaceRunEvent]:
        """The run's events after ``after_seq`` as they happen (SSE), to the
        ``terminal`` event; a finished run's log is replayed. A dropped
        connection is resumed: no event is repeated or missed."""
        return self._client._run_events(run_id_of(run), after_seq)

    def wait(self, run: str | Mapping[str, Any], *, timeout: float | None = None) -> WorkspaceRun:
        """Polls the run until it is terminal and its evidence written
        (``evidenceReady``; that follows the end by a moment, and is given
        up to 30 s) and returns it; after ``timeout`` seconds raises
        ``CrowNestTimeoutError``."""
        deadline = Deadline(timeout)
        grace: Deadline | None = None
        attempt = 0
        while True:
            current = self.get(run)
            if current.terminal:
                grace = grace or Deadline(EVIDENCE_GRACE)
                if current.get("evidenceReady") is not False or grace.expired():
                    return current
            delay = wait_poll_delay(attempt)
            left = deadline.left()
            if left is not None:
                if left <= 0:
                    raise CrowNestTimeoutError(f"workspace run {current.id} is still {current.status} after {timeout} s")
                delay = min(delay, left)
            _io.sleep(delay)
            attempt += 1

    def evidence(self, run: str | Mapping[str, Any]) -> EvidenceBundle:
        """The run's signed Evidence Bundle (``bundle``, ``signature``);
        before it is written: ``evidence_not_ready``."""
        return EvidenceBundle(self._client._request("GET", self._path(run, "/evidence")))

    def evidence_keys(self) -> builtins.list[Record[EvidenceKeyView]]:
        """The server's evidence signing keys (``GET /v1/evidence-keys``):
        ``keyId``, ``algorithm`` (``ed25519``), ``publicKey`` (base64)."""
        return [Record(k) for k in (self._client._request("GET", "/v1/evidence-keys"))["data"]]

    def _evidence_when_ready(self, run: str | Mapping[str, Any], timeout: float = 60.0) -> EvidenceBundle:
        deadline = Deadline(timeout)
        attempt = 0
        while True:
            try:
                return self.evidence(run)
            except CrowNestApiError as e:
                if e.code != "evidence_not_ready" or deadline.expired():
                    raise
            _io.sleep(wait_poll_delay(attempt))
            attempt += 1

    def run_directory(
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
        on_event: EventCallback | None = None,
        staged: bool | None = None,
    ) -> WorkspaceRunResult:
        """Packs ``directory`` (``.gitignore`` respected, ``.git`` skipped
        unless ``include_git``), creates a run for it, uploads the archive
        (direct up to 32 MiB, staged above, or as ``staged`` says), starts
        it, passes every event to ``on_event`` as it arrives, and returns
        ``(run, evidence)`` once the run is terminal. A failed command is a
        result (``run.status == "failed"``, ``run.exit_code``), not an
        exception."""
        packed: PackedArchive = _io.blocking(lambda: pack_directory(directory, include_git=include_git))
        with packed:
            created = self.create(
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
                self.upload_archive(created, packed.file, staged=staged)
                self.start(created)
            except BaseException:
                try:  # it never ran: do not leave it awaiting an archive
                    self.cancel(created)
                except CrowNestError:
                    pass
                raise
        for event in self.events(created):
            if on_event is not None:
                _io.call(on_event, event)
        # The run's record turns terminal, and its evidence is written, a
        # moment after the `terminal` event.
        final = self.wait(created)
        return WorkspaceRunResult(final, self._evidence_when_ready(created))
