"""Issue 16's API surface against a live server: kill by id, set_timeout,
list filters, metrics, files.exists / write_files / streaming / watch,
restart_context, the handle as a context manager, usage and audit. Every
test taking ``client`` runs with the sync and the async client."""

from __future__ import annotations

import datetime as dt
import hashlib
import os
import time
from pathlib import Path
from typing import Any

import anyio
import pytest
from conftest import Server, aclose, alist, aw, make_client, unique

from crownest import AsyncCrowNest, CrowNest, CrowNestApiError, SandboxHandle
from crownest import types as wire

pytestmark = pytest.mark.anyio

KINDS = ["sync", "async"]
MIB = 1024 * 1024


def parse_time(text: str) -> dt.datetime:
    return dt.datetime.fromisoformat(text.replace("Z", "+00:00"))


def record_requests(client: Any) -> list[tuple[str, str]]:
    """Every request the client sends from now on, as (method, path)."""
    seen: list[tuple[str, str]] = []
    if isinstance(client, AsyncCrowNest):

        async def hook(request: Any) -> None:
            seen.append((request.method, request.url.path))
    else:

        def hook(request: Any) -> None:
            seen.append((request.method, request.url.path))

    client._http.event_hooks = {"request": [hook], "response": []}
    return seen


async def new_sandbox(client: Any, **kw: Any) -> Any:
    return await aw(client.sandboxes.create(template="python", **kw))


async def kill_quietly(sandbox: Any) -> None:
    try:
        await aw(sandbox.kill())
    except CrowNestApiError as e:
        assert e.code == "sandbox_destroyed"


async def wait_for(predicate: Any, timeout: float = 15.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await anyio.sleep(0.1)


# ------------------------------------------------------------ sandboxes


async def test_kill_by_id_is_one_delete_and_a_second_kill_is_410(client: Any) -> None:
    sandbox = await new_sandbox(client)
    seen = record_requests(client)
    killed = await aw(client.sandboxes.kill(sandbox.id))
    assert seen == [("DELETE", f"/v1/sandboxes/{sandbox.id}")], "no GET before the DELETE"
    assert killed.id == sandbox.id and killed.status == "destroyed" and killed["endReason"] == "killed"
    with pytest.raises(CrowNestApiError) as info:
        await aw(client.sandboxes.kill(sandbox.id))
    assert (info.value.status, info.value.code) == (410, "sandbox_destroyed")


async def test_set_timeout_moves_expires_at_both_ways_and_refuses_a_bad_ttl(client: Any) -> None:
    sandbox = await new_sandbox(client, ttl_ms=5 * 60 * 1000)
    try:
        before = parse_time(sandbox["expiresAt"])
        same = await aw(sandbox.set_timeout(30 * 60 * 1000))
        assert same is sandbox
        extended = parse_time(sandbox["expiresAt"])
        now = dt.datetime.now(dt.timezone.utc)
        assert extended > before
        assert abs((extended - now).total_seconds() - 30 * 60) < 60
        assert parse_time((await aw(client.sandboxes.get(sandbox.id)))["expiresAt"]) == extended

        shortened = await aw(client.sandboxes.set_timeout(sandbox.id, 2 * 60 * 1000))
        assert parse_time(shortened["expiresAt"]) < before
        assert shortened.status == "running"

        for bad in (0, 10 * 365 * 24 * 3600 * 1000):
            with pytest.raises(CrowNestApiError) as info:
                await aw(sandbox.set_timeout(bad))
            assert (info.value.status, info.value.code) == (400, "invalid_request")
            assert info.value.details.get("field") == "ttlMs"
        audit = [e.action async for e in _aiter(client.audit.list(resource_id=sandbox.id))]
        assert "sandbox.timeout" in audit
    finally:
        await kill_quietly(sandbox)
    with pytest.raises(CrowNestApiError) as info:
        await aw(client.sandboxes.set_timeout(sandbox.id, 60_000))
    assert info.value.code == "sandbox_destroyed"
    with pytest.raises(CrowNestApiError) as info:
        await aw(client.sandboxes.set_timeout("sbx_does_not_exist", 60_000))
    assert info.value.status == 404


async def _aiter(iterable: Any) -> Any:
    for item in await alist(iterable):
        yield item


@pytest.mark.parametrize("kind", KINDS)
async def test_list_filters_by_status_template_metadata_and_creation_time(
    kind: str, server: Server
) -> None:
    # A fresh org: its list holds only what this test creates.
    client = make_client(kind, api_key=server.mint_key(unique("sdk-py-list")), base_url=server.base_url)
    job = unique("job")
    try:
        a = await new_sandbox(client, metadata={"job": job, "n": 1, "ok": True})
        b = await new_sandbox(client, metadata={"job": job, "n": 2})
        c = await new_sandbox(client, metadata={"job": unique("other")})
        await aw(c.kill())

        async def ids(**filters: Any) -> list[str]:
            return [s.id for s in await alist(client.sandboxes.list(**filters))]

        assert await ids(metadata={"job": job}) == [b.id, a.id], "newest first, both matches"
        assert await ids(metadata={"job": job, "n": 1}) == [a.id], "a number matches by its JSON text"
        assert await ids(metadata={"ok": True}) == [a.id]
        assert await ids(metadata={"job": job}, limit=1) == [b.id, a.id], "pages keep the filter"
        pages = await alist(client.sandboxes.list(metadata={"job": job}, limit=1).pages())
        assert [len(p) for p in pages] == [1, 1]
        assert await ids(status="destroyed") == [c.id]
        assert set(await ids(status="running")) == {a.id, b.id}
        assert await ids(template="python", metadata={"job": job}) == [b.id, a.id]
        assert await ids(template="node") == []
        after_a = await ids(created_after=a["createdAt"])
        assert a.id not in after_a, "createdAfter is exclusive"
        assert b.id in after_a or b["createdAt"] == a["createdAt"]
        before_a = parse_time(a["createdAt"]) - dt.timedelta(seconds=1)
        assert set(await ids(created_after=before_a)) == {a.id, b.id, c.id}
        assert await ids(created_before=before_a) == []
        assert a.id in await ids(created_before=dt.datetime.now(dt.timezone.utc) + dt.timedelta(minutes=1))
        with pytest.raises(CrowNestApiError) as info:
            await alist(client.sandboxes.list(status="paused"))  # type: ignore[arg-type]
        assert (info.value.status, info.value.code) == (400, "invalid_request")
        with pytest.raises(CrowNestApiError) as info:
            await alist(client.sandboxes.list(created_after="yesterday"))
        assert info.value.code == "invalid_request"
    finally:
        for s in await alist(client.sandboxes.list(status="running")):
            await kill_quietly(s)
        await aclose(client)


async def test_the_typed_views_name_every_field_the_server_sends(client: Any) -> None:
    sandbox = await new_sandbox(client)
    try:
        view = sandbox.to_dict()
        declared = wire.SandboxView.__required_keys__ | wire.SandboxView.__optional_keys__
        assert set(view) <= declared, f"undeclared fields: {set(view) - declared}"
        assert wire.SandboxView.__required_keys__ <= set(view)
        run = await aw(sandbox.commands.run("true"))
        command_keys = wire.CommandView.__required_keys__ | wire.CommandView.__optional_keys__
        assert set(run) <= command_keys and wire.CommandView.__required_keys__ <= set(run)
    finally:
        await kill_quietly(sandbox)


@pytest.mark.parametrize("kind", KINDS)
async def test_the_handle_as_a_context_manager_kills_the_sandbox(kind: str, server: Server, api_key: str) -> None:
    if kind == "sync":
        with CrowNest(api_key=api_key, base_url=server.base_url) as client:
            with client.sandboxes.create(template="python") as sandbox:
                assert isinstance(sandbox, SandboxHandle)
                assert sandbox.commands.run("echo hi")["stdout"] == "hi\n"
            assert client.sandboxes.get(sandbox.id).status == "destroyed"
            with client.sandboxes.create(template="python") as early:
                early.kill()  # already destroyed on exit: the 410 is not an error
            assert early.status == "destroyed"
            with pytest.raises(RuntimeError, match="boom"):
                with client.sandboxes.create(template="python") as failing:
                    raise RuntimeError("boom")
            assert client.sandboxes.get(failing.id).status == "destroyed"
    else:
        async with AsyncCrowNest(api_key=api_key, base_url=server.base_url) as client:
            async with await client.sandboxes.create(template="python") as sandbox:
                assert (await sandbox.commands.run("echo hi"))["stdout"] == "hi\n"
            assert (await client.sandboxes.get(sandbox.id)).status == "destroyed"
            async with await client.sandboxes.create(template="python") as early:
                await early.kill()
            with pytest.raises(RuntimeError, match="boom"):
                async with await client.sandboxes.create(template="python") as failing:
                    raise RuntimeError("boom")
            assert (await client.sandboxes.get(failing.id)).status == "destroyed"


# ------------------------------------------------------------ metrics


async def test_metrics_cpu_usage_grows_while_a_command_burns_cpu(client: Any) -> None:
    sandbox = await new_sandbox(client)
    try:
        idle = await aw(sandbox.metrics())
        assert idle["sandboxId"] == sandbox.id
        for key in ("cpuUsageSeconds", "cpuPercent"):
            assert isinstance(idle[key], (int, float)), key
        for key in ("vcpus", "memoryUsedBytes", "memoryLimitBytes", "pids", "pidsLimit",
                    "workspaceUsedBytes", "workspaceLimitBytes", "networkBytesIn", "networkBytesOut"):
            assert isinstance(idle[key], int) and idle[key] >= 0, key
        assert idle["memoryLimitBytes"] > 0 and idle["pidsLimit"] > 0
        parse_time(idle["timestamp"])

        burner = await aw(sandbox.commands.start("sh -c 'while :; do :; done'"))
        first = await aw(client.sandboxes.metrics(sandbox.id))
        await anyio.sleep(2.5)
        second = await aw(sandbox.metrics())
        grown = second["cpuUsageSeconds"] - first["cpuUsageSeconds"]
        assert grown > 1.0, f"cpuUsageSeconds grew by {grown} in 2.5 s of a busy loop"
        assert second["cpuPercent"] > 30, second["cpuPercent"]
        assert second["pids"] >= 2
        await aw(burner.cancel())
    finally:
        await kill_quietly(sandbox)
    with pytest.raises(CrowNestApiError) as info:
        await aw(client.sandboxes.metrics(sandbox.id))
    assert (info.value.status, info.value.code) == (410, "sandbox_destroyed")


async def test_metrics_stream_yields_samples_until_the_sandbox_ends(client: Any, server: Server, api_key: str) -> None:
    sandbox = await new_sandbox(client)
    killer = CrowNest(api_key=api_key, base_url=server.base_url)
    samples: list[Any] = []
    try:
        started = time.monotonic()
        stream = sandbox.metrics_stream()
        if hasattr(stream, "__aiter__"):
            async for sample in stream:
                samples.append(sample)
                if len(samples) == 2:
                    killer.sandboxes.kill(sandbox.id)
                assert time.monotonic() - started < 30, "the stream did not end with the sandbox"
        else:
            for sample in stream:
                samples.append(sample)
                if len(samples) == 2:
                    killer.sandboxes.kill(sandbox.id)
                assert time.monotonic() - started < 30, "the stream did not end with the sandbox"
    finally:
        killer.close()
        await kill_quietly(sandbox)
    assert len(samples) >= 2
    assert all(s["sandboxId"] == sandbox.id and "cpuUsageSeconds" in s for s in samples)
    times = [parse_time(s["timestamp"]) for s in samples]
    assert times == sorted(times) and times[0] < times[-1]


# ------------------------------------------------------------ files


async def test_files_exists(client: Any) -> None:
    sandbox = await new_sandbox(client)
    try:
        await aw(sandbox.files.write("there/file.txt", "x"))
        assert await aw(sandbox.files.exists("there/file.txt")) is True
        assert await aw(sandbox.files.exists("/workspace/there")) is True
        assert await aw(sandbox.files.exists("there/missing.txt")) is False
        with pytest.raises(CrowNestApiError) as info:
            await aw(sandbox.files.exists("/etc/passwd"))
        assert (info.value.status, info.value.code) == (400, "path_outside_workspace")
    finally:
        await kill_quietly(sandbox)


async def test_files_write_files_writes_each(client: Any) -> None:
    sandbox = await new_sandbox(client)
    try:
        infos = await aw(
            sandbox.files.write_files(
                [{"path": "a/one.txt", "data": "héllo"}, {"path": "b/two.bin", "data": b"\x00\x01\x02"}]
            )
        )
        assert [i.path for i in infos] == ["/workspace/a/one.txt", "/workspace/b/two.bin"]
        assert await aw(sandbox.files.read_text("a/one.txt")) == "héllo"
        assert await aw(sandbox.files.read("b/two.bin")) == b"\x00\x01\x02"
    finally:
        await kill_quietly(sandbox)


async def _collect(stream: Any) -> list[bytes]:
    return await alist(stream)


async def test_a_40_mib_file_streams_in_and_out_through_staged_urls(client: Any, tmp_path: Path) -> None:
    size = 40 * MIB
    local = tmp_path / "big.bin"
    digest = hashlib.sha256()
    with open(local, "wb") as f:
        block = os.urandom(MIB)
        for i in range(40):
            chunk = bytes([i]) + block[1:]
            digest.update(chunk)
            f.write(chunk)
    sandbox = await new_sandbox(client)
    try:
        seen = record_requests(client)
        with open(local, "rb") as f:
            info = await aw(sandbox.files.write("big.bin", f))
        assert info["size"] == size
        assert ("POST", f"/v1/sandboxes/{sandbox.id}/files/uploads") in seen, "over 32 MiB: a staged upload"
        assert not any(m == "PUT" and p.endswith("/files") for m, p in seen)
        check = await aw(sandbox.commands.run("sha256sum big.bin"))
        assert check["stdout"].split()[0] == digest.hexdigest()

        seen.clear()
        chunks = await _collect(sandbox.files.read_stream("big.bin", chunk_size=MIB))
        assert ("POST", f"/v1/sandboxes/{sandbox.id}/files/downloads") in seen, "over 32 MiB: a staged download"
        assert sum(len(c) for c in chunks) == size
        assert max(len(c) for c in chunks) <= MIB, "chunks, not the whole file at once"
        assert hashlib.sha256(b"".join(chunks)).hexdigest() == digest.hexdigest()
    finally:
        await kill_quietly(sandbox)


async def test_small_streams_go_direct_and_chunk_iterables_are_written(client: Any) -> None:
    sandbox = await new_sandbox(client)
    try:
        seen = record_requests(client)
        parts = [b"alpha-", b"beta-", b"gamma"]
        info = await aw(sandbox.files.write("chunks.txt", iter(parts)))
        assert info["size"] == len(b"".join(parts))
        assert ("PUT", f"/v1/sandboxes/{sandbox.id}/files") in seen
        seen.clear()
        chunks = await _collect(sandbox.files.read_stream("chunks.txt"))
        assert b"".join(chunks) == b"alpha-beta-gamma"
        assert ("GET", f"/v1/sandboxes/{sandbox.id}/files") in seen
        assert not any(p.endswith("/downloads") for _, p in seen)
        with pytest.raises(CrowNestApiError) as info_err:
            await _collect(sandbox.files.read_stream("nope.txt"))
        assert info_err.value.status == 404
    finally:
        await kill_quietly(sandbox)


async def test_watch_reports_create_modify_delete_and_stops(client: Any) -> None:
    sandbox = await new_sandbox(client)
    events: list[Any] = []
    try:
        await aw(sandbox.files.mkdir("w"))
        handle = await aw(sandbox.files.watch("w", events.append))
        try:
            assert handle.path == "/workspace/w"
            assert handle.running
            await aw(sandbox.commands.run("cd /workspace/w && echo a > f.txt && sleep 0.2 && echo b >> f.txt && sleep 0.2 && rm f.txt"))

            def saw(kind: str) -> bool:
                return any(e["type"] == kind and e["path"] == "/workspace/w/f.txt" for e in events)

            await wait_for(lambda: saw("create") and saw("modify") and saw("delete"), what=f"create/modify/delete in {events}")
            kinds = [e["type"] for e in events if e["path"] == "/workspace/w/f.txt"]
            assert kinds.index("create") < kinds.index("delete")
            assert all(e["isDir"] is False for e in events if e["path"] == "/workspace/w/f.txt")
        finally:
            await aw(handle.stop())
        assert not handle.running and handle.error is None
        count = len(events)
        await aw(sandbox.commands.run("touch /workspace/w/after-stop.txt"))
        await anyio.sleep(1)
        assert len(events) == count, "no events after stop()"
    finally:
        await kill_quietly(sandbox)


async def test_watch_is_a_context_manager_and_sees_subdirectories(client: Any) -> None:
    sandbox = await new_sandbox(client)
    events: list[Any] = []
    try:
        if isinstance(client, AsyncCrowNest):

            async def on_event(event: Any) -> None:  # a coroutine function is awaited
                events.append(event)

            async with await sandbox.files.watch(None, on_event) as handle:
                await sandbox.commands.run("mkdir -p /workspace/deep/er && touch /workspace/deep/er/x")
                await wait_for(lambda: any(e["path"] == "/workspace/deep/er/x" for e in events), what="a nested create")
        else:
            with sandbox.files.watch(None, events.append, recursive=True) as handle:
                sandbox.commands.run("mkdir -p /workspace/deep/er && touch /workspace/deep/er/x")
                await wait_for(lambda: any(e["path"] == "/workspace/deep/er/x" for e in events), what="a nested create")
        assert handle.path == "/workspace"
        assert any(e["path"] == "/workspace/deep" and e["isDir"] for e in events)
        assert not handle.running
    finally:
        await kill_quietly(sandbox)


async def test_watch_errors(client: Any) -> None:
    sandbox = await new_sandbox(client)
    try:
        await aw(sandbox.files.write("plain.txt", "x"))
        with pytest.raises(CrowNestApiError) as info:
            await aw(sandbox.files.watch("plain.txt", lambda e: None))
        assert (info.value.status, info.value.code) == (400, "not_a_directory")
        with pytest.raises(CrowNestApiError) as info:
            await aw(sandbox.files.watch("missing-dir", lambda e: None))
        assert (info.value.status, info.value.code) == (404, "file_not_found")
    finally:
        await kill_quietly(sandbox)


# ------------------------------------------------------------ code


async def test_restart_context_keeps_the_id_and_drops_the_state(client: Any) -> None:
    sandbox = await new_sandbox(client)
    try:
        context = await aw(sandbox.code.create_context())
        await aw(sandbox.code.run("value = 41", context_id=context))
        assert (await aw(sandbox.code.run("print(value + 1)", context_id=context))).text == "42\n"
        restarted = await aw(sandbox.code.restart_context(context.id))
        assert restarted.id == context.id and restarted.language == "python"
        after = await aw(sandbox.code.run("print(value)", context_id=context))
        assert after.error is not None and after.error["name"] == "NameError"
        with pytest.raises(CrowNestApiError) as info:
            await aw(sandbox.code.restart_context("cctx_does_not_exist"))
        assert info.value.status == 404
    finally:
        await kill_quietly(sandbox)


# ------------------------------------------------------------ usage and audit


async def test_usage_and_audit(client: Any) -> None:
    sandbox = await new_sandbox(client)
    try:
        await aw(sandbox.commands.run("true"))
        await aw(sandbox.set_timeout(5 * 60 * 1000))
    finally:
        await kill_quietly(sandbox)
    report = await aw(client.usage.get())
    assert report["groupBy"] == "sandbox" and isinstance(report["data"], list)
    assert isinstance(report["totalComputeUnitSeconds"], int)
    assert sandbox.id in [line["key"] for line in report["data"]]
    now = dt.datetime.now(dt.timezone.utc)
    by_day = await aw(client.usage.get(from_=now - dt.timedelta(days=1), to=now + dt.timedelta(minutes=1), group_by="day"))
    assert by_day["groupBy"] == "day" and all(len(line["key"]) == 10 for line in by_day["data"])
    with pytest.raises(CrowNestApiError) as info:
        await aw(client.usage.get(group_by="week"))
    assert info.value.code == "invalid_request"

    events = await alist(client.audit.list(resource_id=sandbox.id))
    actions = [e.action for e in events]
    assert {"sandbox.create", "sandbox.timeout", "sandbox.kill"} <= set(actions)
    assert all(e["resourceId"] == sandbox.id for e in events)
    creates = await alist(client.audit.list(resource_id=sandbox.id, action="sandbox.create"))
    assert [e.action for e in creates] == ["sandbox.create"] and creates[0].id.startswith("evt_")
    paged = await alist(client.audit.list(resource_id=sandbox.id, limit=1))
    assert [e.id for e in paged] == [e.id for e in events], "limit=1 pages through all of them"
    since = await alist(client.audit.list(resource_id=sandbox.id, from_=now + dt.timedelta(minutes=1)))
    assert since == []
    with pytest.raises(CrowNestApiError) as info:
        await alist(client.audit.list(action="sandbox.explode"))
    assert info.value.code == "invalid_request"
