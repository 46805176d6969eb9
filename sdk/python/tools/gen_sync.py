"""Generates ``src/crownest/_sync.py``, the synchronous client, from
``src/crownest/_async.py`` with unasync: ``async``/``await`` dropped,
``AsyncX`` names to ``X`` (``AsyncCrowNest`` -> ``CrowNest``,
``httpx.AsyncClient`` -> ``httpx.Client``, ``AsyncIterator`` ->
``Iterator``), httpx's ``aclose``/``aread``/``aiter_*`` to their sync
names, and ``_io_async`` to ``_io_sync`` (what differs beyond that lives
there). The module docstring is replaced by the sync one.

Run with: ``python tools/gen_sync.py`` (from sdk/python) after editing
``_async.py``; ``--check`` exits 1 when ``_sync.py`` differs instead of
writing it. ``tests/test_generated.py`` fails while it is behind.
"""

from __future__ import annotations

import os
import re
import sys
import tempfile
from pathlib import Path

import unasync

HERE = Path(__file__).resolve().parent
PACKAGE = HERE.parent / "src" / "crownest"
SOURCE = PACKAGE / "_async.py"
TARGET = PACKAGE / "_sync.py"

SYNC_DOCSTRING = '''"""The synchronous client. Generated from ``_async.py`` by
``tools/gen_sync.py`` (unasync): do not edit by hand; edit ``_async.py``
and run ``python tools/gen_sync.py`` in sdk/python. What differs between
the two beyond ``await`` lives in ``_io_sync.py`` / ``_io_async.py``."""'''

#: Names unasync does not know, besides every ``AsyncX`` (found in the source).
REPLACEMENTS = {
    "_io_async": "_io_sync",
    "aclose": "close",
    "aread": "read",
    "aiter_lines": "iter_lines",
    "aiter_bytes": "iter_bytes",
    "aiter_raw": "iter_raw",
    "aiter_text": "iter_text",
}

_ASYNC_NAME = re.compile(r"\bAsync([A-Z]\w*)")
_MODULE_DOCSTRING = re.compile(r'\A"""(?:[^"\\]|\\.|"(?!""))*"""', re.S)


def render(source: str) -> str:
    """The text of ``_sync.py`` for the text of ``_async.py``."""
    replacements = dict(REPLACEMENTS)
    for match in _ASYNC_NAME.finditer(source):
        replacements.setdefault(match.group(0), match.group(1))
    with tempfile.TemporaryDirectory() as tmp:
        src_dir = os.path.join(tmp, "_async_src")
        dst_dir = os.path.join(tmp, "_sync_src")
        os.makedirs(src_dir)
        src = os.path.join(src_dir, "module.py")
        with open(src, "w", encoding="utf-8", newline="") as f:
            f.write(source)
        rule = unasync.Rule(fromdir="/_async_src/", todir="/_sync_src/", additional_replacements=replacements)
        unasync.unasync_files([src], rules=[rule])
        with open(os.path.join(dst_dir, "module.py"), encoding="utf-8", newline="") as f:
            text = f.read()
    text, n = _MODULE_DOCSTRING.subn(SYNC_DOCSTRING, text, count=1)
    if n != 1:
        raise ValueError("_async.py must open with a module docstring")
    return text


def render_from(path: Path = SOURCE) -> str:
    return render(path.read_text(encoding="utf-8"))


def main(argv: list[str]) -> int:
    text = render_from()
    if "--check" in argv:
        current = TARGET.read_text(encoding="utf-8") if TARGET.exists() else ""
        if current != text:
            print(f"{TARGET} is out of date with {SOURCE}: run python tools/gen_sync.py", file=sys.stderr)
            return 1
        return 0
    with open(TARGET, "w", encoding="utf-8", newline="") as f:
        f.write(text)
    print(f"wrote {TARGET}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
