"""The generated files are what their generators make of their sources
today (``_types.py`` from docs/openapi.json, ``_sync.py`` from
``_async.py``), and the sync and async clients have the same public
surface. No server needed."""

from __future__ import annotations

import copy
import importlib.util
import inspect
import json
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

import crownest
from crownest import _async, _io_async, _io_sync, _sync, _types

SDK = Path(__file__).resolve().parents[1]
PACKAGE = SDK / "src" / "crownest"


def load_tool(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"crownest_tools_{name}", SDK / "tools" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


gen_types = load_tool("gen_types")
gen_sync = load_tool("gen_sync")


# ------------------------------------------------------------ drift


def test_types_py_is_what_gen_types_makes_of_docs_openapi_json() -> None:
    checked_in = (PACKAGE / "_types.py").read_bytes()
    regenerated = gen_types.render_from(gen_types.OPENAPI).encode("utf-8")
    assert regenerated == checked_in, (
        "src/crownest/_types.py is out of date with docs/openapi.json: run `python tools/gen_types.py` in sdk/python"
    )


def test_gen_types_output_changes_with_the_openapi_document() -> None:
    # The drift test compares something that moves: a new schema, a new
    # property, a new enum value each change the output.
    spec = json.loads(gen_types.OPENAPI.read_text(encoding="utf-8"))
    before = gen_types.render(spec)
    changed = copy.deepcopy(spec)
    changed["components"]["schemas"]["SandboxView"]["properties"]["newField"] = {"type": "string"}
    assert "newField: NotRequired[str]" in gen_types.render(changed)
    changed = copy.deepcopy(spec)
    changed["components"]["schemas"]["SandboxStatus"]["enum"].append("paused")
    assert '"paused"' in gen_types.render(changed) and '"paused"' not in before


def test_gen_types_maps_the_schema_forms_it_claims() -> None:
    spec = {
        "components": {
            "schemas": {
                "Color": {"type": "string", "enum": ["red", "blue"], "description": "A color."},
                "Thing": {
                    "type": "object",
                    "required": ["id", "from"],
                    "properties": {
                        "id": {"type": "string"},
                        "from": {"type": "integer"},
                        "tags": {"type": ["array", "null"], "items": {"type": "string"}},
                        "color": {"oneOf": [{"type": "null"}, {"$ref": "#/components/schemas/Color"}]},
                        "env": {"type": "object", "additionalProperties": {"type": "string"}},
                        "inner": {"type": "object", "required": ["n"], "properties": {"n": {"type": "number"}}},
                        "any": {},
                    },
                },
            }
        }
    }
    text = gen_types.render(spec)
    assert 'Color = Literal["red", "blue"]' in text
    assert 'Thing = TypedDict(' in text  # `from` is a keyword: the functional form
    assert '"from": int' in text and '"id": str' in text
    assert '"tags": NotRequired[list[str] | None]' in text
    assert '"color": NotRequired["Color | None"]' in text  # a name of the module: quoted
    assert '"env": NotRequired[dict[str, str]]' in text
    assert '"inner": NotRequired["ThingInner"]' in text and "class ThingInner(TypedDict):" in text
    assert '"any": NotRequired[Any]' in text
    namespace: dict[str, Any] = {}
    exec(compile(text, "<generated>", "exec"), namespace)  # the output is valid Python
    assert namespace["Thing"].__required_keys__ == {"id", "from"}


def test_the_generated_typed_dicts_know_their_optional_keys_at_run_time() -> None:
    assert "artifacts" in _types.CommandView.__optional_keys__
    assert {"id", "status", "exitCode"} & _types.CommandView.__required_keys__ == {"id", "status"}
    assert "from" in _types.UsageReport.__required_keys__
    assert _types.SandboxView.__required_keys__ >= {"id", "status", "expiresAt", "metadata"}


def test_sync_py_is_what_gen_sync_makes_of_async_py_byte_for_byte() -> None:
    checked_in = (PACKAGE / "_sync.py").read_bytes()
    regenerated = gen_sync.render_from(gen_sync.SOURCE).encode("utf-8")
    assert regenerated == checked_in, (
        "src/crownest/_sync.py is out of date with _async.py: run `python tools/gen_sync.py` in sdk/python"
    )


def test_gen_sync_turns_async_code_into_sync_code() -> None:
    source = '''"""Async."""
from . import _io_async as _io


class AsyncThing:
    async def __aenter__(self) -> AsyncThing:
        return self

    async def go(self, client) -> bytes:
        await _io.sleep(1)
        async with client.stream("GET", "/") as response:
            async for line in response.aiter_lines():
                pass
            await response.aread()
            await response.aclose()
        return b""
'''
    out = gen_sync.render(source)
    code = out.split('"""', 2)[2]  # past the module docstring
    assert "await" not in code and "async " not in code
    assert "from . import _io_sync as _io" in out
    assert "class Thing:" in out and "def __enter__(self) -> Thing:" in out
    assert "with client.stream" in out and "response.iter_lines()" in out
    assert "response.read()" in out and "response.close()" in out
    assert out.startswith('"""The synchronous client.')


# ------------------------------------------------------------ the two surfaces


def _sync_name(name: str) -> str:
    return name[5:] if name.startswith("Async") and name[5:6].isupper() else name


_PROTOCOL = {"__aenter__": "__enter__", "__aexit__": "__exit__", "__aiter__": "__iter__"}


def _classes(module: ModuleType) -> dict[str, type]:
    return {
        name: obj
        for name, obj in vars(module).items()
        if inspect.isclass(obj) and obj.__module__ == module.__name__ and not name.startswith("_")
    }


def _members(cls: type) -> dict[str, Any]:
    """Public members and protocol methods, own and inherited from the SDK
    (not from Mapping and object)."""
    found: dict[str, Any] = {}
    for klass in reversed(cls.__mro__):
        if not klass.__module__.startswith("crownest"):
            continue
        for name, value in vars(klass).items():
            if not name.startswith("_") or name in _PROTOCOL or name in _PROTOCOL.values() or name == "__init__":
                found[name] = value
    return found


def _shape(fn: Any) -> list[tuple[str, str, str]]:
    sig = inspect.signature(fn)
    return [(p.name, str(p.kind), repr(p.default)) for p in sig.parameters.values()]


def test_every_async_class_has_a_sync_twin_and_no_more() -> None:
    async_names = set(_classes(_async))
    sync_names = set(_classes(_sync))
    assert {_sync_name(n) for n in async_names} == sync_names
    assert all(n.startswith("Async") for n in async_names), "an async class without the Async prefix"


@pytest.mark.parametrize("name", sorted(_classes(_async)))
def test_the_sync_twin_has_the_same_methods_and_parameters(name: str) -> None:
    async_cls = _classes(_async)[name]
    sync_cls = _classes(_sync)[_sync_name(name)]
    async_members = _members(async_cls)
    sync_members = _members(sync_cls)
    assert {_PROTOCOL.get(n, n) for n in async_members} == set(sync_members)
    for member, value in async_members.items():
        twin = sync_members[_PROTOCOL.get(member, member)]
        assert type(value) is type(twin), f"{name}.{member}: {type(value)} vs {type(twin)}"
        if isinstance(value, property):
            continue
        if callable(value):
            assert _shape(value) == _shape(twin), f"{name}.{member} has other parameters than its sync twin"
            if inspect.iscoroutinefunction(value) or inspect.isasyncgenfunction(value):
                assert not inspect.iscoroutinefunction(twin) and not inspect.isasyncgenfunction(twin)
            assert not inspect.iscoroutinefunction(twin), f"{_sync_name(name)}.{member} is async"


def test_every_blocking_async_method_is_awaitable_or_iterable() -> None:
    # A public async-client method either is a coroutine function, an async
    # generator, or returns an async iterable (lists, logs, streams).
    # (What a record inherits from Record, to_dict and the mapping methods,
    # reads data already in memory in both.)
    for name, cls in _classes(_async).items():
        own = {n: v for k in cls.__mro__ if k.__module__ == _async.__name__ for n, v in vars(k).items()}
        for member, value in own.items():
            if member.startswith("_") and member not in _PROTOCOL or isinstance(value, property):
                continue
            if not callable(value) or inspect.isclass(value):
                continue
            if inspect.iscoroutinefunction(value) or inspect.isasyncgenfunction(value):
                continue
            returned = str(inspect.signature(value).return_annotation)  # a string: deferred annotations
            assert "Async" in returned, f"{name}.{member} returns {returned}: neither awaitable nor async-iterable"


def test_the_io_modules_offer_the_same_names_and_parameters() -> None:
    def public(module: ModuleType) -> dict[str, Any]:
        return {
            n: v
            for n, v in vars(module).items()
            if not n.startswith("_") and (inspect.isfunction(v) or inspect.isclass(v)) and v.__module__ == module.__name__
        }

    a, s = public(_io_async), public(_io_sync)
    assert set(a) == set(s) and {"sleep", "call", "blocking", "spool", "is_chunk_source", "Worker"} <= set(a)
    for n in a:
        assert n in a and n in s, f"{n} is in one _io module only"
        if inspect.isfunction(a[n]):
            assert _shape(a[n]) == _shape(s[n]), n
        if inspect.isclass(a[n]):
            assert set(_members(a[n])) == set(_members(s[n])), n
    for alias in ("Callback", "OutputCallback", "EventCallback", "WatchCallback", "FileData", "PageFetch"):
        assert hasattr(_io_async, alias) and hasattr(_io_sync, alias), alias


def test_clients_and_handles_carry_twin_sub_clients() -> None:
    sync_client = crownest.CrowNest(api_key="cn_live_x", base_url="http://127.0.0.1:9")
    async_client = crownest.AsyncCrowNest(api_key="cn_live_x", base_url="http://127.0.0.1:9")
    try:
        def subclients(obj: Any) -> dict[str, str]:
            return {k: type(v).__name__ for k, v in vars(obj).items() if not k.startswith("_") and type(v).__module__.startswith("crownest")}

        assert {k: _sync_name(v) for k, v in subclients(async_client).items()} == subclients(sync_client)
        assert {"sandboxes", "usage", "audit", "workspace_runs"} <= set(subclients(sync_client))
        data = {"id": "sbx_1", "status": "running"}
        sync_handle = crownest.SandboxHandle(sync_client, data)
        async_handle = crownest.AsyncSandboxHandle(async_client, data)
        assert {k: _sync_name(v) for k, v in subclients(async_handle).items()} == subclients(sync_handle)
    finally:
        sync_client.close()


def test_the_package_exports_both_twins_and_the_literals() -> None:
    for name in _classes(_async):
        assert name in crownest.__all__ and _sync_name(name) in crownest.__all__, name
    for literal in ("SandboxStatus", "CommandStatus", "CodeLanguage", "ArtifactPolicy", "RunStatus", "PreviewStatus"):
        assert literal in crownest.__all__
    assert crownest.SandboxStatus is _types.SandboxStatus
    import crownest.types as public_types

    assert set(public_types.__all__) == set(_types.__all__)
    assert "SandboxView" in public_types.__all__
