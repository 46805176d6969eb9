"""What the sync and async clients share: configuration, errors, records,
request bodies and queries, the retry policy and the SSE decoder. No I/O
happens here."""

from __future__ import annotations

import datetime as _dt
import email.utils
import http.cookiejar
import json
import os
import random
import re
import stat
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, Literal, NamedTuple, TypedDict, TypeVar, cast

import httpx

from ._types import (
    ArtifactView,
    AuditEventView,
    CommandStatus,
    CommandView,
    ContextView,
    FileView,
    PreviewStatus,
    PreviewView,
    RunCodeResultBody,
    RunStatus,
    SandboxMetricsView,
    WorkspaceRunView,
)
from ._version import __version__

DEFAULT_BASE_URL = "http://127.0.0.1:7420"
DEFAULT_TIMEOUT = 660.0
DEFAULT_MAX_RETRIES = 3
USER_AGENT = f"crownest-python/{__version__}"


# ---------------------------------------------------------------- errors


class CrowNestError(Exception):
    """Base class of every exception the SDK raises."""


class CrowNestApiError(CrowNestError):
    """The server answered with an error envelope
    (``{"error": {"code", "message", "details"}}``).

    ``status`` is the HTTP status, ``code`` the stable snake_case error code,
    ``details`` the structured details; ``str(e)`` is the server's message.
    """

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        details: Mapping[str, Any] | None = None,
        request_id: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.details: dict[str, Any] = dict(details or {})
        self.request_id = request_id

    def __str__(self) -> str:
        return self.message

    def __repr__(self) -> str:
        return f"CrowNestApiError(status={self.status}, code={self.code!r}, message={self.message!r})"


class CrowNestConnectionError(CrowNestError):
    """The request could not be completed over the network (after the
    retries the SDK is allowed to make)."""


class CrowNestTimeoutError(CrowNestError, TimeoutError):
    """A call ran past its time: a request got no answer within the
    client's ``timeout`` (or the call's ``request_timeout``), retries
    included, or a wait for something on the server (a Workspace Run to
    end, its evidence to be written) ran past its ``timeout``."""


def api_error_from_response(status: int, body: bytes, request_id: str | None) -> CrowNestApiError:
    try:
        envelope = json.loads(body)
        err = envelope["error"]
        return CrowNestApiError(
            status,
            str(err.get("code") or f"http_{status}"),
            str(err.get("message") or ""),
            err.get("details") or {},
            request_id,
        )
    except (ValueError, KeyError, TypeError, AttributeError):
        text = body.decode("utf-8", "replace").strip()
        return CrowNestApiError(status, f"http_{status}", text or f"HTTP {status}", {}, request_id)


# ---------------------------------------------------------------- config


def resolve_api_key(api_key: str | None) -> str:
    key = api_key if api_key is not None else os.environ.get("CROWNEST_API_KEY")
    if not key:
        raise CrowNestError("no API key: pass api_key= or set CROWNEST_API_KEY")
    return key


def resolve_base_url(base_url: str | None) -> str:
    url = base_url or os.environ.get("CROWNEST_BASE_URL") or DEFAULT_BASE_URL
    return url.rstrip("/")


def default_headers(api_key: str) -> dict[str, str]:
    return {"x-api-key": api_key, "user-agent": USER_AGENT, "accept": "application/json"}


def new_idempotency_key() -> str:
    return str(uuid.uuid4())


# ---------------------------------------------------------------- retries

#: Failures after which the request may or may not have reached the server.
_AMBIGUOUS = (httpx.ReadError, httpx.WriteError, httpx.RemoteProtocolError, httpx.TimeoutException)
#: Methods whose repetition does what one request does.
IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "PUT"})
#: Gateway and availability failures worth another try: the server does
#: not store a 5xx as an Idempotency-Key's answer, so a keyed retry runs
#: the request afresh.
RETRYABLE_5XX = frozenset({502, 503, 504})
#: 503s that another try within seconds will not cure (a template that
#: failed to build fails again, and takes minutes doing so).
PERSISTENT_503_CODES = frozenset({"template_unavailable"})


def may_retry(method: str, has_idempotency_key: bool, exc: Exception) -> bool:
    """Whether a network failure of this request may be retried.

    A connection that could not be made never reached the server, so that
    is always safe. Otherwise only idempotent requests are retried: GETs,
    PUTs (a whole-file write: writing it again gives the same file), and
    requests that carry an Idempotency-Key (the server replays the stored
    response instead of doing the work twice)."""
    if isinstance(exc, (httpx.ConnectError, httpx.ConnectTimeout)):
        return True
    if isinstance(exc, _AMBIGUOUS):
        return method in IDEMPOTENT_METHODS or has_idempotency_key
    return False


def retry_after_seconds(value: str | None, now: float | None = None) -> float | None:
    """A ``Retry-After`` header in seconds: delay-seconds (``"2"``) or an
    HTTP date (``"Wed, 21 Oct 2015 07:28:00 GMT"``, counted from ``now``,
    a Unix time); ``None`` when absent or unreadable."""
    if value is None:
        return None
    text = value.strip()
    if not text:
        return None
    try:
        seconds = float(text)
    except ValueError:
        pass
    else:
        return seconds if seconds >= 0 and seconds == seconds else None  # NaN is not a delay
    try:
        when = email.utils.parsedate_to_datetime(text)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=_dt.timezone.utc)
    reference = time.time() if now is None else now
    return max(0.0, when.timestamp() - reference)


def status_retry_delay(
    error: CrowNestApiError,
    retry_after: str | None,
    method: str,
    has_idempotency_key: bool,
    attempt: int,
) -> float | None:
    """How long to wait before retrying a request that got ``error``, or
    ``None`` when it is not retried. ``Retry-After`` wins over the backoff.

    - 429 with ``Retry-After`` (``rate_limited``): the server says when.
      Other 429s (``quota_exceeded``, ``too_many_streams``, …) last until
      the caller frees something, so they are raised at once.
    - 502, 503 (``capacity_exhausted``, ``sandbox_busy``, …), 504: for an
      idempotent method or a keyed request.
    - 409 ``idempotency_key_in_use``: the first request with this key (e.g.
      our own earlier attempt whose connection dropped) is still running.
    """
    after = retry_after_seconds(retry_after)
    delay = after if after is not None else backoff_delay(attempt)
    if error.status == 429:
        return after
    if error.status in RETRYABLE_5XX:
        if error.status == 503 and error.code in PERSISTENT_503_CODES:
            return None
        return delay if (method in IDEMPOTENT_METHODS or has_idempotency_key) else None
    if has_idempotency_key and error.code == "idempotency_key_in_use":
        return delay
    return None


def backoff_delay(attempt: int) -> float:
    """Exponential backoff with jitter: ~0.25 s, 0.5 s, 1 s, … capped at 8 s."""
    base: float = min(8.0, 0.25 * (2**attempt))
    return base * (0.5 + random.random() / 2)


class Deadline:
    """The end of one call, retries included: every attempt gets what is
    left of it, and no retry sleeps past it. ``None`` seconds: no end."""

    def __init__(self, seconds: float | None) -> None:
        self.seconds = seconds
        self._at = None if seconds is None else time.monotonic() + seconds

    def left(self) -> float | None:
        return None if self._at is None else self._at - time.monotonic()

    def allows(self, delay: float) -> bool:
        """Whether sleeping ``delay`` seconds leaves time for another attempt."""
        return self._at is None or time.monotonic() + delay < self._at

    def timeout(self, connect: float = 10.0) -> httpx.Timeout:
        """The httpx timeout of the next attempt: what is left (a blocking
        request waits in one read, so the read timeout bounds it)."""
        left = self.left()
        if left is None:
            return httpx.Timeout(None, connect=connect)
        left = max(left, 0.001)
        return httpx.Timeout(left, connect=min(left, connect))

    def expired(self) -> bool:
        left = self.left()
        return left is not None and left <= 0


def transport_error(method: str, path: str, exc: Exception, deadline: Deadline) -> CrowNestError:
    """What a failed request raises: ``CrowNestTimeoutError`` when the
    server did not answer in time, else ``CrowNestConnectionError``."""
    if isinstance(exc, httpx.TimeoutException) and not isinstance(exc, httpx.ConnectTimeout):
        limit = f" within {deadline.seconds:g} s" if deadline.seconds is not None else ""
        return CrowNestTimeoutError(f"{method} {path}: no answer{limit} ({exc!r})")
    return CrowNestConnectionError(f"{method} {path}: {exc!r}")


def deadline_error(method: str, path: str, deadline: Deadline) -> CrowNestTimeoutError:
    return CrowNestTimeoutError(f"{method} {path}: no answer within {deadline.seconds:g} s")


# ---------------------------------------------------------------- records

_CAMEL = re.compile(r"_([a-z0-9])")


def to_camel(name: str) -> str:
    return _CAMEL.sub(lambda m: m.group(1).upper(), name)


#: The TypedDict (``crownest.types``) of a record's JSON object.
D = TypeVar("D", bound=Mapping[str, Any])


class Record(Mapping[str, Any], Generic[D]):
    """A JSON object from the API: mapping access (``r["exitCode"]``),
    attribute access (``r.exitCode`` or ``r.exit_code``) and ``to_dict()``,
    a deep copy typed as the object's TypedDict ``D`` (from
    docs/openapi.json, see ``crownest.types``)."""

    def __init__(self, data: Mapping[str, Any]) -> None:
        self._data: dict[str, Any] = dict(data)

    def __getitem__(self, key: str) -> Any:
        return self._data[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        data = self.__dict__.get("_data", {})
        if name in data:
            return data[name]
        camel = to_camel(name)
        if camel in data:
            return data[camel]
        raise AttributeError(f"{type(self).__name__} has no attribute {name!r}")

    def to_dict(self) -> D:
        return cast(D, json.loads(json.dumps(self._data)))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._data!r})"


class CommandResult(Record[CommandView]):
    """A command record: ``id``, ``status`` (``running``, ``completed``,
    ``failed``, ``timed_out``, ``canceled``), ``exitCode``, ``stdout``,
    ``stderr``, ``artifacts`` (with ``collect``), timestamps. A non-zero
    exit is a result, not an exception."""

    @property
    def id(self) -> str:
        return str(self._data["id"])

    @property
    def status(self) -> CommandStatus:
        return cast(CommandStatus, str(self._data["status"]))

    @property
    def exit_code(self) -> int | None:
        code = self._data.get("exitCode")
        return int(code) if code is not None else None


class Artifact(Record[ArtifactView]):
    """An artifact: ``id`` (``art_…``), ``name``, ``sha256``, ``size``,
    ``mime``, ``sandboxId``, ``sourcePath``, ``createdAt``."""

    @property
    def id(self) -> str:
        return str(self._data["id"])


class Preview(Record[PreviewView]):
    """A preview: ``id`` (``prv_…``), ``sandboxId``, ``port``, ``status``
    (``active`` | ``closed``), ``url`` (the preview's own origin,
    ``http://prv-….localhost:PORT/`` by default), ``createdAt``,
    ``closedAt``, ``closeReason``; right after ``create`` also ``token``
    and ``browserUrl`` (shown once)."""

    @property
    def id(self) -> str:
        return str(self._data["id"])

    @property
    def url(self) -> str:
        return str(self._data["url"])

    @property
    def status(self) -> PreviewStatus:
        return cast(PreviewStatus, str(self._data["status"]))


def preview_id_of(preview: str | Mapping[str, Any]) -> str:
    return preview if isinstance(preview, str) else str(preview["id"])


def preview_target(preview: Mapping[str, Any], path: str) -> str:
    """The URL of ``path`` under a preview's URL."""
    return str(preview["url"]) + path.lstrip("/")


LOOPBACK_ADDRESS = "127.0.0.1"


def no_cookies() -> http.cookiejar.CookieJar:
    """The client's cookie jar: it keeps nothing. The API authenticates by
    key, and a cookie an app behind a preview sets must not be sent to the
    API or to another preview (on loopback they all share 127.0.0.1)."""
    return http.cookiejar.CookieJar(policy=http.cookiejar.DefaultCookiePolicy(allowed_domains=[]))


def is_loopback_name(host: str) -> bool:
    """``localhost`` or a name under it (``prv-….localhost``): browsers
    resolve these to loopback on their own, the system resolver often
    does not."""
    host = host.lower().rstrip(".")
    return host == "localhost" or host.endswith(".localhost")


@dataclass(frozen=True)
class PreviewRequest:
    """Where to send one request to a preview: ``url`` to connect to,
    ``headers`` (the caller's, plus ``Host`` when ``url`` differs from the
    preview's) and httpx request ``extensions``."""

    url: str
    headers: dict[str, str]
    extensions: dict[str, Any]


def preview_request(
    preview: Mapping[str, Any], path: str, headers: Mapping[str, str] | None = None
) -> PreviewRequest:
    """The request for ``path`` under a preview's URL. A preview has its own
    origin, ``prv-….{preview domain}``; for the default domain (under
    ``localhost``) the request goes to 127.0.0.1 on the URL's scheme and
    port with ``Host`` set to the URL's ``host[:port]``, which is how the
    server picks the preview. Other URLs are requested as they are."""
    target = httpx.URL(preview_target(preview, path))
    if not is_loopback_name(target.host):
        return PreviewRequest(str(target), dict(headers or {}), {})
    sent = {k: v for k, v in (headers or {}).items() if k.lower() != "host"}
    sent["Host"] = target.netloc.decode("ascii")  # host[:port], the port unless the scheme's default
    # For https, TLS still names (SNI) and verifies the preview's host.
    extensions: dict[str, Any] = {"sni_hostname": target.host} if target.scheme == "https" else {}
    return PreviewRequest(str(target.copy_with(host=LOOPBACK_ADDRESS)), sent, extensions)


class FileInfo(Record[FileView]):
    """A file or directory of /workspace: ``name``, ``path`` (absolute),
    ``type`` (``file``, ``dir``, ``symlink``, ``other``), ``size``, ``mode``,
    ``mtime``."""

    @property
    def path(self) -> str:
        return str(self._data["path"])


class FileListing(list[FileInfo]):
    """A directory's entries, sorted by name; ``truncated`` is true when the
    directory has more entries than one listing returns."""

    def __init__(self, entries: list[FileInfo], truncated: bool) -> None:
        super().__init__(entries)
        self.truncated = truncated


def file_listing(body: Mapping[str, Any]) -> FileListing:
    return FileListing([FileInfo(e) for e in body["data"]], bool(body.get("truncated")))


def mkdir_body(path: str, parents: bool) -> dict[str, Any]:
    body: dict[str, Any] = {"path": path}
    if parents:
        body["parents"] = True
    return body


def move_body(source: str, destination: str, overwrite: bool) -> dict[str, Any]:
    body: dict[str, Any] = {"from": source, "to": destination}
    if overwrite:
        body["overwrite"] = True
    return body


def as_bytes(data: str | bytes | bytearray | memoryview) -> bytes:
    return data.encode("utf-8") if isinstance(data, str) else bytes(data)


OCTET_STREAM = {"content-type": "application/octet-stream"}


# ---------------------------------------------------------------- shapes


class CollectSpec(TypedDict, total=False):
    path: str  # required
    name: str


class ExitInfo(TypedDict):
    status: str
    exitCode: int | None
    signal: int | None
    error: str | None


@dataclass(frozen=True)
class LogEvent:
    """One event of a command's log stream: ``stdout`` or ``stderr`` text
    (``data``), or the final ``exit`` (``exit`` holds status/exitCode/...).
    ``id`` is the event number to resume after."""

    type: Literal["stdout", "stderr", "exit"]
    data: str = ""
    id: int | None = None
    exit: ExitInfo | None = field(default=None)


def command_body(
    command: str,
    *,
    cwd: str | None,
    env: Mapping[str, str] | None,
    timeout_ms: int | None,
    collect: list[CollectSpec] | None,
    background: bool,
    stdin: bool,
) -> dict[str, Any]:
    body: dict[str, Any] = {"command": command}
    if cwd is not None:
        body["cwd"] = cwd
    if env is not None:
        body["env"] = dict(env)
    if timeout_ms is not None:
        body["timeoutMs"] = timeout_ms
    if collect is not None:
        body["collect"] = [dict(c) for c in collect]
    if background:
        body["background"] = True
    if stdin:
        body["stdin"] = True
    return body


def sandbox_body(
    template: str,
    ttl_ms: int | None,
    metadata: Mapping[str, Any] | None,
    network: Mapping[str, Any] | None = None,
    env: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    body: dict[str, Any] = {"template": template}
    if ttl_ms is not None:
        body["ttlMs"] = ttl_ms
    if metadata is not None:
        body["metadata"] = dict(metadata)
    if network is not None:
        body["network"] = dict(network)
    if env is not None:
        body["env"] = dict(env)
    return body


def network_body(mode: str | None, allow: Sequence[str] | None, deny: Sequence[str] | None) -> dict[str, Any]:
    """The body of ``PATCH /v1/sandboxes/{id}/network``: each part omitted
    keeps the template's."""
    body: dict[str, Any] = {}
    if mode is not None:
        body["mode"] = mode
    if allow is not None:
        body["allow"] = list(allow)
    if deny is not None:
        body["deny"] = list(deny)
    return body


def stdin_body(data: str | bytes | None, close: bool) -> dict[str, Any]:
    import base64

    body: dict[str, Any] = {}
    if isinstance(data, bytes):
        body["dataBase64"] = base64.b64encode(data).decode("ascii")
    elif data is not None:
        body["data"] = data
    if close:
        body["close"] = True
    return body


#: A time of a query: an aware ``datetime`` or an RFC 3339 string as it is.
TimeParam = _dt.datetime | str


def rfc3339_param(name: str, value: TimeParam) -> str:
    """``value`` as the RFC 3339 text of a query (UTC, milliseconds). A
    naive ``datetime`` is refused: whose clock it means is a guess."""
    if isinstance(value, str):
        return value
    if not isinstance(value, _dt.datetime):
        raise TypeError(f"{name} must be a datetime or an RFC 3339 string, not {type(value).__name__}")
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError(f"{name} is a naive datetime: give it a tzinfo (e.g. datetime.now(timezone.utc))")
    text = value.astimezone(_dt.timezone.utc).isoformat(timespec="milliseconds")
    return text.replace("+00:00", "Z")


def metadata_filter_value(value: Any) -> str:
    """How the server compares a metadata filter: a string as it is, a
    number, boolean or null by its JSON text."""
    return value if isinstance(value, str) else json.dumps(value)


Query = list[tuple[str, str | int | float | bool | None]]


def sandbox_list_params(
    *,
    status: str | None,
    template: str | None,
    metadata: Mapping[str, Any] | None,
    created_after: TimeParam | None,
    created_before: TimeParam | None,
    limit: int | None,
    cursor: str | None,
) -> Query:
    """Query of ``GET /v1/sandboxes``: ``status``, ``template``, one
    ``metadata[KEY]=VALUE`` per entry (all must match), ``createdAfter`` /
    ``createdBefore`` (exclusive), ``limit``, ``cursor``."""
    params: Query = []
    if status is not None:
        params.append(("status", status))
    if template is not None:
        params.append(("template", template))
    for key, value in (metadata or {}).items():
        params.append((f"metadata[{key}]", metadata_filter_value(value)))
    if created_after is not None:
        params.append(("createdAfter", rfc3339_param("created_after", created_after)))
    if created_before is not None:
        params.append(("createdBefore", rfc3339_param("created_before", created_before)))
    params.extend((k, str(v)) for k, v in page_params(limit, cursor).items())
    return params


def usage_params(from_: TimeParam | None, to: TimeParam | None, group_by: str | None) -> dict[str, str]:
    """Query of ``GET /v1/usage``."""
    params: dict[str, str] = {}
    if from_ is not None:
        params["from"] = rfc3339_param("from_", from_)
    if to is not None:
        params["to"] = rfc3339_param("to", to)
    if group_by is not None:
        params["groupBy"] = group_by
    return params


def audit_params(
    *,
    resource_id: str | None,
    action: str | None,
    from_: TimeParam | None,
    to: TimeParam | None,
    limit: int | None,
    cursor: str | None,
) -> dict[str, Any]:
    """Query of ``GET /v1/audit-events``."""
    params: dict[str, Any] = {}
    if resource_id is not None:
        params["resourceId"] = resource_id
    if action is not None:
        params["action"] = action
    if from_ is not None:
        params["from"] = rfc3339_param("from_", from_)
    if to is not None:
        params["to"] = rfc3339_param("to", to)
    params.update(page_params(limit, cursor))
    return params


def page_params(limit: int | None, cursor: str | None) -> dict[str, Any]:
    params: dict[str, Any] = {}
    if limit is not None:
        params["limit"] = limit
    if cursor is not None:
        params["cursor"] = cursor
    return params


# ---------------------------------------------------------------- SSE


@dataclass
class ServerSentEvent:
    event: str
    data: str
    id: str | None


class SSEDecoder:
    """Line-fed decoder of ``text/event-stream`` (the WHATWG rules that
    matter here: ``event``, ``data`` (joined by newlines), ``id``, comments,
    dispatch on a blank line)."""

    def __init__(self) -> None:
        self._event = ""
        self._data: list[str] = []
        self._id: str | None = None

    def feed(self, line: str) -> ServerSentEvent | None:
        if line == "":
            if not self._data and not self._event:
                return None
            ev = ServerSentEvent(self._event or "message", "\n".join(self._data), self._id)
            self._event, self._data, self._id = "", [], None
            return ev
        if line.startswith(":"):
            return None
        name, _, value = line.partition(":")
        if value.startswith(" "):
            value = value[1:]
        if name == "event":
            self._event = value
        elif name == "data":
            self._data.append(value)
        elif name == "id" and "\0" not in value:
            self._id = value
        return None


def log_event_from_sse(ev: ServerSentEvent) -> LogEvent | None:
    try:
        payload = json.loads(ev.data) if ev.data else {}
    except ValueError:
        return None
    event_id = int(ev.id) if ev.id and ev.id.isdigit() else None
    if ev.event in ("stdout", "stderr"):
        return LogEvent(ev.event, str(payload.get("data", "")), event_id)  # type: ignore[arg-type]
    if ev.event == "exit":
        info: ExitInfo = {
            "status": str(payload.get("status", "")),
            "exitCode": payload.get("exitCode"),
            "signal": payload.get("signal"),
            "error": payload.get("error"),
        }
        return LogEvent("exit", "", event_id, info)
    return None


# ---------------------------------------------------------------- code

#: Languages of Code Contexts and Code Runs.
CodeLanguage = Literal["python", "javascript", "typescript"]
#: ``inline`` (the default) keeps rich outputs in the result; ``promote``
#: turns eligible ones into artifacts.
ArtifactPolicy = Literal["inline", "promote"]


class CodeContext(Record[ContextView]):
    """A Code Context: ``id`` (``cctx_…``), ``sandboxId``, ``language``,
    ``cwd``, ``implementation``, ``isDefault``, ``createdAt``. Its
    interpreter keeps variables and imports across Code Runs."""

    @property
    def id(self) -> str:
        return str(self._data["id"])

    @property
    def language(self) -> str:
        return str(self._data["language"])


class CodeRunResult(Record[RunCodeResultBody]):
    """The result of a Code Run: ``contextId``, ``stdout`` and ``stderr``
    (ordered lists of chunks), ``outputs`` (``inline``, ``artifact`` or
    ``rejected`` rich outputs), ``executionCount``, ``error`` (``{name,
    message, traceback}`` or ``None``: an interpreter exception is a result,
    not an SDK exception), ``durationMs``, ``interpreterRestarted``,
    ``stateLost``, ``notes``. ``text`` / ``error_text`` join the chunks."""

    @property
    def context_id(self) -> str:
        return str(self._data["contextId"])

    @property
    def error(self) -> dict[str, Any] | None:
        err = self._data.get("error")
        return dict(err) if err else None

    @property
    def text(self) -> str:
        """All stdout chunks joined."""
        return "".join(self._data.get("stdout") or [])

    @property
    def error_text(self) -> str:
        """All stderr chunks joined."""
        return "".join(self._data.get("stderr") or [])


def context_id_of(context: str | Mapping[str, Any] | None) -> str | None:
    """A context id from an id or a context record."""
    if context is None or isinstance(context, str):
        return context
    return str(context["id"])


def code_context_body(language: str, cwd: str | None, env: Mapping[str, str] | None) -> dict[str, Any]:
    body: dict[str, Any] = {"language": language}
    if cwd is not None:
        body["cwd"] = cwd
    if env is not None:
        body["env"] = dict(env)
    return body


def code_run_body(
    code: str,
    *,
    language: str,
    context_id: str | Mapping[str, Any] | None,
    artifact_policy: str | None,
    timeout_ms: int | None,
) -> dict[str, Any]:
    body: dict[str, Any] = {"language": language, "code": code}
    cid = context_id_of(context_id)
    if cid is not None:
        body["contextId"] = cid
    if artifact_policy is not None:
        body["artifactPolicy"] = artifact_policy
    if timeout_ms is not None:
        body["timeoutMs"] = timeout_ms
    return body


#: Headers of a streamed Code Run.
CODE_STREAM_HEADERS = {"accept": "text/event-stream"}


def code_event_from_sse(ev: ServerSentEvent, status: int) -> tuple[str, Any] | None:
    """One event of a streamed Code Run as ``(kind, payload)``: ``stdout`` /
    ``stderr`` with the text, ``output`` with the output object, ``error``
    with the interpreter error, ``complete`` with the RunCodeResult. An
    ``error`` event whose data is the error envelope ``{"error": {...}}``
    (the run failed on the server side after the stream began) is raised
    as ``CrowNestApiError``; the interpreter's error has ``name`` and
    ``message`` instead."""
    try:
        payload = json.loads(ev.data) if ev.data else {}
    except ValueError:
        return None
    if ev.event in ("stdout", "stderr"):
        return ev.event, str(payload.get("text", ""))
    if ev.event == "output":
        return "output", payload
    if ev.event == "error":
        if isinstance(payload, dict) and isinstance(payload.get("error"), dict):
            err = payload["error"]
            raise CrowNestApiError(
                status if status >= 400 else 500,
                str(err.get("code") or "internal"),
                str(err.get("message") or ""),
                err.get("details") or {},
            )
        return "error", payload
    if ev.event == "complete":
        return "complete", payload
    return None


# ---------------------------------------------------------------- workspace runs

#: Statuses a Workspace Run ends in.
TERMINAL_RUN_STATUSES = frozenset({"succeeded", "failed", "canceled"})
#: How long ``wait`` waits, after the end, for the evidence to be written.
EVIDENCE_GRACE = 30.0


class ArchiveSpec(TypedDict):
    """The archive a Workspace Run expects: ``sizeBytes`` and ``sha256``
    (64 lower-case hex) of the ``.tar.gz``."""

    sizeBytes: int
    sha256: str


class WorkspaceRun(Record[WorkspaceRunView]):
    """A Workspace Run: ``id`` (``wsr_…``), ``status`` (``awaiting_archive``,
    ``queued``, ``extracting``, ``running``, ``succeeded``, ``failed``,
    ``canceled``), ``reason``, ``template``, ``command``, ``env``,
    ``archive`` (``sizeBytes``, ``sha256``, ``uploaded``), ``artifacts``
    (what to collect), ``collected`` (``artifactId``, ``sha256``, … or
    ``error``), ``timeoutMs``, ``keepSandbox``, ``metadata``,
    ``sandboxId``, ``exitCode``, timestamps and ``evidenceReady``."""

    @property
    def id(self) -> str:
        return str(self._data["id"])

    @property
    def status(self) -> RunStatus:
        return cast(RunStatus, str(self._data["status"]))

    @property
    def reason(self) -> str | None:
        reason = self._data.get("reason")
        return str(reason) if reason is not None else None

    @property
    def exit_code(self) -> int | None:
        code = self._data.get("exitCode")
        return int(code) if code is not None else None

    @property
    def terminal(self) -> bool:
        """Whether the run has ended (``succeeded``, ``failed`` or ``canceled``)."""
        return self.status in TERMINAL_RUN_STATUSES


@dataclass(frozen=True)
class WorkspaceRunEvent:
    """One event of a Workspace Run's log, numbered ``seq`` 1, 2, 3, …:
    ``type`` (``status``, ``archive_progress``, ``stdout``, ``stderr``,
    ``artifact_collected``, ``artifact_error``, ``heartbeat``, ``terminal``,
    ``error``), ``at`` (a timestamp) and ``data`` (per type; ``data["data"]``
    is the text of ``stdout``/``stderr``)."""

    seq: int
    type: str
    at: str
    data: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return {"seq": self.seq, "type": self.type, "at": self.at, "data": json.loads(json.dumps(self.data))}


@dataclass(frozen=True)
class WorkspaceRunEventPage:
    """One page of ``GET …/events``: ``data``, ``next_after_seq`` (the
    ``after_seq`` of the next page) and ``terminal`` (the log is complete)."""

    data: list[WorkspaceRunEvent]
    next_after_seq: int
    terminal: bool


@dataclass(frozen=True)
class WorkspaceRunPage:
    """One page of ``GET /v1/workspace-runs``: ``data`` (newest first) and
    ``next_cursor`` (``None`` on the last page)."""

    data: list[WorkspaceRun]
    next_cursor: str | None


class EvidenceBundle(Record[dict[str, Any]]):
    """A Workspace Run's signed Evidence Bundle: ``bundle`` (``runId``,
    ``status``, ``command``, ``template``, ``archive``, ``artifacts`` with
    their ``sha256``, ``terminalEvent``, ``events`` ``{count, sha256}``, …)
    and ``signature`` (``algorithm`` ``ed25519``, ``keyId``, ``value``
    base64) over the canonical JSON of ``bundle``."""

    @property
    def bundle(self) -> dict[str, Any]:
        return dict(self._data["bundle"])

    @property
    def signature(self) -> dict[str, Any]:
        return dict(self._data["signature"])


class WorkspaceRunResult(NamedTuple):
    """What ``run_directory`` returns: the terminal ``run`` and its
    ``evidence``; unpacks as ``run, evidence = …``."""

    run: WorkspaceRun
    evidence: EvidenceBundle


def run_id_of(run: str | Mapping[str, Any]) -> str:
    return run if isinstance(run, str) else str(run["id"])


def workspace_run_body(
    command: str,
    *,
    archive: Mapping[str, Any],
    template: str | None,
    artifacts: Sequence[CollectSpec] | None,
    timeout_ms: int | None,
    env: Mapping[str, str] | None,
    keep_sandbox: bool | None,
    metadata: Mapping[str, Any] | None,
) -> dict[str, Any]:
    body: dict[str, Any] = {
        "command": command,
        "archive": {"sizeBytes": archive["sizeBytes"], "sha256": archive["sha256"]},
    }
    if template is not None:
        body["template"] = template
    if artifacts is not None:
        body["artifacts"] = [dict(a) for a in artifacts]
    if timeout_ms is not None:
        body["timeoutMs"] = timeout_ms
    if env is not None:
        body["env"] = dict(env)
    if keep_sandbox is not None:
        body["keepSandbox"] = keep_sandbox
    if metadata is not None:
        body["metadata"] = dict(metadata)
    return body


def workspace_run_list_params(
    status: str | None, metadata: Mapping[str, Any] | None, limit: int | None, cursor: str | None
) -> list[tuple[str, str | int | float | bool | None]]:
    """Query of ``GET /v1/workspace-runs``: ``status``, one
    ``metadata.<key>=<value>`` per entry (all must match), ``limit``, ``cursor``."""
    params: list[tuple[str, str | int | float | bool | None]] = []
    if status is not None:
        params.append(("status", status))
    for key, value in (metadata or {}).items():
        params.append((f"metadata.{key}", value if isinstance(value, str) else json.dumps(value)))
    params.extend((k, str(v)) for k, v in page_params(limit, cursor).items())
    return params


def workspace_run_page(body: Mapping[str, Any]) -> WorkspaceRunPage:
    return WorkspaceRunPage([WorkspaceRun(d) for d in body["data"]], body.get("nextCursor") or None)


def run_event_from_dict(payload: Mapping[str, Any]) -> WorkspaceRunEvent:
    return WorkspaceRunEvent(
        int(payload["seq"]), str(payload["type"]), str(payload.get("at", "")), dict(payload.get("data") or {})
    )


def run_event_page(body: Mapping[str, Any], after_seq: int) -> WorkspaceRunEventPage:
    events = [run_event_from_dict(e) for e in body["data"]]
    nxt = body.get("nextAfterSeq")
    if nxt is None:
        nxt = events[-1].seq if events else after_seq
    return WorkspaceRunEventPage(events, int(nxt), bool(body.get("terminal")))


def run_event_params(after_seq: int | None, limit: int | None) -> dict[str, Any]:
    params: dict[str, Any] = {}
    if after_seq is not None:
        params["afterSeq"] = after_seq
    if limit is not None:
        params["limit"] = limit
    return params


def run_event_from_sse(ev: ServerSentEvent, status: int = 200) -> WorkspaceRunEvent | None:
    """An SSE event of ``GET …/events`` as a run event (its ``data`` is the
    event object). An error envelope in the stream is raised as
    ``CrowNestApiError``; what is neither is skipped."""
    try:
        payload = json.loads(ev.data) if ev.data else None
    except ValueError:
        return None
    if not isinstance(payload, dict):
        return None
    if "seq" not in payload and isinstance(payload.get("error"), dict):
        err = payload["error"]
        raise CrowNestApiError(
            status if status >= 400 else 500,
            str(err.get("code") or "internal"),
            str(err.get("message") or ""),
            err.get("details") or {},
        )
    if "seq" not in payload or "type" not in payload:
        return None
    try:
        return run_event_from_dict(payload)
    except (TypeError, ValueError):
        return None


def event_stream_request(after_seq: int) -> tuple[dict[str, str], dict[str, Any]]:
    """Headers and query of one SSE connection resuming after ``after_seq``."""
    headers = {"accept": "text/event-stream"}
    if after_seq > 0:
        headers["Last-Event-ID"] = str(after_seq)
    return headers, {"afterSeq": after_seq}


def wait_poll_delay(attempt: int) -> float:
    """Polling interval of ``wait``: 0.2 s growing to 2 s."""
    return float(min(2.0, 0.2 * (1.5**attempt)))


# ---------------------------------------------------------------- metrics, watch, audit


#: One sample of ``GET /v1/sandboxes/{id}/metrics`` (and each ``metrics``
#: event of its stream): CPU time used so far (``cpuUsageSeconds``) and
#: over the last interval (``cpuPercent``, 100 = one CPU busy), memory,
#: pids, workspace bytes and egress bytes, each with its limit. The
#: generated ``SandboxMetricsView``, under a shorter name.
SandboxMetrics = SandboxMetricsView


#: What a change under a watched directory was (``overflow``: the agent's
#: bounded queue dropped ``dropped`` events).
WatchEventType = Literal["create", "modify", "delete", "rename", "overflow"]
_CHANGE_TYPES = frozenset({"create", "modify", "delete", "rename"})


class WatchEvent(TypedDict, total=False):
    """One change under a watched directory, as ``files.watch`` passes it
    on: ``type``, ``path`` (absolute, under /workspace), ``isDir``,
    ``oldPath`` (``rename`` only); for ``overflow`` only ``dropped``."""

    type: WatchEventType
    path: str
    isDir: bool
    oldPath: str
    dropped: int


def sse_error(payload: Any, status: int) -> CrowNestApiError | None:
    """The error envelope an SSE stream sent in place of an event, if it is one."""
    if isinstance(payload, dict) and isinstance(payload.get("error"), dict):
        err = payload["error"]
        return CrowNestApiError(
            status if status >= 400 else 500,
            str(err.get("code") or "internal"),
            str(err.get("message") or ""),
            err.get("details") or {},
        )
    return None


def _json_or_none(data: str) -> Any:
    try:
        return json.loads(data) if data else None
    except ValueError:
        return None


def metrics_event_from_sse(ev: ServerSentEvent, status: int = 200) -> tuple[str, Any] | None:
    """One event of the metrics stream: ``("metrics", sample)`` or
    ``("end", {"status": ...})``; an error envelope is raised; anything
    else is skipped."""
    payload = _json_or_none(ev.data)
    if ev.event == "error" or (ev.event not in ("metrics", "end") and sse_error(payload, status)):
        error = sse_error(payload, status)
        if error is not None:
            raise error
        return None
    if ev.event == "metrics" and isinstance(payload, dict):
        return "metrics", payload
    if ev.event == "end":
        return "end", payload if isinstance(payload, dict) else {}
    return None


def watch_event_from_sse(ev: ServerSentEvent, status: int = 200) -> tuple[str, Any] | None:
    """One event of the watch stream, checked (what a sandbox reports is
    not trusted): ``("ready", {"path"})``, ``("change", WatchEvent)`` for a
    change or an overflow; an error envelope is raised; a malformed or
    unknown event is skipped."""
    payload = _json_or_none(ev.data)
    if ev.event == "error":
        error = sse_error(payload, status)
        if error is not None:
            raise error
        return None
    if not isinstance(payload, dict):
        return None
    if ev.event == "ready":
        return "ready", {"path": str(payload.get("path", ""))}
    if ev.event == "overflow":
        dropped = payload.get("dropped")
        overflow: WatchEvent = {"type": "overflow", "dropped": dropped if isinstance(dropped, int) else 0}
        return "change", overflow
    if ev.event == "change":
        kind, path = payload.get("type"), payload.get("path")
        if kind not in _CHANGE_TYPES or not isinstance(path, str):
            return None
        change: WatchEvent = {"type": kind, "path": path, "isDir": payload.get("isDir") is True}
        old = payload.get("oldPath")
        if kind == "rename" and isinstance(old, str):
            change["oldPath"] = old
        return "change", change
    return None


def watch_params(path: str | None, recursive: bool) -> dict[str, str]:
    params = {"recursive": "true" if recursive else "false"}
    if path is not None:
        params["path"] = path
    return params


class AuditEvent(Record[AuditEventView]):
    """An audit event: ``id`` (``evt_…``), ``at``, ``actor``, ``action``
    (``sandbox.create``, ``sandbox.timeout``, …), ``resourceType``,
    ``resourceId``, ``outcome`` (``success``, ``denied``, ``failed``),
    ``status``, ``requestId``, ``details``."""

    @property
    def id(self) -> str:
        return str(self._data["id"])

    @property
    def action(self) -> str:
        return str(self._data["action"])


def file_source_size(source: Any) -> int | None:
    """How many bytes a binary file has left from its position: from
    ``fstat`` for a regular file, else by seeking, else ``None`` (a pipe,
    a socket, an iterable: spooled to a temporary file to learn it)."""
    try:
        fileno = source.fileno()
        st = os.fstat(fileno)
    except (AttributeError, OSError, ValueError):
        st = None
    if st is not None and stat.S_ISREG(st.st_mode):
        try:
            return max(0, st.st_size - int(source.tell()))
        except (AttributeError, OSError, ValueError):
            pass
    try:
        if not source.seekable():
            return None
        pos = source.tell()
        end = source.seek(0, os.SEEK_END)
        source.seek(pos)
        return max(0, int(end - pos))
    except (AttributeError, OSError, ValueError):
        return None


class WriteEntry(TypedDict):
    """One file of ``files.write_files``: its ``path`` and ``data`` (text is
    UTF-8 encoded)."""

    path: str
    data: str | bytes


#: Files up to this size are read and written directly (one request);
#: larger ones through staged transfer URLs.
DIRECT_FILE_MAX = 32 * 1024 * 1024
#: Chunk size of streamed file bodies.
FILE_CHUNK = 1024 * 1024
