"""The SDK against a live server. Every test taking ``client`` runs twice:
with the sync ``CrowNest`` and with ``AsyncCrowNest``."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import REPO, Server, aclose, alist, aw, make_client, unique

from crownest import (
    Artifact,
    CodeContext,
    CodeRunResult,
    CommandResult,
    CrowNest,
    CrowNestApiError,
    CrowNestConnectionError,
    FileInfo,
    LogEvent,
    Preview,
)
from crownest._shared import preview_request

pytestmark = pytest.mark.anyio

KINDS = ["sync", "async"]


async def new_sandbox(client: Any, **kw: Any) -> Any:
    return await aw(client.sandboxes.create(template="python", **kw))


async def kill_quietly(sandbox: Any) -> None:
    try:
        await aw(sandbox.kill())
    except CrowNestApiError as e:
        assert e.code == "sandbox_destroyed"


# ------------------------------------------------------------ sandboxes


async def test_sandbox_create_get_list_refresh_kill(client: Any) -> None:
    sandbox = await new_sandbox(client, ttl_ms=5 * 60 * 1000, metadata={"job": "sdk-test"})
    try:
        assert sandbox.id.startswith("sbx_")
        assert sandbox.status == "running"
        assert sandbox["status"] == "running"
        assert sandbox["metadata"] == {"job": "sdk-test"}
        assert sandbox.metadata == {"job": "sdk-test"}
        assert sandbox.template == "python"
        assert sandbox.expires_at == sandbox["expiresAt"]
        as_dict = sandbox.to_dict()
        assert as_dict["id"] == sandbox.id and isinstance(as_dict, dict)
        assert dict(sandbox) == as_dict

        got = await aw(client.sandboxes.get(sandbox.id))
        assert got.id == sandbox.id and got["expiresAt"] == sandbox["expiresAt"]
        assert sandbox.id in [s.id async for s in _aiter(client.sandboxes.list())]
        assert (await aw(sandbox.refresh())).status == "running"
    finally:
        killed = await aw(sandbox.kill())
    assert killed is sandbox and sandbox.status == "destroyed"
    assert sandbox["endReason"] == "killed"
    assert (await aw(client.sandboxes.get(sandbox.id))).status == "destroyed"


async def _aiter(iterable: Any) -> Any:
    for item in await alist(iterable):
        yield item


async def test_list_follows_every_page(client: Any) -> None:
    a = await new_sandbox(client)
    b = await new_sandbox(client)
    try:
        pages = await alist(client.sandboxes.list(limit=1).pages())
        assert len(pages) >= 2 and all(len(p) <= 1 for p in pages)
        ids = [s.id for s in await alist(client.sandboxes.list(limit=1))]
        assert a.id in ids and b.id in ids
        assert len(ids) == len(set(ids))
    finally:
        await kill_quietly(a)
        await kill_quietly(b)


async def test_templates_and_health(client: Any) -> None:
    names = [t["name"] for t in await aw(client.templates.list())]
    assert "python" in names
    assert (await aw(client.health()))["status"] == "ok"


# ------------------------------------------------------------ commands


async def test_run_returns_the_record_and_a_nonzero_exit_is_not_an_error(client: Any) -> None:
    sandbox = await new_sandbox(client)
    try:
        ok = await aw(sandbox.commands.run("python -c 'print(40 + 2)'"))
        assert isinstance(ok, CommandResult)
        assert (ok["exitCode"], ok["stdout"], ok["status"]) == (0, "42\n", "completed")
        assert ok.exit_code == 0 and ok.id.startswith("cmd_")

        bad = await aw(sandbox.commands.run("echo out; echo err >&2; exit 3"))
        assert (bad["exitCode"], bad.status, bad["stdout"], bad["stderr"]) == (3, "completed", "out\n", "err\n")

        env = await aw(sandbox.commands.run("mkdir -p sub && cd sub && pwd"))
        assert env["stdout"] == "/workspace/sub\n"
        env = await aw(sandbox.commands.run("pwd; echo $GREETING", cwd="sub", env={"GREETING": "hi"}))
        assert env["stdout"] == "/workspace/sub\nhi\n"

        slow = await aw(sandbox.commands.run("sleep 10", timeout_ms=300))
        assert slow.status == "timed_out"
    finally:
        await kill_quietly(sandbox)


async def test_streaming_callbacks_receive_stdout_before_the_result_returns(client: Any) -> None:
    sandbox = await new_sandbox(client)
    try:
        seen: list[tuple[str, str, float]] = []
        result = await aw(
            sandbox.commands.run(
                "echo first; sleep 1.5; echo second; echo oops >&2",
                on_stdout=lambda chunk: seen.append(("out", chunk, time.monotonic())),
                on_stderr=lambda chunk: seen.append(("err", chunk, time.monotonic())),
            )
        )
        returned = time.monotonic()
        assert result["exitCode"] == 0 and result["stdout"] == "first\nsecond\n"
        assert "".join(c for k, c, _ in seen if k == "out") == "first\nsecond\n"
        assert "".join(c for k, c, _ in seen if k == "err") == "oops\n"
        first_at = next(t for k, c, t in seen if c.startswith("first"))
        assert returned - first_at > 1.0, "the first chunk arrived while the command was still running"
    finally:
        await kill_quietly(sandbox)


async def test_async_callbacks_may_be_coroutines(server: Server, api_key: str) -> None:
    from crownest import AsyncCrowNest

    async with AsyncCrowNest(api_key=api_key, base_url=server.base_url) as client:
        sandbox = await client.sandboxes.create(template="python")
        try:
            chunks: list[str] = []

            async def on_stdout(chunk: str) -> None:
                chunks.append(chunk)

            result = await sandbox.commands.run("echo a; echo b", on_stdout=on_stdout)
            assert "".join(chunks) == "a\nb\n" == result["stdout"]
        finally:
            await sandbox.kill()


async def test_start_logs_wait_stdin_signal_cancel_get_list(client: Any) -> None:
    sandbox = await new_sandbox(client)
    try:
        cat = await aw(sandbox.commands.start("cat; echo done", stdin=True))
        assert cat.status == "running"
        await aw(cat.send_stdin("hello\n"))
        await aw(cat.send_stdin(b"\x62ytes\n", close=True))
        result = await aw(cat.wait())
        assert (result["exitCode"], result["stdout"]) == (0, "hello\nbytes\ndone\n")

        events = await alist(cat.logs())
        assert all(isinstance(e, LogEvent) for e in events)
        assert "".join(e.data for e in events if e.type == "stdout") == "hello\nbytes\ndone\n"
        assert events[-1].type == "exit" and events[-1].exit == {
            "status": "completed",
            "exitCode": 0,
            "signal": None,
            "error": None,
        }
        ids = [e.id for e in events]
        assert ids == list(range(1, len(events) + 1))
        resumed = await alist(cat.logs(after=ids[-2]))
        assert [e.id for e in resumed] == [ids[-1]]

        sleeper = await aw(sandbox.commands.start("sleep 30"))
        await aw(sleeper.signal("SIGTERM"))
        ended = await aw(sleeper.wait())
        assert ended["signal"] == 15 and ended["exitCode"] is None

        doomed = await aw(sandbox.commands.start("sleep 30"))
        canceled = await aw(doomed.cancel())
        assert canceled.status == "canceled"

        got = await aw(sandbox.commands.get(cat.id))
        assert got.id == cat.id and got["stdout"] == "hello\nbytes\ndone\n"
        listed = [c.id for c in await alist(sandbox.commands.list(limit=2))]
        assert {cat.id, sleeper.id, doomed.id} <= set(listed)
    finally:
        await kill_quietly(sandbox)


# ------------------------------------------------------------ errors


async def test_not_found(client: Any) -> None:
    with pytest.raises(CrowNestApiError) as info:
        await aw(client.sandboxes.get("sbx_does_not_exist"))
    e = info.value
    assert (e.status, e.code) == (404, "not_found")
    assert str(e) == "sandbox `sbx_does_not_exist` not found"
    assert e.details["id"] == "sbx_does_not_exist"


@pytest.mark.parametrize("kind", KINDS)
async def test_forbidden_without_the_scope(kind: str, server: Server) -> None:
    key = server.mint_key("sdk-py-tests", "sandboxes:read")
    client = make_client(kind, api_key=key, base_url=server.base_url)
    try:
        with pytest.raises(CrowNestApiError) as info:
            await aw(client.sandboxes.create(template="python"))
        assert (info.value.status, info.value.code) == (403, "forbidden")
        assert info.value.details["requiredScope"] == "sandboxes:create"
        await alist(client.sandboxes.list())  # reading is allowed
    finally:
        await aclose(client)


async def test_sandbox_destroyed_after_kill(client: Any) -> None:
    sandbox = await new_sandbox(client)
    await aw(sandbox.kill())
    with pytest.raises(CrowNestApiError) as info:
        await aw(sandbox.commands.run("echo too late"))
    assert (info.value.status, info.value.code) == (410, "sandbox_destroyed")
    assert sandbox.id in str(info.value)


@pytest.mark.parametrize("kind", KINDS)
async def test_unauthorized_and_connection_errors(kind: str, server: Server) -> None:
    client = make_client(kind, api_key="cn_live_not_a_key", base_url=server.base_url)
    try:
        with pytest.raises(CrowNestApiError) as info:
            await alist(client.sandboxes.list())
        assert (info.value.status, info.value.code) == (401, "unauthorized")
    finally:
        await aclose(client)
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    client = make_client(kind, api_key="cn_live_x", base_url=f"http://127.0.0.1:{port}", max_retries=1)
    try:
        with pytest.raises(CrowNestConnectionError):
            await aw(client.sandboxes.get("sbx_x"))
    finally:
        await aclose(client)


# ------------------------------------------------------------ idempotency


async def test_an_explicit_idempotency_key_replays_the_create(client: Any) -> None:
    key = unique("create")
    first = await aw(client.sandboxes.create(template="python", idempotency_key=key))
    again = await aw(client.sandboxes.create(template="python", idempotency_key=key))
    try:
        assert again.id == first.id
        with pytest.raises(CrowNestApiError) as info:
            await aw(client.sandboxes.create(template="python", ttl_ms=60_000, idempotency_key=key))
        assert (info.value.status, info.value.code) == (409, "idempotency_key_reused")
        cmd_key = unique("run")
        r1 = await aw(first.commands.run("echo $RANDOM", idempotency_key=cmd_key))
        r2 = await aw(first.commands.run("echo $RANDOM", idempotency_key=cmd_key))
        assert r1.id == r2.id and r1["stdout"] == r2["stdout"]
    finally:
        await kill_quietly(first)


class DroppingProxy:
    """A TCP proxy on 127.0.0.1 that forwards to the server, but on the
    first ``drops`` connections waits for the server's answer and then
    closes the client's connection without passing the answer on."""

    def __init__(self, upstream: str, drops: int = 1) -> None:
        url = httpx.URL(upstream)
        self.upstream = (url.host, url.port or 80)
        self.drops_left = drops
        self.dropped = 0
        self.connections = 0
        self.lock = threading.Lock()
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.base_url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def close(self) -> None:
        self.sock.close()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._handle, args=(conn,), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def _handle(self, client: socket.socket) -> None:
        upstream = socket.create_connection(self.upstream)
        with self.lock:
            self.connections += 1
            drop = self.drops_left > 0
            if drop:
                self.drops_left -= 1
        threading.Thread(target=self._pump, args=(client, upstream), daemon=True).start()
        if not drop:
            self._pump(upstream, client)
            return
        answered = upstream.recv(65536)  # the server did the work and answered
        assert answered.startswith(b"HTTP/1.1 "), answered[:100]
        with self.lock:
            self.dropped += 1
        client.shutdown(socket.SHUT_RDWR)
        client.close()
        upstream.close()


@pytest.mark.parametrize("kind", KINDS)
async def test_an_sdk_retry_after_a_dropped_connection_does_not_create_a_second_sandbox(
    kind: str, server: Server
) -> None:
    key = server.mint_key(unique("sdk-retry"))  # a fresh org: it owns nothing yet
    proxy = DroppingProxy(server.base_url, drops=1)
    through_proxy = make_client(kind, api_key=key, base_url=proxy.base_url)
    direct = CrowNest(api_key=key, base_url=server.base_url)
    try:
        sandbox = await aw(through_proxy.sandboxes.create(template="python", metadata={"test": "retry"}))
        assert proxy.dropped == 1 and proxy.connections >= 2, "the first answer was dropped, then retried"
        org_sandboxes = list(direct.sandboxes.list())
        assert [s.id for s in org_sandboxes] == [sandbox.id], "exactly one sandbox for the org"
        direct.sandboxes.get(sandbox.id).kill()
    finally:
        await aclose(through_proxy)
        direct.close()
        proxy.close()


# ------------------------------------------------------------ files


async def test_files_write_read_list_stat_mkdir_move_delete(client: Any) -> None:
    sandbox = await new_sandbox(client)
    try:
        files = sandbox.files
        info = await aw(files.write("dir/hello.txt", "héllo\n"))
        assert isinstance(info, FileInfo)
        assert (info["path"], info.type, info["size"]) == ("/workspace/dir/hello.txt", "file", 7)
        assert await aw(files.read("dir/hello.txt")) == "héllo\n".encode()
        assert await aw(files.read_text("/workspace/dir/hello.txt")) == "héllo\n"
        await aw(files.write("dir/blob.bin", bytes(range(256))))
        assert await aw(files.read("dir/blob.bin")) == bytes(range(256))
        ran = await aw(sandbox.commands.run("cat dir/hello.txt"))
        assert ran["stdout"] == "héllo\n"

        listing = await aw(files.list("dir"))
        assert [e["name"] for e in listing] == ["blob.bin", "hello.txt"] and listing.truncated is False
        assert "dir" in [e.name for e in await aw(files.list())]
        assert (await aw(files.stat("dir")))["type"] == "dir"
        assert (await aw(files.mkdir("a/b", parents=True)))["path"] == "/workspace/a/b"
        moved = await aw(files.move("dir/hello.txt", "a/b/hi.txt"))
        assert moved.path == "/workspace/a/b/hi.txt"
        with pytest.raises(CrowNestApiError) as info_err:
            await aw(files.stat("dir/hello.txt"))
        assert (info_err.value.status, info_err.value.code) == (404, "file_not_found")
        with pytest.raises(CrowNestApiError) as info_err:
            await aw(files.delete("a"))
        assert info_err.value.code == "directory_not_empty"
        await aw(files.delete("a", recursive=True))
        assert "a" not in [e.name for e in await aw(files.list())]
        with pytest.raises(CrowNestApiError) as info_err:
            await aw(files.read("../etc/passwd"))
        assert info_err.value.status == 400
    finally:
        await kill_quietly(sandbox)


async def test_files_staged_upload_and_download(client: Any) -> None:
    sandbox = await new_sandbox(client)
    try:
        payload = os.urandom(3 * 1024 * 1024 + 17)
        info = await aw(sandbox.files.upload("big/data.bin", payload))
        assert (info["path"], info["size"]) == ("/workspace/big/data.bin", len(payload))
        assert await aw(sandbox.files.download("big/data.bin")) == payload
        target = await aw(sandbox.files.download_url("big/data.bin"))
        assert target["method"] == "GET" and target["sizeBytes"] == len(payload)
        assert httpx.get(target["url"]).content == payload  # no API key needed
        up = await aw(sandbox.files.upload_url("x.txt"))
        assert up["method"] == "PUT" and up["url"].startswith("http")
    finally:
        await kill_quietly(sandbox)


# ------------------------------------------------------------ artifacts


async def test_artifacts_create_get_list_download(client: Any) -> None:
    sandbox = await new_sandbox(client)
    try:
        await aw(sandbox.commands.run("printf 'a,b\\n1,2\\n' > table.csv"))
        artifact = await aw(sandbox.artifacts.create(path="table.csv", name="data.csv"))
        assert isinstance(artifact, Artifact) and artifact.id.startswith("art_")
        assert (artifact["name"], artifact["size"], artifact["sandboxId"]) == ("data.csv", 8, sandbox.id)
        assert artifact["sourcePath"].endswith("table.csv")
        assert (await aw(client.artifacts.download(artifact["id"]))) == b"a,b\n1,2\n"
        assert (await aw(client.artifacts.get(artifact.id)))["sha256"] == artifact["sha256"]
        assert artifact.id in [a.id for a in await alist(sandbox.artifacts.list())]
        assert artifact.id in [a.id for a in await alist(client.artifacts.list())]
        await aw(sandbox.kill())
        # Artifacts outlive the sandbox.
        assert (await aw(client.artifacts.download(artifact.id))) == b"a,b\n1,2\n"
        with pytest.raises(CrowNestApiError) as info:
            await aw(sandbox.artifacts.create(path="table.csv"))
        assert info.value.code == "sandbox_destroyed"
    finally:
        await kill_quietly(sandbox)


# ------------------------------------------------------------ previews

PREVIEW_APP = "import http.server; http.server.ThreadingHTTPServer(('127.0.0.1', 8000), http.server.SimpleHTTPRequestHandler).serve_forever()"


class LoopbackTransport(httpx.HTTPTransport):
    """Connects to 127.0.0.1 for ``*.localhost`` names, as browsers resolve
    them (the system resolver here does not). The request keeps its URL and
    ``Host``, so cookies and redirects work on the preview's origin."""

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        if request.url.host.endswith(".localhost"):
            request = httpx.Request(
                request.method,
                request.url.copy_with(host="127.0.0.1"),
                headers=request.headers,
                stream=request.stream,
                extensions=request.extensions,
            )
        return super().handle_request(request)


def test_preview_requests_go_to_loopback_only_for_localhost_names() -> None:
    local = preview_request({"url": "http://prv-0123456789abcdefghjk.localhost:7420/"}, "/a?b=1", {"host": "x", "X-A": "1"})
    assert local.url == "http://127.0.0.1:7420/a?b=1"
    assert local.headers == {"X-A": "1", "Host": "prv-0123456789abcdefghjk.localhost:7420"}
    assert local.extensions == {}
    tls = preview_request({"url": "https://prv-0123456789abcdefghjk.localhost/"}, "")
    assert (tls.url, tls.headers) == ("https://127.0.0.1/", {"Host": "prv-0123456789abcdefghjk.localhost"})
    assert tls.extensions == {"sni_hostname": "prv-0123456789abcdefghjk.localhost"}
    remote = preview_request({"url": "https://prv-0123456789abcdefghjk.preview.example.com/"}, "index.html")
    assert (remote.url, remote.headers, remote.extensions) == (
        "https://prv-0123456789abcdefghjk.preview.example.com/index.html",
        {},
        {},
    )


def test_a_cookie_an_app_sets_is_kept_by_neither_client() -> None:
    # On loopback every preview and the API share 127.0.0.1: a kept cookie
    # would follow the client to the API and to every other preview.
    def app(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, headers={"set-cookie": "session=app-a; Path=/"})

    sync = CrowNest(base_url="http://127.0.0.1:9", api_key="cn_live_x")
    sync._http._transport = httpx.MockTransport(app)
    sync._http.get("http://127.0.0.1:9/")
    assert list(sync._http.cookies.jar) == []
    sync.close()


async def test_previews_create_fetch_list_get_delete(client: Any) -> None:
    sandbox = await new_sandbox(client)
    try:
        await aw(sandbox.files.write("index.html", "<p>from the sandbox</p>"))
        await aw(sandbox.files.write("app.py", PREVIEW_APP))
        await aw(sandbox.commands.start("python3 app.py"))
        preview = await aw(sandbox.previews.create(8000))
        assert isinstance(preview, Preview) and preview.id.startswith("prv_")
        assert (preview["port"], preview["status"]) == (8000, "active")
        assert preview["token"].startswith("cn_prv_")
        # Its own origin: the id as the first label under localhost, on the API's port.
        port = httpx.URL(client.base_url).port
        assert preview.url == f"http://{preview.id.replace('_', '-')}.localhost:{port}/"
        assert preview["browserUrl"].startswith(preview.url + "?crownest_preview_token=cn_prv_")
        for _ in range(100):  # until the app listens
            response = await aw(sandbox.previews.fetch(preview, "index.html"))
            if response.status_code != 502:
                break
            time.sleep(0.1)
        assert (response.status_code, response.text) == (200, "<p>from the sandbox</p>")
        # A browser: the token URL, then its cookie (host-only, on the preview's origin).
        with httpx.Client(transport=LoopbackTransport(), follow_redirects=True) as browser:
            assert browser.get(preview.url).status_code == 401
            page = browser.get(preview["browserUrl"].replace("?", "index.html?"))
            assert (page.status_code, page.text) == (200, "<p>from the sandbox</p>")
            assert str(page.url) == preview.url + "index.html"
            assert [c.domain for c in browser.cookies.jar] == [httpx.URL(preview.url).host]
        with pytest.raises(CrowNestApiError) as info:
            await aw(sandbox.previews.create(8000))
        assert (info.value.status, info.value.code) == (409, "preview_exists")
        got = await aw(sandbox.previews.get(preview.id))
        assert got.url == preview.url and "token" not in got
        assert [p.id for p in await alist(sandbox.previews.list())] == [preview.id]
        closed = await aw(sandbox.previews.delete(preview))
        assert (closed["status"], closed["closeReason"]) == ("closed", "deleted")
        gone = await aw(sandbox.previews.fetch(preview, "index.html"))
        assert (gone.status_code, gone.json()["error"]["code"]) == (410, "preview_closed")
    finally:
        await kill_quietly(sandbox)


async def test_run_with_collect_reports_artifacts(client: Any) -> None:
    sandbox = await new_sandbox(client)
    try:
        collect = [{"path": "/workspace/report.html", "name": "report.html"}, {"path": "missing.txt"}]
        result = await aw(
            sandbox.commands.run("echo '<h1>hi</h1>' > report.html", collect=collect, on_stdout=lambda _: None)
        )
        report, missing = result["artifacts"]
        assert report["name"] == "report.html" and report.get("error") is None, report
        assert (await aw(client.artifacts.download(report["artifactId"]))) == b"<h1>hi</h1>\n"
        assert missing["artifactId"] is None and missing["error"]
    finally:
        await kill_quietly(sandbox)


# ------------------------------------------------------------ code


async def test_code_context_keeps_state_across_runs(client: Any) -> None:
    """The docs' Code Contexts snippet (seed 000), and the context calls."""
    sandbox = await new_sandbox(client)
    try:
        context = await aw(sandbox.code.create_context(language="python"))
        assert isinstance(context, CodeContext)
        assert context.id.startswith("cctx_") and context["language"] == "python"
        assert context["sandboxId"] == sandbox.id and context["isDefault"] is False
        await aw(sandbox.code.run("value = 42", context_id=context.id))
        result = await aw(sandbox.code.run("print(value)", context_id=context.id))
        assert isinstance(result, CodeRunResult)
        assert "".join(result["stdout"]) == "42\n" == result.text
        assert result["error"] is None and result.error is None
        assert result.context_id == context.id and result["contextId"] == context.id

        # A context object works as context_id too.
        again = await aw(sandbox.code.run("value += 1; print(value)", context_id=context))
        assert again.text == "43\n"
        assert (await aw(sandbox.code.get_context(context.id)))["language"] == "python"
        assert context.id in [c.id for c in await aw(sandbox.code.list_contexts())]
        await aw(sandbox.code.delete_context(context.id))
        assert context.id not in [c.id for c in await aw(sandbox.code.list_contexts())]
        with pytest.raises(CrowNestApiError) as gone:
            await aw(sandbox.code.get_context(context.id))
        assert gone.value.status == 404
    finally:
        await kill_quietly(sandbox)


async def test_code_run_without_a_context_reuses_the_default_one(client: Any) -> None:
    sandbox = await new_sandbox(client)
    try:
        first = await aw(sandbox.code.run("x = 7"))  # language defaults to python
        second = await aw(sandbox.code.run("print(x * 6)", language="python"))
        assert second.context_id == first.context_id
        assert second.text == "42\n"
        contexts = {c.id: c for c in await aw(sandbox.code.list_contexts())}
        assert contexts[first.context_id]["isDefault"] is True
    finally:
        await kill_quietly(sandbox)


async def test_an_exception_in_the_code_is_a_result_not_an_sdk_error(client: Any) -> None:
    sandbox = await new_sandbox(client)
    try:
        result = await aw(sandbox.code.run("print('before'); 1/0"))
        assert result.error is not None and result["error"]["name"] == "ZeroDivisionError"
        assert result.text == "before\n"
        streamed = await aw(sandbox.code.run("1/0", on_stdout=lambda _: None))
        assert streamed["error"]["name"] == "ZeroDivisionError"
    finally:
        await kill_quietly(sandbox)


async def test_code_run_streams_stdout_before_the_result(client: Any) -> None:
    sandbox = await new_sandbox(client)
    code = "import sys, time\nprint('first', flush=True)\ntime.sleep(1)\nprint('second')\nprint('oops', file=sys.stderr)"
    try:
        seen: list[tuple[str, str, float]] = []
        streamed = await aw(
            sandbox.code.run(
                code,
                on_stdout=lambda chunk: seen.append(("out", chunk, time.monotonic())),
                on_stderr=lambda chunk: seen.append(("err", chunk, time.monotonic())),
            )
        )
        returned = time.monotonic()
        assert isinstance(streamed, CodeRunResult)
        assert "".join(c for k, c, _ in seen if k == "out") == "first\nsecond\n" == streamed.text
        assert "".join(c for k, c, _ in seen if k == "err") == "oops\n" == streamed.error_text
        first_at = next(t for k, c, t in seen if c.startswith("first"))
        assert returned - first_at > 0.8, "the first chunk arrived while the code was still running"

        blocking = await aw(sandbox.code.run(code))
        assert blocking["stdout"] == streamed["stdout"] and blocking["stderr"] == streamed["stderr"]
        assert blocking.context_id == streamed.context_id
        assert blocking["executionCount"] == streamed["executionCount"] + 1
    finally:
        await kill_quietly(sandbox)


async def test_code_run_streams_rich_outputs(client: Any) -> None:
    sandbox = await new_sandbox(client)
    try:
        outputs: list[dict[str, Any]] = []
        result = await aw(
            sandbox.code.run(
                "import pandas as pd\npd.DataFrame({'a': [1, 2], 'b': [3, 4]})",
                on_output=outputs.append,
            )
        )
        assert result.error is None, result.error
        assert outputs and outputs == result["outputs"]
        assert {o["type"] for o in outputs} <= {"inline", "artifact", "rejected"}
    finally:
        await kill_quietly(sandbox)


async def test_a_replayed_streamed_code_run_returns_the_stored_result(client: Any) -> None:
    sandbox = await new_sandbox(client)
    try:
        key = unique("code-run")
        chunks: list[str] = []
        code = "import random; print(random.random())"
        first = await aw(sandbox.code.run(code, on_stdout=chunks.append, idempotency_key=key))
        assert "".join(chunks) == first.text
        replayed: list[str] = []
        second = await aw(sandbox.code.run(code, on_stdout=replayed.append, idempotency_key=key))
        assert second.to_dict() == first.to_dict()
        assert replayed == [], "a replay emits only the complete event"
        blocking = await aw(sandbox.code.run(code, idempotency_key=key))
        assert blocking.text == first.text
    finally:
        await kill_quietly(sandbox)


async def test_code_api_errors(client: Any) -> None:
    sandbox = await new_sandbox(client)
    try:
        with pytest.raises(CrowNestApiError) as bad:
            await aw(sandbox.code.run("DISPLAY 'HI'.", language="cobol"))
        assert (bad.value.status, bad.value.code) == (400, "unsupported_code_language")
        with pytest.raises(CrowNestApiError) as streamed:
            await aw(sandbox.code.run("DISPLAY 'HI'.", language="cobol", on_stdout=print))
        assert streamed.value.code == "unsupported_code_language"
        with pytest.raises(CrowNestApiError) as ctx:
            await aw(sandbox.code.create_context(language="cobol"))
        assert ctx.value.code == "unsupported_code_language"
        # The python template has no JavaScript interpreter.
        with pytest.raises(CrowNestApiError) as js:
            await aw(sandbox.code.run("1", language="javascript"))
        assert js.value.code == "unsupported_code_language"
        await aw(sandbox.kill())
        with pytest.raises(CrowNestApiError) as destroyed:
            await aw(sandbox.code.run("1"))
        assert (destroyed.value.status, destroyed.value.code) == (410, "sandbox_destroyed")
    finally:
        await kill_quietly(sandbox)


async def test_javascript_and_typescript_contexts_keep_state(client: Any) -> None:
    sandbox = await aw(client.sandboxes.create(template="node"))
    try:
        js = await aw(sandbox.code.create_context(language="javascript"))
        await aw(sandbox.code.run("let n = 41;", language="javascript", context_id=js))
        result = await aw(sandbox.code.run("n += 1; console.log(n)", language="javascript", context_id=js))
        assert (result.text, result.error) == ("42\n", None)
        ts = await aw(sandbox.code.run("const t: number = 6;", language="typescript"))
        again = await aw(sandbox.code.run("console.log(t * 7)", language="typescript"))
        assert again.context_id == ts.context_id != js.id
        assert (again.text, again.error) == ("42\n", None)
        with pytest.raises(CrowNestApiError) as mismatch:
            await aw(sandbox.code.run("1", language="typescript", context_id=js))
        assert (mismatch.value.status, mismatch.value.code) == (400, "context_language_mismatch")
    finally:
        await kill_quietly(sandbox)


# ------------------------------------------------------------ the docs' examples


def _run_example(server: Server, api_key: str, name: str) -> str:
    env = dict(os.environ, CROWNEST_API_KEY=api_key, CROWNEST_BASE_URL=server.base_url)
    out = subprocess.run(
        [sys.executable, str(REPO / "examples" / "python" / name)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    return out.stdout


PRIMES = "\n".join(str(n) for n in range(2, 50) if all(n % d for d in range(2, n)))


def test_example_async_hello(server: Server, api_key: str) -> None:
    assert _run_example(server, api_key, "async_hello.py") == "0 42\n\n"


def test_example_code_contexts(server: Server, api_key: str) -> None:
    assert _run_example(server, api_key, "code_contexts.py") == "42\nok\n"


def test_example_primes(server: Server, api_key: str) -> None:
    out = _run_example(server, api_key, "primes.py")
    assert out == f"exit code: 0\nwrote primes.txt\n\n{PRIMES}\n"


def test_primes_flow_with_what_exists(server: Server, api_key: str) -> None:
    """The primes example's steps that exist today: the script goes in
    through a command's stdin instead of files.write."""
    script = (Path(REPO / "examples" / "python" / "primes.py").read_text()).split('SCRIPT = """', 1)[1]
    script = script.split('"""', 1)[0].replace("\\\\n", "\\n")
    with CrowNest(api_key=api_key, base_url=server.base_url) as client:
        sandbox = client.sandboxes.create(template="python", ttl_ms=10 * 60 * 1000, metadata={"job": "primes-demo"})
        try:
            writer = sandbox.commands.start("cat > primes.py", stdin=True)
            writer.send_stdin(script, close=True)
            assert writer.wait()["exitCode"] == 0
            result = sandbox.commands.run("python primes.py")
            assert (result["exitCode"], result["stdout"]) == (0, "wrote primes.txt\n")
            artifact = sandbox.artifacts.create(path="primes.txt")
            assert client.artifacts.download(artifact["id"]).decode() == PRIMES
        finally:
            sandbox.kill()


def test_example_curl_walkthrough(server: Server, api_key: str) -> None:
    import shutil

    if not (shutil.which("curl") and shutil.which("jq")):
        pytest.skip("examples/curl.sh needs curl and jq (scripts/setup installs them)")
    env = dict(os.environ, CROWNEST_API_KEY=api_key, CROWNEST_BASE_URL=server.base_url)
    out = subprocess.run(
        ["bash", str(REPO / "examples" / "curl.sh")], env=env, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert '"stdout":"42\\n"' in out.stdout
    assert 'data: {"data":"tick 3\\n"}' in out.stdout and "event: exit" in out.stdout
    assert "hello from the sandbox\n" in out.stdout
    assert '"code":"not_found"' in out.stdout and '"status":"destroyed"' in out.stdout
