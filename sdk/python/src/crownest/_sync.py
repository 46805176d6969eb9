"""The synchronous client. ``_async.py`` mirrors it method for method."""

from __future__ import annotations

import builtins
import os
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import IO, Any, Generic, TypeVar

import httpx

from ._archive import DIRECT_UPLOAD_MAX, archive_source_size, pack_directory
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
Callback = Callable[[str], Any]
OutputCallback = Callable[[dict[str, Any]], Any]
#: Called with each event of a Workspace Run as it arrives.
EventCallback = Callable[[WorkspaceRunEvent], Any]
#: An archive to upload: its bytes, a path to the ``.tar.gz``, or a binary file.
ArchiveSource = bytes | str | os.PathLike[str] | IO[bytes]


class Pager(Generic[T]):
    """Iterates every item of a paginated list, fetching pages lazily."""

    def __init__(self, fetch: Callable[[str | None], tuple[list[T], str | None]]) -> None:
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
            yield from page


class CrowNest:
    """Synchronous CrowNest client.

    ``api_key`` defaults to ``CROWNEST_API_KEY``; ``base_url`` to
    ``CROWNEST_BASE_URL``, else ``http://127.0.0.1:7420`` (a local server);
    ``timeout`` is the per-request timeout in seconds (a blocking
    ``commands.run`` waits for the command within one request)."""

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
        self._http = httpx.Client(
            base_url=self.base_url,
            cookies=no_cookies(),
            headers=default_headers(resolve_api_key(api_key)),
            timeout=httpx.Timeout(timeout, connect=min(timeout, 10.0)),
        )
        self.sandboxes = Sandboxes(self)
        self.artifacts = Artifacts(self)
        self.templates = Templates(self)
        self.workspace_runs = WorkspaceRuns(self)

    # -- lifecycle

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> CrowNest:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def health(self) -> Record:
        """``GET /v1/health``."""
        return Record(self._request("GET", "/v1/health"))

    # -- transport

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
                response = self._http.send(request)
            except httpx.TransportError as exc:
                retryable = not signed and may_retry(method, idempotency_key is not None, exc)
                if attempt >= self.max_retries or not retryable:
                    raise CrowNestConnectionError(f"{method} {request.url.path}: {exc!r}") from exc
                time.sleep(backoff_delay(attempt))
                attempt += 1
                continue
            if response.status_code >= 400:
                error = api_error_from_response(
                    response.status_code, response.content, response.headers.get("x-request-id")
                )
                if attempt < self.max_retries and may_retry_status(error, idempotency_key is not None):
                    time.sleep(backoff_delay(attempt))
                    attempt += 1
                    continue
                raise error
            return response

    def _request(self, method: str, path: str, **kw: Any) -> Any:
        return self._send(method, path, **kw).json()

    def _page(self, path: str, limit: int | None, cursor: str | None) -> tuple[list[Any], str | None]:
        body = self._request("GET", path, params=page_params(limit, cursor))
        return list(body["data"]), body.get("nextCursor")

    def _log_stream(self, path: str, after: int | None) -> Iterator[LogEvent]:
        """Follows an SSE log until its ``exit`` event, reconnecting with
        ``Last-Event-ID`` after a dropped connection."""
        last = after
        failures = 0
        while True:
            headers = {"accept": "text/event-stream"}
            if last is not None:
                headers["Last-Event-ID"] = str(last)
            try:
                with self._http.stream("GET", path, headers=headers) as response:
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
                    time.sleep(backoff_delay(failures))
                    failures += 1
                continue
            # The stream ended without an exit event: reconnect after `last`.
            if failures >= self.max_retries:
                raise CrowNestConnectionError(f"GET {path}: the log stream ended before the exit event")
            time.sleep(backoff_delay(failures))
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
                    time.sleep(backoff_delay(failures))
                    failures += 1
                continue
            # The stream ended before the terminal event: reconnect after `last`.
            if failures >= self.max_retries:
                raise CrowNestConnectionError(f"GET {path}: the event stream ended before the terminal event")
            time.sleep(backoff_delay(failures))
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
    ) -> dict[str, Any]:
        """POSTs a streamed Code Run and passes its events to the callbacks
        until the ``complete`` event, whose RunCodeResult it returns. After a
        dropped connection it asks again with the same Idempotency-Key: the
        server then waits for the run and replays its ``complete`` event."""
        headers = {**CODE_STREAM_HEADERS, "Idempotency-Key": idempotency_key}
        attempt = 0
        while True:
            try:
                with self._http.stream("POST", path, json=body, headers=headers) as response:
                    if response.status_code >= 400:
                        response.read()
                        error = api_error_from_response(
                            response.status_code, response.content, response.headers.get("x-request-id")
                        )
                        if attempt < self.max_retries and may_retry_status(error, True):
                            time.sleep(backoff_delay(attempt))
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
                            on_stdout(payload)
                        elif kind == "stderr" and on_stderr:
                            on_stderr(payload)
                        elif kind == "output" and on_output:
                            on_output(payload)
                        elif kind == "complete":
                            return dict(payload)
            except httpx.TransportError as exc:
                if attempt >= self.max_retries or not may_retry("POST", True, exc):
                    raise CrowNestConnectionError(f"POST {path}: {exc!r}") from exc
                time.sleep(backoff_delay(attempt))
                attempt += 1
                continue
            if attempt >= self.max_retries:
                raise CrowNestConnectionError(f"POST {path}: the run stream ended before its complete event")
            time.sleep(backoff_delay(attempt))
            attempt += 1


# ---------------------------------------------------------------- sandboxes


class SandboxHandle(Record):
    """A sandbox (``id``, ``status``, ``template``, ``expiresAt``, …) with
    the sub-clients bound to it: ``.commands``, ``.code``, ``.files``,
    ``.artifacts`` and ``.previews``."""

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
    def status(self) -> str:
        return str(self._data["status"])

    def refresh(self) -> SandboxHandle:
        """Re-reads the sandbox (``GET /v1/sandboxes/{id}``) into this handle."""
        self._data = self._client._request("GET", f"/v1/sandboxes/{self.id}")
        return self

    def kill(self) -> SandboxHandle:
        """Destroys the sandbox (``DELETE /v1/sandboxes/{id}``); the handle
        then holds its ``destroyed`` tombstone."""
        self._data = self._client._request("DELETE", f"/v1/sandboxes/{self.id}")
        return self

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
    ) -> SandboxHandle:
        """Creates a sandbox from a template and starts it. ``env`` sets
        variables for every command and code context of the sandbox (over
        the template's ``[env]``); its values are never returned."""
        data = self._client._request(
            "POST",
            "/v1/sandboxes",
            json=sandbox_body(template, ttl_ms, metadata, network, env),
            idempotency_key=idempotency_key or new_idempotency_key(),
        )
        return SandboxHandle(self._client, data)

    def get(self, sandbox_id: str) -> SandboxHandle:
        return SandboxHandle(self._client, self._client._request("GET", f"/v1/sandboxes/{sandbox_id}"))

    def list(self, *, limit: int | None = None) -> Pager[SandboxHandle]:
        """Every sandbox of the org (live ones and tombstones), newest first;
        ``limit`` is the page size."""

        def fetch(cursor: str | None) -> tuple[list[SandboxHandle], str | None]:
            items, nxt = self._client._page("/v1/sandboxes", limit, cursor)
            return [SandboxHandle(self._client, d) for d in items], nxt

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
        if self.status == "running" or on_stdout or on_stderr:
            for event in self.logs():
                if event.type == "stdout" and on_stdout:
                    on_stdout(event.data)
                elif event.type == "stderr" and on_stderr:
                    on_stderr(event.data)
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
        collect: list[CollectSpec] | None = None,
        on_stdout: Callback | None = None,
        on_stderr: Callback | None = None,
        idempotency_key: str | None = None,
    ) -> CommandResult:
        """Runs a command to completion and returns its record (``exitCode``,
        ``stdout``, ``stderr``, ``status``, …). With ``on_stdout`` /
        ``on_stderr`` it starts the command in the background and streams
        its log to the callbacks, then returns the final record."""
        key = idempotency_key or new_idempotency_key()
        if on_stdout is None and on_stderr is None:
            body = command_body(
                command, cwd=cwd, env=env, timeout_ms=timeout_ms, collect=collect, background=False, stdin=False
            )
            data = self._client._request(
                "POST", f"/v1/sandboxes/{self._sandbox_id}/commands", json=body, idempotency_key=key
            )
            return CommandResult(data)
        handle = self.start(
            command, cwd=cwd, env=env, timeout_ms=timeout_ms, collect=collect, idempotency_key=key
        )
        return handle.wait(on_stdout=on_stdout, on_stderr=on_stderr)

    def start(
        self,
        command: str,
        *,
        cwd: str | None = None,
        env: Mapping[str, str] | None = None,
        timeout_ms: int | None = None,
        collect: list[CollectSpec] | None = None,
        stdin: bool = False,
        idempotency_key: str | None = None,
    ) -> CommandHandle:
        """Starts a command in the background and returns a handle to it
        (``wait()``, ``logs()``, ``send_stdin()``, ``signal()``, ``cancel()``).
        ``stdin=True`` keeps its stdin open for ``send_stdin``."""
        body = command_body(
            command, cwd=cwd, env=env, timeout_ms=timeout_ms, collect=collect, background=True, stdin=stdin
        )
        data = self._client._request(
            "POST",
            f"/v1/sandboxes/{self._sandbox_id}/commands",
            json=body,
            idempotency_key=idempotency_key or new_idempotency_key(),
        )
        return CommandHandle(self._client, data)

    def get(self, command_id: str) -> CommandHandle:
        data = self._client._request("GET", f"/v1/sandboxes/{self._sandbox_id}/commands/{command_id}")
        return CommandHandle(self._client, data)

    def list(self, *, limit: int | None = None) -> Pager[CommandHandle]:
        def fetch(cursor: str | None) -> tuple[list[CommandHandle], str | None]:
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
        self, language: str = "python", *, cwd: str | None = None, env: Mapping[str, str] | None = None
    ) -> CodeContext:
        """Starts a new interpreter for ``language``."""
        body = code_context_body(language, cwd, env)
        return CodeContext(self._client._request("POST", f"{self._base}/contexts", json=body))

    def list_contexts(self) -> list[CodeContext]:
        return [CodeContext(c) for c in self._client._request("GET", f"{self._base}/contexts")["data"]]

    def get_context(self, context_id: str) -> CodeContext:
        return CodeContext(self._client._request("GET", f"{self._base}/contexts/{context_id}"))

    def delete_context(self, context_id: str | Mapping[str, Any]) -> None:
        """Stops the context's interpreter (its state is gone)."""
        cid = context_id if isinstance(context_id, str) else str(context_id["id"])
        self._client._send("DELETE", f"{self._base}/contexts/{cid}")

    def run(
        self,
        code: str,
        *,
        language: str = "python",
        context_id: str | Mapping[str, Any] | None = None,
        on_stdout: Callback | None = None,
        on_stderr: Callback | None = None,
        on_output: OutputCallback | None = None,
        artifact_policy: str | None = None,
        timeout_ms: int | None = None,
        idempotency_key: str | None = None,
    ) -> CodeRunResult:
        """Runs a snippet in a Code Context (``context_id``: an id or a
        context; default: the sandbox's default context for ``language``)
        and returns the result. An exception in the code is ``result["error"]``,
        not an SDK exception. With ``on_stdout`` / ``on_stderr`` /
        ``on_output`` the run is streamed and each chunk or rich output is
        passed to them as it is produced."""
        body = code_run_body(
            code, language=language, context_id=context_id, artifact_policy=artifact_policy, timeout_ms=timeout_ms
        )
        key = idempotency_key or new_idempotency_key()
        path = f"{self._base}/runs"
        if on_stdout is None and on_stderr is None and on_output is None:
            return CodeRunResult(self._client._request("POST", path, json=body, idempotency_key=key))
        return CodeRunResult(self._client._code_stream(path, body, key, on_stdout, on_stderr, on_output))


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
        def fetch(cursor: str | None) -> tuple[list[Artifact], str | None]:
            items, nxt = self._client._page(f"/v1/sandboxes/{self._sandbox_id}/artifacts", limit, cursor)
            return [Artifact(d) for d in items], nxt

        return Pager(fetch)


class Artifacts:
    def __init__(self, client: CrowNest) -> None:
        self._client = client

    def get(self, artifact_id: str) -> Artifact:
        return Artifact(self._client._request("GET", f"/v1/artifacts/{artifact_id}"))

    def list(self, *, limit: int | None = None) -> Pager[Artifact]:
        def fetch(cursor: str | None) -> tuple[list[Artifact], str | None]:
            items, nxt = self._client._page("/v1/artifacts", limit, cursor)
            return [Artifact(d) for d in items], nxt

        return Pager(fetch)

    def download(self, artifact_id: str) -> bytes:
        """The artifact's content."""
        return self._client._send("GET", f"/v1/artifacts/{artifact_id}/content").content


# ---------------------------------------------------------------- files


class Files:
    """Files of the sandbox's /workspace; paths are relative to /workspace
    or absolute under it."""

    def __init__(self, client: CrowNest, sandbox_id: str) -> None:
        self._client = client
        self._base = f"/v1/sandboxes/{sandbox_id}/files"

    def write(self, path: str, data: str | bytes) -> FileInfo:
        """Writes a whole file (str is UTF-8 encoded; at most 32 MiB, larger
        files: ``upload``). Missing parent directories are created."""
        response = self._client._send(
            "PUT", self._base, params={"path": path}, content=as_bytes(data), headers=OCTET_STREAM
        )
        return FileInfo(response.json())

    def read(self, path: str) -> bytes:
        """A file's bytes."""
        return self._client._send("GET", self._base, params={"path": path}).content

    def read_text(self, path: str, encoding: str = "utf-8") -> str:
        return self.read(path).decode(encoding)

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

    def upload_url(self, path: str, *, size_bytes: int | None = None) -> Record:
        """Stages an upload: ``{url, method: "PUT", expiresAt, maxBytes}``, a
        signed URL for one PUT of the raw bytes, without an API key."""
        body: dict[str, Any] = {"path": path}
        if size_bytes is not None:
            body["sizeBytes"] = size_bytes
        return Record(self._client._request("POST", f"{self._base}/uploads", json=body))

    def download_url(self, path: str) -> Record:
        """Stages a download: ``{url, method: "GET", expiresAt, sizeBytes}``,
        a signed URL for one GET, without an API key."""
        return Record(self._client._request("POST", f"{self._base}/downloads", json={"path": path}))

    def upload(self, path: str, data: str | bytes) -> FileInfo:
        """Writes a file of any size through a staged upload."""
        payload = as_bytes(data)
        target = self.upload_url(path, size_bytes=len(payload))
        response = self._client._send(
            target["method"], target["url"], content=payload, headers=OCTET_STREAM, signed=True
        )
        return FileInfo(response.json())

    def download(self, path: str) -> bytes:
        """Reads a file of any size through a staged download."""
        target = self.download_url(path)
        return self._client._send(target["method"], target["url"], signed=True).content


# ---------------------------------------------------------------- templates


class Templates:
    def __init__(self, client: CrowNest) -> None:
        self._client = client

    def list(self) -> list[Record]:
        """``GET /v1/templates``: the templates, their resources, built or not."""
        return [Record(t) for t in self._client._request("GET", "/v1/templates")["data"]]


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
        def fetch(cursor: str | None) -> tuple[list[Preview], str | None]:
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
        app's response as it is (any status, redirects not followed). A
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
        with open(source, "rb") as f:
            return f.read()
    return source.read()


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
        params = workspace_run_list_params(status, metadata, limit, cursor)
        return workspace_run_page(self._client._request("GET", "/v1/workspace-runs", params=httpx.QueryParams(params)))

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

        def fetch(after: str | None) -> tuple[list[WorkspaceRun], str | None]:
            page = self.list_page(status=status, metadata=metadata, limit=limit, cursor=after or cursor)
            return page.data, page.next_cursor

        return Pager(fetch)

    def archive_upload_url(self, run: str | Mapping[str, Any]) -> Record:
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
        if isinstance(archive, (bytes, bytearray, memoryview)):
            response = self._client._send(
                target["method"], target["url"], content=bytes(archive), headers=headers, signed=True
            )
        elif isinstance(archive, (str, os.PathLike)):
            with open(archive, "rb") as f:
                response = self._client._send(target["method"], target["url"], content=f, headers=headers, signed=True)
        else:
            response = self._client._send(
                target["method"], target["url"], content=archive, headers=headers, signed=True
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
        deadline = None if timeout is None else time.monotonic() + timeout
        grace: float | None = None
        attempt = 0
        while True:
            current = self.get(run)
            if current.terminal:
                grace = grace if grace is not None else time.monotonic() + EVIDENCE_GRACE
                if current.get("evidenceReady") is not False or time.monotonic() >= grace:
                    return current
            delay = wait_poll_delay(attempt)
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise CrowNestTimeoutError(f"workspace run {current.id} is still {current.status} after {timeout} s")
                delay = min(delay, left)
            time.sleep(delay)
            attempt += 1

    def evidence(self, run: str | Mapping[str, Any]) -> EvidenceBundle:
        """The run's signed Evidence Bundle (``bundle``, ``signature``);
        before it is written: ``evidence_not_ready``."""
        return EvidenceBundle(self._client._request("GET", self._path(run, "/evidence")))

    def evidence_keys(self) -> builtins.list[Record]:
        """The server's evidence signing keys (``GET /v1/evidence-keys``):
        ``keyId``, ``algorithm`` (``ed25519``), ``publicKey`` (base64)."""
        return [Record(k) for k in (self._client._request("GET", "/v1/evidence-keys"))["data"]]

    def _evidence_when_ready(self, run: str | Mapping[str, Any], timeout: float = 60.0) -> EvidenceBundle:
        deadline = time.monotonic() + timeout
        attempt = 0
        while True:
            try:
                return self.evidence(run)
            except CrowNestApiError as e:
                if e.code != "evidence_not_ready" or time.monotonic() >= deadline:
                    raise
            time.sleep(wait_poll_delay(attempt))
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
        with pack_directory(directory, include_git=include_git) as packed:
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
                on_event(event)
        # The run's record turns terminal, and its evidence is written, a
        # moment after the `terminal` event.
        final = self.wait(created)
        return WorkspaceRunResult(final, self._evidence_when_ready(created))
