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


async def test_a_sandbox_narrows_its_network_within_the_template_and_never_widens_it(client: Any) -> None:
    # The python template's policy is "none": narrowing to none is all a
    # sandbox of it may do.
    sandbox = await new_sandbox(client, network={"mode": "none"})
    try:
        assert sandbox["network"] == {"mode": "none", "allow": [], "deny": [], "bytesIn": 0, "bytesOut": 0}
        with pytest.raises(CrowNestApiError) as info:
            await aw(sandbox.set_network(allow=["pypi.org"]))
        assert (info.value.status, info.value.code) == (400, "network_policy_too_wide")
        assert (await aw(sandbox.set_network(mode="none")))["network"]["mode"] == "none"
        with pytest.raises(CrowNestApiError) as info:
            await new_sandbox(client, network={"mode": "open"})
        assert info.value.code == "network_policy_too_wide"
    finally:
        await kill_quietly(sandbox)


async def test_a_sandbox_env_reaches_its_commands_and_is_never_returned(client: Any) -> None:
    sandbox = await new_sandbox(client, env={"SDK_SECRET": "sdk-secret-value", "GREETING": "hi"})
    try:
        assert "sdk-secret-value" not in str(sandbox.to_dict())
        run = await aw(sandbox.commands.run('test "$SDK_SECRET" = sdk-secret-value && echo "$GREETING"'))
        assert run["stdout"] == "hi\n"
    finally:
        await kill_quietly(sandbox)


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


# ------------------------------------------------------------ workspace runs

import hashlib  # noqa: E402
import json  # noqa: E402

from crownest import (  # noqa: E402
    CrowNestTimeoutError,
    EvidenceBundle,
    WorkspaceRun,
    WorkspaceRunEvent,
    pack_directory,
)
from crownest._archive import is_ignored, parse_gitignore  # noqa: E402

REPORT_PY = """\
import json, os, sys
os.makedirs("out", exist_ok=True)
with open("out/report.json", "w") as f:
    json.dump({"ok": True, "files": sorted(os.listdir("."))}, f)
with open("out/summary.txt", "w") as f:
    f.write("summary: all good\\n")
print("report ok", flush=True)
print("a warning", file=sys.stderr, flush=True)
"""

#: Fails (and so the run) when the sandbox sees what .gitignore excludes.
CHECKS = " && ".join(
    [
        "test ! -e ignored.txt",
        "test ! -e build",
        "test ! -e scratch.tmp",
        "test -e keep.tmp",
        "test ! -e anchored.txt",
        "test -e sub/anchored.txt",
        "test ! -e sub/local.txt",
        "test -e sub/kept.txt",
        "test ! -e logs/deep/x.log",
        "test ! -e .git",
        "test -L link.json",
    ]
)


def make_project(root: Path) -> Path:
    """A small checkout: package.json, report.py, and files .gitignore excludes."""
    (root / "package.json").write_text(json.dumps({"name": "wsr-sdk-test", "version": "1.0.0"}))
    (root / "report.py").write_text(REPORT_PY)
    (root / ".gitignore").write_text("ignored.txt\nbuild/\n*.tmp\n!keep.tmp\n/anchored.txt\nlogs/**/*.log\n")
    for name in ["ignored.txt", "scratch.tmp", "keep.tmp", "anchored.txt"]:
        (root / name).write_text(name)
    (root / "build").mkdir()
    (root / "build" / "out.bin").write_bytes(b"\0" * 10)
    (root / "sub").mkdir()
    (root / "sub" / ".gitignore").write_text("local.txt\n")
    for name in ["anchored.txt", "local.txt", "kept.txt"]:
        (root / "sub" / name).write_text(name)
    (root / "logs" / "deep").mkdir(parents=True)
    (root / "logs" / "deep" / "x.log").write_text("log")
    (root / ".git").mkdir()
    (root / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    (root / "link.json").symlink_to("package.json")
    return root


def canonical_json(value: Any) -> str:
    """RFC 8785 for what a bundle holds (no floats; ASCII keys)."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


async def all_events(client: Any, run: Any) -> list[WorkspaceRunEvent]:
    events: list[WorkspaceRunEvent] = []
    after = 0
    while True:
        page = await aw(client.workspace_runs.list_events(run, after_seq=after, limit=1000))
        events.extend(page.data)
        after = page.next_after_seq
        if page.terminal and not page.data:
            return events
        if page.terminal and len(page.data) < 1000:
            return events


async def until_event(iterable: Any, predicate: Any) -> WorkspaceRunEvent:
    """The first event that matches; the stream is closed after it."""
    if hasattr(iterable, "__aiter__"):
        try:
            async for event in iterable:
                if predicate(event):
                    return event  # type: ignore[no-any-return]
        finally:
            await iterable.aclose()
    else:
        try:
            for event in iterable:
                if predicate(event):
                    return event  # type: ignore[no-any-return]
        finally:
            iterable.close()
    raise AssertionError("the stream ended before the event")


async def created_run(client: Any, command: str, data: bytes, **kw: Any) -> WorkspaceRun:
    archive = {"sizeBytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    return await aw(client.workspace_runs.create(command, archive=archive, **kw))


def tiny_archive(tmp_path: Path, files: dict[str, str]) -> bytes:
    src = tmp_path / "src"
    src.mkdir()
    for name, text in files.items():
        (src / name).write_text(text)
    with pack_directory(src) as packed:
        return packed.file.read()


async def cancel_quietly(client: Any, run: Any) -> None:
    try:
        await aw(client.workspace_runs.cancel(run))
    except CrowNestApiError as e:
        assert e.code == "workspace_run_finished"


def test_workspace_run_gitignore_patterns() -> None:
    rules = parse_gitignore(
        "# comment\n\nname\ndir/\n*.ext\n/anchored\n!keep.ext\na/**/z\n**/deep\nx/**\ntrail \\ \n\\#hash\nf[0-9].txt\n"
    )
    cases = {
        ("name", False): True,
        ("sub/name", False): True,
        ("dir", True): True,
        ("dir", False): False,  # a file named dir: `dir/` is for directories
        ("sub/dir", True): True,
        ("a.ext", False): True,
        ("sub/b.ext", False): True,
        ("keep.ext", False): False,
        ("anchored", False): True,
        ("sub/anchored", False): False,
        ("a/z", False): True,
        ("a/b/c/z", False): True,
        ("q/r/deep", True): True,
        ("x/anything/below", False): True,
        ("x", True): False,
        ("trail  ", False): True,
        ("#hash", False): True,
        ("f1.txt", False): True,
        ("fa.txt", False): False,
        ("other", False): False,
    }
    for (path, is_dir), expected in cases.items():
        assert is_ignored(path, is_dir, rules) is expected, (path, is_dir)
    nested = rules + parse_gitignore("!name\nlocal\n", "sub")
    assert is_ignored("sub/name", False, nested) is False  # the deeper file wins
    assert is_ignored("name", False, nested) is True
    assert is_ignored("sub/local", False, nested) is True and is_ignored("local", False, nested) is False


def test_workspace_run_pack_directory_entries_are_relative_and_keep_symlinks(tmp_path: Path) -> None:
    import tarfile

    make_project(tmp_path)
    with pack_directory(tmp_path) as packed:
        data = packed.file.read()
        assert len(data) == packed.size_bytes and hashlib.sha256(data).hexdigest() == packed.sha256
    with tarfile.open(fileobj=__import__("io").BytesIO(data)) as tar:
        members = {m.name: m for m in tar.getmembers()}
    assert all(not n.startswith("/") and ".." not in n.split("/") for n in members)
    assert members["link.json"].issym() and members["link.json"].linkname == "package.json"
    assert members["sub"].isdir() and members["report.py"].isfile()
    assert "ignored.txt" not in members and "build" not in members and ".git/HEAD" not in members
    assert "sub/local.txt" not in members and "keep.tmp" in members and "sub/anchored.txt" in members
    with pack_directory(tmp_path, include_git=True) as packed:
        assert ".git/HEAD" in packed.entries


async def test_workspace_run_directory_python_node_events_artifacts_evidence(client: Any, tmp_path: Path) -> None:
    project = make_project(tmp_path)
    seen: list[WorkspaceRunEvent] = []
    tag = unique("wsr")
    run, evidence = await aw(
        client.workspace_runs.run_directory(
            project,
            f"{CHECKS} && node -e \"console.log('node sees ' + require('./package.json').name)\" && python3 report.py",
            template="python-node",
            artifacts=[{"path": "out/report.json", "name": "report"}, {"path": "out/summary.txt"}],
            env={"CI": "1"},
            metadata={"suite": tag},
            timeout_ms=120_000,
            on_event=seen.append,
        )
    )
    assert isinstance(run, WorkspaceRun) and isinstance(evidence, EvidenceBundle)
    stdout = "".join(e.data["data"] for e in seen if e.type == "stdout")
    stderr = "".join(e.data["data"] for e in seen if e.type == "stderr")
    assert run.status == "succeeded", (run.to_dict(), stdout, stderr, [e.to_dict() for e in seen if e.type == "error"])
    assert run.reason is None and run.exit_code == 0 and run.id.startswith("wsr_")
    assert run["template"] == "python-node" and run["metadata"] == {"suite": tag} and run.archive["uploaded"] is True

    # The event log: 1..n without gaps, ending with `terminal`.
    assert [e.seq for e in seen] == list(range(1, len(seen) + 1))
    assert seen[-1].type == "terminal" and seen[-1].data["status"] == "succeeded" and seen[-1].data["exitCode"] == 0
    assert "node sees wsr-sdk-test\n" in stdout and "report ok\n" in stdout
    assert "a warning" in stderr
    statuses = [e.data["status"] for e in seen if e.type == "status"]
    assert "running" in statuses
    collected = [e.data for e in seen if e.type == "artifact_collected"]
    assert sorted(a["name"] for a in collected) == ["report", "summary.txt"]
    # The same log as JSON pages, and replayed over SSE after the end.
    assert [e.to_dict() for e in await all_events(client, run)] == [e.to_dict() for e in seen]
    assert [e.to_dict() for e in await alist(client.workspace_runs.events(run))] == [e.to_dict() for e in seen]

    # The run's collected artifacts are real artifacts with those digests.
    by_name = {c["name"]: c for c in run["collected"]}
    assert by_name["report"]["error"] is None and by_name["report"]["path"] == "out/report.json"
    summary = await aw(client.artifacts.download(by_name["summary.txt"]["artifactId"]))
    assert summary == b"summary: all good\n"
    assert hashlib.sha256(summary).hexdigest() == by_name["summary.txt"]["sha256"]
    report = json.loads(await aw(client.artifacts.download(by_name["report"]["artifactId"])))
    assert report["ok"] is True and "ignored.txt" not in report["files"] and "package.json" in report["files"]

    # The Evidence Bundle.
    bundle, signature = evidence.bundle, evidence.signature
    assert signature["algorithm"] == "ed25519" and signature["value"] and signature["keyId"]
    keys = await aw(client.workspace_runs.evidence_keys())
    assert signature["keyId"] in [k["keyId"] for k in keys]
    assert bundle["runId"] == run.id and bundle["status"] == "succeeded" and bundle["exitCode"] == 0
    assert bundle["envNames"] == ["CI"] and bundle["template"]["name"] == "python-node"
    assert bundle["archive"] == {"sha256": run.archive["sha256"], "sizeBytes": run.archive["sizeBytes"]}
    arts = {a["name"]: a for a in bundle["artifacts"]}
    assert sorted(arts) == ["report", "summary.txt"]
    for a in arts.values():
        assert len(a["sha256"]) == 64 and a["sha256"] == by_name[a["name"]]["sha256"]
    assert bundle["events"]["count"] == len(seen)
    assert bundle["terminalEvent"] == seen[-1].to_dict()
    digest = hashlib.sha256("".join(canonical_json(e.to_dict()) + "\n" for e in seen).encode()).hexdigest()
    assert bundle["events"]["sha256"] == digest
    assert (await aw(client.workspace_runs.evidence(run))).to_dict() == evidence.to_dict()
    assert (await aw(client.workspace_runs.get(run.id)))["evidenceReady"] is True


async def test_workspace_run_fails_when_gitignored_files_reach_the_sandbox(client: Any, tmp_path: Path) -> None:
    """The control: with .gitignore emptied the same checks fail the run."""
    project = make_project(tmp_path)
    (project / ".gitignore").write_text("")
    run, evidence = await aw(client.workspace_runs.run_directory(project, "test ! -e ignored.txt", template="python-node"))
    assert (run.status, run.reason, run.exit_code) == ("failed", "exit_code", 1)
    assert evidence.bundle["status"] == "failed"


@pytest.mark.parametrize("kind", KINDS)
async def test_workspace_run_staged_archive_upload(kind: str, server: Server, api_key: str, tmp_path: Path) -> None:
    client = make_client(kind, api_key=api_key, base_url=server.base_url)
    try:
        data = tiny_archive(tmp_path, {"hello.txt": "staged hello\n"})
        archive_path = tmp_path / "workspace.tar.gz"
        archive_path.write_bytes(data)
        run = await created_run(client, "cat hello.txt", data)
        assert run.status == "awaiting_archive" and run.archive["uploaded"] is False
        target = await aw(client.workspace_runs.archive_upload_url(run))
        assert target["method"] == "PUT" and target["url"].startswith("http")
        # A path, streamed from the file, through a new staged upload.
        uploaded = await aw(client.workspace_runs.upload_archive(run, archive_path, staged=True))
        assert uploaded.id == run.id and uploaded.archive["uploaded"] is True
        assert uploaded.status == "awaiting_archive"
        started = await aw(client.workspace_runs.start(run))
        assert started.status == "queued"
        with pytest.raises(CrowNestApiError) as info:
            await aw(client.workspace_runs.start(run))
        assert (info.value.status, info.value.code) == (409, "workspace_run_already_started")
        with pytest.raises(CrowNestApiError) as info:
            await aw(client.workspace_runs.upload_archive(run, data))
        assert (info.value.status, info.value.code) == (409, "workspace_run_not_awaiting_archive")
        ended = await aw(client.workspace_runs.wait(run, timeout=120))
        assert ended.status == "succeeded", ended.to_dict()
        # wait() returns once the evidence is written too.
        assert ended["evidenceReady"] is True
        assert (await aw(client.workspace_runs.evidence(run))).bundle["status"] == "succeeded"
        events = await alist(client.workspace_runs.events(run))
        assert "".join(e.data["data"] for e in events if e.type == "stdout") == "staged hello\n"

        # Bytes, staged, with the wrong digest: refused, and the run still waits.
        other = await created_run(client, "true", data + b"\0")
        with pytest.raises(CrowNestApiError) as info:
            await aw(client.workspace_runs.upload_archive(other, data, staged=True))
        assert (info.value.status, info.value.code) == (422, "archive_size_mismatch")
        await cancel_quietly(client, other)
    finally:
        await aclose(client)


async def test_workspace_run_archive_digest_and_size_mismatch_and_start_before_upload(client: Any, tmp_path: Path) -> None:
    data = tiny_archive(tmp_path, {"a.txt": "a"})
    wrong = await aw(
        client.workspace_runs.create("true", archive={"sizeBytes": len(data), "sha256": "0" * 64})
    )
    try:
        with pytest.raises(CrowNestApiError) as info:
            await aw(client.workspace_runs.upload_archive(wrong, data))
        assert (info.value.status, info.value.code) == (422, "archive_digest_mismatch")
        with pytest.raises(CrowNestApiError) as info:
            await aw(client.workspace_runs.upload_archive(wrong, data, staged=True))
        assert (info.value.status, info.value.code) == (422, "archive_digest_mismatch")
        still = await aw(client.workspace_runs.get(wrong))
        assert still.status == "awaiting_archive" and still.archive["uploaded"] is False
        with pytest.raises(CrowNestApiError) as info:
            await aw(client.workspace_runs.start(wrong))
        assert (info.value.status, info.value.code) == (409, "archive_not_uploaded")
        with pytest.raises(CrowNestApiError) as info:
            await aw(client.workspace_runs.evidence(wrong))
        assert (info.value.status, info.value.code) == (409, "evidence_not_ready")
    finally:
        await cancel_quietly(client, wrong)
    sized = await created_run(client, "true", data + b"x")
    try:
        with pytest.raises(CrowNestApiError) as info:
            await aw(client.workspace_runs.upload_archive(sized, data))
        assert (info.value.status, info.value.code) == (422, "archive_size_mismatch")
    finally:
        await cancel_quietly(client, sized)


async def test_workspace_run_create_validation_errors(client: Any) -> None:
    archive = {"sizeBytes": 10, "sha256": "a" * 64}
    with pytest.raises(CrowNestApiError) as info:
        await aw(client.workspace_runs.create("true", archive=archive, template="no-such-template"))
    assert (info.value.status, info.value.code) == (400, "template_not_found")
    with pytest.raises(CrowNestApiError) as info:
        await aw(client.workspace_runs.create("true", archive={"sizeBytes": 10, "sha256": "abc"}))
    assert (info.value.status, info.value.code) == (400, "invalid_request")
    with pytest.raises(CrowNestApiError) as info:
        await aw(client.workspace_runs.create("true", archive=archive, artifacts=[{"path": "../etc/passwd"}]))
    assert (info.value.status, info.value.code) == (400, "invalid_request")
    with pytest.raises(CrowNestApiError) as info:
        await aw(client.workspace_runs.create("true", archive={"sizeBytes": 2 * 1024**3, "sha256": "a" * 64}))
    assert (info.value.status, info.value.code) == (400, "archive_too_large")
    with pytest.raises(CrowNestApiError) as info:
        await aw(client.workspace_runs.get("wsr_does_not_exist"))
    assert info.value.status == 404


async def test_workspace_run_cancel_while_running(client: Any, tmp_path: Path) -> None:
    data = tiny_archive(tmp_path, {"a.txt": "a"})
    run = await created_run(client, "echo sleeping; sleep 30", data)
    try:
        await aw(client.workspace_runs.upload_archive(run, data))
        await aw(client.workspace_runs.start(run))
        await until_event(
            client.workspace_runs.events(run), lambda e: e.type == "stdout" and "sleeping" in e.data["data"]
        )
        started = time.monotonic()
        canceled = await aw(client.workspace_runs.cancel(run))
        ended = await aw(client.workspace_runs.wait(run, timeout=60))
        assert time.monotonic() - started < 25, "cancel stopped the command"
    finally:
        await cancel_quietly(client, run)
    assert canceled.id == run.id
    assert (ended.status, ended.reason) == ("canceled", "canceled")
    events = await alist(client.workspace_runs.events(run))
    assert [e.seq for e in events] == list(range(1, len(events) + 1))
    assert events[-1].type == "terminal" and events[-1].data["status"] == "canceled"
    assert ended["evidenceReady"] is True
    evidence = await aw(client.workspace_runs.evidence(run))
    assert evidence.bundle["status"] == "canceled" and evidence.bundle["reason"] == "canceled"
    with pytest.raises(CrowNestApiError) as info:
        await aw(client.workspace_runs.cancel(run))
    assert (info.value.status, info.value.code) == (409, "workspace_run_finished")


async def test_workspace_run_list_filters_pages_and_wait_timeout(client: Any) -> None:
    tag = unique("list")
    archive = {"sizeBytes": 10, "sha256": "b" * 64}
    first = await aw(client.workspace_runs.create("true", archive=archive, metadata={"suite": tag, "n": "1"}))
    second = await aw(client.workspace_runs.create("true", archive=archive, metadata={"suite": tag, "n": "2"}))
    try:
        page = await aw(client.workspace_runs.list_page(metadata={"suite": tag}, limit=1))
        assert [r.id for r in page.data] == [second.id] and page.next_cursor
        page2 = await aw(client.workspace_runs.list_page(metadata={"suite": tag}, limit=1, cursor=page.next_cursor))
        assert [r.id for r in page2.data] == [first.id]
        every = [r.id for r in await alist(client.workspace_runs.list(metadata={"suite": tag}, limit=1))]
        assert every == [second.id, first.id]
        only = [r.id for r in await alist(client.workspace_runs.list(metadata={"suite": tag, "n": "1"}))]
        assert only == [first.id]
        waiting = [r.id for r in await alist(client.workspace_runs.list(status="awaiting_archive", metadata={"suite": tag}))]
        assert waiting == [second.id, first.id]
        assert [r.id for r in await alist(client.workspace_runs.list(status="running", metadata={"suite": tag}))] == []
        with pytest.raises(CrowNestTimeoutError):
            await aw(client.workspace_runs.wait(first, timeout=0.5))
    finally:
        await cancel_quietly(client, first)
        await cancel_quietly(client, second)
    canceled = [r.id for r in await alist(client.workspace_runs.list(status="canceled", metadata={"suite": tag}))]
    assert canceled == [second.id, first.id]


class CuttingProxy:
    """A TCP proxy to the server that cuts its first ``cuts`` connections
    once the response has passed ``after`` blank lines (SSE events)."""

    def __init__(self, upstream: str, cuts: int = 1, after: int = 2) -> None:
        url = httpx.URL(upstream)
        self.upstream = (url.host, url.port or 80)
        self.cuts_left = cuts
        self.after = after
        self.cut = 0
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

    def _handle(self, client: socket.socket) -> None:
        upstream = socket.create_connection(self.upstream)
        with self.lock:
            cut = self.cuts_left > 0
            if cut:
                self.cuts_left -= 1
        threading.Thread(target=DroppingProxy._pump, args=(client, upstream), daemon=True).start()
        seen = b""
        try:
            while data := upstream.recv(65536):
                if cut:
                    seen += data
                    body = seen.partition(b"\r\n\r\n")[2]
                    if body.count(b"\n\n") >= self.after:
                        end = len(data) - (len(body) - self._end_of(body))
                        client.sendall(data[: max(0, end)])
                        with self.lock:
                            self.cut += 1
                        break
                client.sendall(data)
        except OSError:
            pass
        for s in (client, upstream):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()

    def _end_of(self, body: bytes) -> int:
        """Where the ``after``-th blank line of ``body`` ends."""
        at = -2
        for _ in range(self.after):
            at = body.index(b"\n\n", at + 2)
        return at + 2


@pytest.mark.parametrize("kind", KINDS)
async def test_workspace_run_events_resume_after_seq_and_after_a_dropped_connection(
    kind: str, server: Server, api_key: str, tmp_path: Path
) -> None:
    client = make_client(kind, api_key=api_key, base_url=server.base_url)
    proxy = CuttingProxy(server.base_url, cuts=2, after=2)
    through_proxy = make_client(kind, api_key=api_key, base_url=proxy.base_url)
    try:
        data = tiny_archive(tmp_path, {"a.txt": "a"})
        run = await created_run(client, "for i in 1 2 3 4 5; do echo line $i; done; echo oops >&2", data)
        await aw(client.workspace_runs.upload_archive(run, data))
        await aw(client.workspace_runs.start(run))
        # Followed live through a proxy that cuts the stream twice.
        live = await alist(through_proxy.workspace_runs.events(run))
        assert proxy.cut >= 1, "the proxy cut the event stream"
        n = len(live)
        assert [e.seq for e in live] == list(range(1, n + 1)), [e.seq for e in live]
        assert live[-1].type == "terminal" and n >= 5
        everything = [e.to_dict() for e in await all_events(client, run)]
        assert [e.to_dict() for e in live] == everything
        assert "".join(e.data["data"] for e in live if e.type == "stdout") == "".join(
            f"line {i}\n" for i in range(1, 6)
        )
        # Resuming after a seq replays only what follows it.
        for k in (1, n // 2, n - 1):
            resumed = await alist(client.workspace_runs.events(run, after_seq=k))
            assert [e.seq for e in resumed] == list(range(k + 1, n + 1))
        page = await aw(client.workspace_runs.list_events(run, after_seq=1, limit=2))
        assert [e.seq for e in page.data] == [2, 3] and page.next_after_seq == 3
        last = await aw(client.workspace_runs.list_events(run, after_seq=n - 1))
        assert [e.seq for e in last.data] == [n] and last.terminal is True
        # The server honours Last-Event-ID on its own (without afterSeq).
        with httpx.stream(
            "GET",
            f"{server.base_url}/v1/workspace-runs/{run.id}/events",
            headers={"x-api-key": api_key, "accept": "text/event-stream", "Last-Event-ID": str(n - 2)},
        ) as response:
            assert response.headers["content-type"].startswith("text/event-stream")
            ids = [line[3:].strip() for line in response.iter_lines() if line.startswith("id:")]
        assert ids == [str(n - 1), str(n)]
    finally:
        await aclose(client)
        await aclose(through_proxy)
        proxy.close()
