"""Retries and deadlines against a scripted fake server (http.server on
127.0.0.1), and the pure helpers behind them. No crownest server needed.
Every test taking ``kind`` runs with both clients."""

from __future__ import annotations

import datetime as dt
import email.utils
import http.server
import io
import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import anyio
import pytest
from conftest import aclose, alist, aw, make_client

from crownest import CrowNestApiError, CrowNestConnectionError, CrowNestTimeoutError
from crownest._shared import (
    SSEDecoder,
    ServerSentEvent,
    rfc3339_param,
    retry_after_seconds,
    sandbox_list_params,
    status_retry_delay,
    watch_event_from_sse,
)

pytestmark = pytest.mark.anyio

KINDS = ["sync", "async"]

SANDBOX = {"id": "sbx_fake", "status": "running", "template": "python", "metadata": {}, "expiresAt": "x"}


@dataclass
class Reply:
    status: int
    body: dict[str, Any]
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0
    #: An SSE answer instead: these chunks, then the connection held open
    #: for ``hold`` seconds.
    sse: list[str] | None = None
    hold: float = 0.0


def error(status: int, code: str, **headers: str) -> Reply:
    return Reply(status, {"error": {"code": code, "message": code.replace("_", " "), "details": {}}}, headers)


@dataclass
class Seen:
    method: str
    path: str
    headers: dict[str, str]
    at: float


class FakeServer:
    """Answers each request with the next scripted reply (the last one
    again once the script is used up) and records what it was sent."""

    def __init__(self, replies: list[Reply]) -> None:
        self.replies = replies
        self.seen: list[Seen] = []
        self.lock = threading.Lock()
        fake = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def _answer(self) -> None:
                length = int(self.headers.get("content-length") or 0)
                if length:
                    self.rfile.read(length)
                elif self.headers.get("transfer-encoding") == "chunked":
                    while (size := int(self.rfile.readline().strip() or b"0", 16)) > 0:
                        self.rfile.read(size + 2)
                    self.rfile.readline()
                with fake.lock:
                    fake.seen.append(Seen(self.command, self.path, dict(self.headers), time.monotonic()))
                    reply = fake.replies.pop(0) if len(fake.replies) > 1 else fake.replies[0]
                if reply.delay:
                    time.sleep(reply.delay)
                if reply.sse is not None:
                    try:
                        self.send_response(reply.status)
                        self.send_header("content-type", "text/event-stream")
                        self.send_header("connection", "close")
                        self.end_headers()
                        for chunk in reply.sse:
                            self.wfile.write(chunk.encode())
                            self.wfile.flush()
                        time.sleep(reply.hold)
                    except OSError:
                        pass
                    self.close_connection = True
                    return
                payload = json.dumps(reply.body).encode()
                try:
                    self.send_response(reply.status)
                    for k, v in reply.headers.items():
                        self.send_header(k, v)
                    self.send_header("content-type", "application/json")
                    self.send_header("content-length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                except OSError:
                    pass  # the client gave up first

            do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = _answer

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.base_url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def fake() -> Iterator[Any]:
    servers: list[FakeServer] = []

    def start(*replies: Reply) -> FakeServer:
        server = FakeServer(list(replies))
        servers.append(server)
        return server

    yield start
    for s in servers:
        s.close()


# ------------------------------------------------------------ against the fake server


@pytest.mark.parametrize("kind", KINDS)
async def test_a_keyed_create_retries_a_503_after_its_retry_after(kind: str, fake: Any) -> None:
    server = fake(error(503, "capacity_exhausted", **{"Retry-After": "1"}), Reply(201, SANDBOX))
    client = make_client(kind, api_key="cn_live_x", base_url=server.base_url)
    try:
        started = time.monotonic()
        sandbox = await aw(client.sandboxes.create(template="python"))
        elapsed = time.monotonic() - started
    finally:
        await aclose(client)
    assert sandbox.id == "sbx_fake"
    assert [s.method for s in server.seen] == ["POST", "POST"]
    keys = [s.headers.get("Idempotency-Key") for s in server.seen]
    assert keys[0] and keys[0] == keys[1], "the retry carries the same Idempotency-Key"
    gap = server.seen[1].at - server.seen[0].at
    assert gap >= 0.95, f"Retry-After: 1 was not honoured (retried after {gap:.2f} s)"
    assert elapsed < 5


@pytest.mark.parametrize("kind", KINDS)
async def test_retry_after_may_be_an_http_date(kind: str, fake: Any) -> None:
    when = email.utils.formatdate(time.time() + 2, usegmt=True)  # whole seconds: 1 … 2 s from now
    server = fake(error(503, "sandbox_busy", **{"Retry-After": when}), Reply(200, SANDBOX))
    client = make_client(kind, api_key="cn_live_x", base_url=server.base_url)
    try:
        await aw(client.sandboxes.get("sbx_fake"))  # a GET: idempotent, retried without a key
    finally:
        await aclose(client)
    assert len(server.seen) == 2
    assert server.seen[1].at - server.seen[0].at >= 0.9


@pytest.mark.parametrize("kind", KINDS)
async def test_retries_never_outlast_the_clients_timeout(kind: str, fake: Any) -> None:
    # Always 503 with Retry-After: 1, timeout 2 s: without one deadline per
    # call this would take 3 retries × 1 s plus 4 attempts; with it the call
    # gives up once another wait would pass the deadline.
    server = fake(error(503, "capacity_exhausted", **{"Retry-After": "1"}))
    client = make_client(kind, api_key="cn_live_x", base_url=server.base_url, timeout=2)
    try:
        started = time.monotonic()
        with pytest.raises(CrowNestApiError) as info:
            await aw(client.sandboxes.create(template="python"))
        elapsed = time.monotonic() - started
    finally:
        await aclose(client)
    assert (info.value.status, info.value.code) == (503, "capacity_exhausted")
    assert elapsed < 2.5, f"took {elapsed:.2f} s, past the 2 s timeout"
    assert 1 <= len(server.seen) <= 2


@pytest.mark.parametrize("kind", KINDS)
async def test_a_server_that_does_not_answer_is_bounded_by_request_timeout(kind: str, fake: Any) -> None:
    # A keyed POST that times out is retryable (the key makes it safe), but
    # the retries share the call's one deadline: 1 s, not 4 × 1 s.
    server = fake(Reply(200, SANDBOX, delay=5))
    client = make_client(kind, api_key="cn_live_x", base_url=server.base_url)
    try:
        started = time.monotonic()
        with pytest.raises(CrowNestTimeoutError):
            await aw(client.sandboxes.create(template="python", request_timeout=1))
        elapsed = time.monotonic() - started
    finally:
        await aclose(client)
    assert elapsed < 2.0, f"took {elapsed:.2f} s for request_timeout=1"
    assert len(server.seen) == 1


@pytest.mark.parametrize("kind", KINDS)
async def test_a_post_without_a_key_is_not_retried_after_a_503(kind: str, fake: Any) -> None:
    # mkdir carries no Idempotency-Key: the server may have done it.
    server = fake(Reply(200, SANDBOX), error(503, "sandbox_busy", **{"Retry-After": "0"}), Reply(200, {"path": "/workspace/d"}))
    client = make_client(kind, api_key="cn_live_x", base_url=server.base_url)
    try:
        sandbox = await aw(client.sandboxes.get("sbx_fake"))
        with pytest.raises(CrowNestApiError) as info:
            await aw(sandbox.files.mkdir("d"))
    finally:
        await aclose(client)
    assert info.value.code == "sandbox_busy"
    assert [s.method for s in server.seen] == ["GET", "POST"]


@pytest.mark.parametrize("kind", KINDS)
async def test_a_rate_limited_429_is_retried_but_a_quota_429_is_not(kind: str, fake: Any) -> None:
    server = fake(error(429, "rate_limited", **{"Retry-After": "0"}), Reply(200, SANDBOX), error(429, "quota_exceeded"), Reply(201, SANDBOX))
    client = make_client(kind, api_key="cn_live_x", base_url=server.base_url)
    try:
        assert (await aw(client.sandboxes.get("sbx_fake"))).id == "sbx_fake"
        with pytest.raises(CrowNestApiError) as info:
            await aw(client.sandboxes.create(template="python"))
    finally:
        await aclose(client)
    assert info.value.code == "quota_exceeded"
    assert [s.method for s in server.seen] == ["GET", "GET", "POST"]


@pytest.mark.parametrize("kind", KINDS)
async def test_gets_retry_502_and_504_within_max_retries(kind: str, fake: Any) -> None:
    server = fake(error(502, "http_502"), error(504, "http_504"), Reply(200, SANDBOX))
    client = make_client(kind, api_key="cn_live_x", base_url=server.base_url)
    try:
        assert (await aw(client.sandboxes.get("sbx_fake"))).id == "sbx_fake"
    finally:
        await aclose(client)
    assert len(server.seen) == 3
    server = fake(error(502, "http_502"))
    client = make_client(kind, api_key="cn_live_x", base_url=server.base_url, max_retries=1)
    try:
        with pytest.raises(CrowNestApiError):
            await aw(client.sandboxes.get("sbx_fake"))
    finally:
        await aclose(client)
    assert len(server.seen) == 2, "max_retries=1: one retry"


@pytest.mark.parametrize("kind", KINDS)
async def test_a_streamed_file_body_is_not_sent_twice(kind: str, fake: Any) -> None:
    # A PUT is idempotent, but a body streamed from a file cannot be replayed.
    server = fake(Reply(200, SANDBOX), error(503, "sandbox_busy", **{"Retry-After": "0"}))
    client = make_client(kind, api_key="cn_live_x", base_url=server.base_url)
    try:
        sandbox = await aw(client.sandboxes.get("sbx_fake"))
        with pytest.raises(CrowNestApiError):
            await aw(sandbox.files.write("f.bin", io.BytesIO(b"x" * 1000)))
        assert [s.method for s in server.seen] == ["GET", "PUT"]
        assert server.seen[1].headers.get("content-length") == "1000"
    finally:
        await aclose(client)


READY = 'event: ready\ndata: {"path": "/workspace/w"}\n\n'
CHANGE = 'event: change\ndata: {"type": "create", "path": "/workspace/w/a", "isDir": false}\n\n'


@pytest.mark.parametrize("kind", KINDS)
async def test_watch_stop_ends_a_watch_whose_stream_is_silent(kind: str, fake: Any) -> None:
    # The stream sends ready and one change, then nothing for 30 s: stop()
    # must not wait for it (the sync client's thread is blocked in a read).
    server = fake(Reply(200, SANDBOX), Reply(200, {}, sse=[READY, CHANGE], hold=30))
    client = make_client(kind, api_key="cn_live_x", base_url=server.base_url)
    events: list[Any] = []
    try:
        sandbox = await aw(client.sandboxes.get("sbx_fake"))
        handle = await aw(sandbox.files.watch("w", events.append))
        assert handle.path == "/workspace/w"
        deadline = time.monotonic() + 5
        while not events and time.monotonic() < deadline:
            await anyio.sleep(0.05)
        assert events == [{"type": "create", "path": "/workspace/w/a", "isDir": False}]
        assert handle.running
        started = time.monotonic()
        await aw(handle.stop())
        assert time.monotonic() - started < 3, "stop() waited for the silent stream"
        assert not handle.running and handle.error is None
        assert server.seen[1].path == "/v1/sandboxes/sbx_fake/files/watch?recursive=true&path=w"
    finally:
        await aclose(client)


@pytest.mark.parametrize("kind", KINDS)
async def test_watch_keeps_what_ended_it(kind: str, fake: Any) -> None:
    # The server closes the stream after one change; and an on_event that
    # raises ends the watch with its exception.
    server = fake(Reply(200, SANDBOX), Reply(200, {}, sse=[READY, CHANGE]), Reply(200, {}, sse=[READY, CHANGE], hold=30))
    client = make_client(kind, api_key="cn_live_x", base_url=server.base_url)
    try:
        sandbox = await aw(client.sandboxes.get("sbx_fake"))
        ended = await aw(sandbox.files.watch("w", lambda e: None))
        deadline = time.monotonic() + 5
        while ended.running and time.monotonic() < deadline:
            await anyio.sleep(0.05)
        assert not ended.running and ended.error is not None

        def explode(event: Any) -> None:
            raise ValueError("callback failed")

        failing = await aw(sandbox.files.watch("w", explode))
        deadline = time.monotonic() + 5
        while failing.error is None and time.monotonic() < deadline:
            await anyio.sleep(0.05)
        assert isinstance(failing.error, ValueError)
        await aw(failing.stop())
    finally:
        await aclose(client)


@pytest.mark.parametrize("kind", KINDS)
async def test_watch_waits_for_ready_and_fails_without_it(kind: str, fake: Any) -> None:
    server = fake(Reply(200, SANDBOX), Reply(200, {}, sse=[": keep-alive\n\n"]), error(429, "too_many_watches"))
    client = make_client(kind, api_key="cn_live_x", base_url=server.base_url)
    try:
        sandbox = await aw(client.sandboxes.get("sbx_fake"))
        with pytest.raises(CrowNestConnectionError, match="before it was ready"):
            await aw(sandbox.files.watch("w", lambda e: None))
        with pytest.raises(CrowNestApiError) as info:
            await aw(sandbox.files.watch("w", lambda e: None))
        assert (info.value.status, info.value.code) == (429, "too_many_watches")
    finally:
        await aclose(client)


@pytest.mark.parametrize("kind", KINDS)
async def test_metrics_stream_ends_at_its_end_event(kind: str, fake: Any) -> None:
    sample = '{"sandboxId": "sbx_fake", "cpuUsageSeconds": 1.5, "timestamp": "2030-01-01T00:00:00.000Z"}'
    stream = [f"event: metrics\ndata: {sample}\n\n", ": keep-alive\n\n", f"event: metrics\ndata: {sample}\n\n",
              'event: end\ndata: {"status": "destroyed"}\n\n']
    server = fake(Reply(200, SANDBOX), Reply(200, {}, sse=stream, hold=30))
    client = make_client(kind, api_key="cn_live_x", base_url=server.base_url)
    try:
        sandbox = await aw(client.sandboxes.get("sbx_fake"))
        started = time.monotonic()
        samples = await alist(sandbox.metrics_stream())
        assert time.monotonic() - started < 5, "the stream was not left at its end event"
    finally:
        await aclose(client)
    assert [s["cpuUsageSeconds"] for s in samples] == [1.5, 1.5]
    assert server.seen[1].path == "/v1/sandboxes/sbx_fake/metrics?stream=true"


# ------------------------------------------------------------ the helpers


def test_retry_after_parses_seconds_and_http_dates() -> None:
    assert retry_after_seconds("3") == 3.0
    assert retry_after_seconds(" 0 ") == 0.0
    assert retry_after_seconds("1.5") == 1.5
    assert retry_after_seconds(None) is None
    assert retry_after_seconds("") is None
    assert retry_after_seconds("-1") is None
    assert retry_after_seconds("soon") is None
    now = 1_700_000_000.0
    assert retry_after_seconds(email.utils.formatdate(now + 30, usegmt=True), now=now) == pytest.approx(30, abs=1)
    assert retry_after_seconds(email.utils.formatdate(now - 30, usegmt=True), now=now) == 0.0


def test_which_statuses_are_retried() -> None:
    def delay(status: int, code: str, method: str = "POST", keyed: bool = True, after: str | None = None) -> Any:
        return status_retry_delay(CrowNestApiError(status, code, ""), after, method, keyed, 0)

    assert delay(503, "capacity_exhausted", after="2") == 2.0
    assert delay(503, "capacity_exhausted") is not None
    assert delay(503, "capacity_exhausted", keyed=False) is None
    assert delay(503, "capacity_exhausted", method="GET", keyed=False) is not None
    assert delay(503, "template_unavailable") is None
    assert delay(502, "http_502") is not None and delay(504, "http_504") is not None
    assert delay(500, "internal") is None
    assert delay(429, "rate_limited", keyed=False, after="1") == 1.0
    assert delay(429, "quota_exceeded") is None
    assert delay(409, "idempotency_key_in_use") is not None
    assert delay(409, "idempotency_key_in_use", keyed=False) is None
    assert delay(400, "invalid_request", after="1") is None


def test_query_times_are_utc_rfc3339_and_naive_datetimes_are_refused() -> None:
    aware = dt.datetime(2030, 1, 2, 3, 4, 5, 678901, tzinfo=dt.timezone(dt.timedelta(hours=2)))
    assert rfc3339_param("x", aware) == "2030-01-02T01:04:05.678Z"
    assert rfc3339_param("x", "2030-01-02T00:00:00Z") == "2030-01-02T00:00:00Z"
    with pytest.raises(ValueError, match="naive"):
        rfc3339_param("created_after", dt.datetime(2030, 1, 1))


def test_sandbox_list_query_names_metadata_keys_in_brackets() -> None:
    params = sandbox_list_params(
        status="running",
        template="python",
        metadata={"job": "demo", "n": 3, "ok": True, "none": None},
        created_after="2030-01-01T00:00:00Z",
        created_before=None,
        limit=5,
        cursor=None,
    )
    assert params == [
        ("status", "running"),
        ("template", "python"),
        ("metadata[job]", "demo"),
        ("metadata[n]", "3"),
        ("metadata[ok]", "true"),
        ("metadata[none]", "null"),
        ("createdAfter", "2030-01-01T00:00:00Z"),
        ("limit", "5"),
    ]


def _events(text: str) -> list[ServerSentEvent]:
    decoder = SSEDecoder()
    return [e for line in text.split("\n") if (e := decoder.feed(line)) is not None]


def test_watch_events_are_checked_before_they_are_passed_on() -> None:
    stream = (
        'event: ready\ndata: {"path": "/workspace/w"}\n\n'
        'event: change\ndata: {"type": "create", "path": "/workspace/w/a", "isDir": false}\n\n'
        'event: change\ndata: {"type": "explode", "path": "/workspace/w/a"}\n\n'
        'event: change\ndata: {"type": "delete", "path": 7}\n\n'
        "event: change\ndata: not json\n\n"
        'event: change\ndata: {"type": "rename", "path": "/workspace/w/b", "isDir": "yes", "oldPath": "/workspace/w/a"}\n\n'
        'event: overflow\ndata: {"dropped": 12}\n\n'
    )
    parsed = [watch_event_from_sse(e) for e in _events(stream)]
    assert parsed == [
        ("ready", {"path": "/workspace/w"}),
        ("change", {"type": "create", "path": "/workspace/w/a", "isDir": False}),
        None,
        None,
        None,
        ("change", {"type": "rename", "path": "/workspace/w/b", "isDir": False, "oldPath": "/workspace/w/a"}),
        ("change", {"type": "overflow", "dropped": 12}),
    ]
    with pytest.raises(CrowNestApiError) as info:
        watch_event_from_sse(_events('event: error\ndata: {"error": {"code": "sandbox_destroyed", "message": "gone"}}\n\n')[0])
    assert info.value.code == "sandbox_destroyed"
