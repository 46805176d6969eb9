"""A live crownest server for the whole session (127.0.0.1, temp data dir),
stopped with SIGTERM at the end, and clients of both kinds."""

from __future__ import annotations

import inspect
import os
import select
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from crownest import AsyncCrowNest, CrowNest

REPO = Path(__file__).resolve().parents[3]


@dataclass
class Server:
    base_url: str
    data_dir: str
    binary: str

    def mint_key(self, org: str, scopes: str = "all") -> str:
        out = subprocess.run(
            [self.binary, "keys", "create", "--org", org, "--scopes", scopes, "--data-dir", self.data_dir],
            check=True,
            capture_output=True,
            text=True,
        )
        key = out.stdout.strip().splitlines()[-1]
        assert key.startswith("cn_live_"), out
        return key


def _binary() -> str:
    binary = os.environ.get("CROWNEST_BIN") or str(REPO / "target" / "debug" / "crownest")
    if not os.path.exists(binary):
        pytest.exit(f"crownest binary not found at {binary}: run `cargo build -p crownest` (or set CROWNEST_BIN)", 2)
    return binary


@pytest.fixture(scope="session")
def server() -> Iterator[Server]:
    binary = _binary()
    data_dir = tempfile.mkdtemp(prefix="crownest-sdk-py-")
    log = open(os.path.join(data_dir, "server.log"), "wb")
    proc = subprocess.Popen(
        [binary, "serve", "--listen", "127.0.0.1:0", "--data-dir", data_dir],
        stdout=subprocess.PIPE,
        stderr=log,
    )
    assert proc.stdout is not None
    base_url = None
    deadline = time.monotonic() + 60
    line = b""
    while time.monotonic() < deadline and proc.poll() is None:
        ready, _, _ = select.select([proc.stdout], [], [], 0.5)
        if ready:
            line = proc.stdout.readline()
            if b"listening on " in line:
                base_url = line.decode().split("listening on ", 1)[1].strip()
                break
    if base_url is None:
        proc.kill()
        proc.wait()
        log.close()
        pytest.exit(f"crownest did not start; see {data_dir}/server.log", 2)
    try:
        yield Server(base_url, data_dir, binary)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
        if proc.returncode == 0:
            shutil.rmtree(data_dir, ignore_errors=True)


@pytest.fixture(scope="session")
def api_key(server: Server) -> str:
    return server.mint_key("sdk-py-tests")


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(params=["sync", "async"])
async def client(request: pytest.FixtureRequest, server: Server, api_key: str) -> AsyncIterator[Any]:
    """The same tests run against both clients; call through ``aw``."""
    if request.param == "sync":
        with CrowNest(api_key=api_key, base_url=server.base_url) as c:
            yield c
    else:
        async with AsyncCrowNest(api_key=api_key, base_url=server.base_url) as c:
            yield c


def make_client(kind: str, **kw: Any) -> Any:
    return CrowNest(**kw) if kind == "sync" else AsyncCrowNest(**kw)


async def aw(value: Any) -> Any:
    """Awaits what the async client returns; passes through the sync one's."""
    if inspect.isawaitable(value):
        return await value
    return value


async def alist(iterable: Any) -> list[Any]:
    if hasattr(iterable, "__aiter__"):
        return [x async for x in iterable]
    return list(iterable)


async def aclose(client: Any) -> None:
    await aw(client.close())


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"
