"""Packing a directory into the ``.tar.gz`` of a Workspace Run: a walk that
respects ``.gitignore`` files (and skips ``.git``), and a gzipped PAX tar
written through a hashing writer, so its size and SHA-256 are known when it
is done. Used by both clients (the async one runs it in a thread)."""

from __future__ import annotations

import hashlib
import os
import re
import stat
import tarfile
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from typing import IO, Any

#: Archives up to this size go in one ``PUT .../archive``; larger ones
#: through a staged upload (the direct route refuses them with 413).
DIRECT_UPLOAD_MAX = 32 * 1024 * 1024


# ---------------------------------------------------------------- .gitignore


@dataclass(frozen=True)
class IgnoreRule:
    """One pattern of a ``.gitignore``: ``base`` is the directory of that
    file relative to the packed root (``""`` for the root)."""

    base: str
    pattern: str
    regex: re.Pattern[str]
    negate: bool
    dir_only: bool


def _translate_segment(seg: str) -> str:
    out: list[str] = []
    i, n = 0, len(seg)
    while i < n:
        c = seg[i]
        if c == "*":
            out.append("[^/]*")
        elif c == "?":
            out.append("[^/]")
        elif c == "\\" and i + 1 < n:
            i += 1
            out.append(re.escape(seg[i]))
        elif c == "[":
            j = i + 1
            if j < n and seg[j] in "!^":
                j += 1
            if j < n and seg[j] == "]":
                j += 1
            while j < n and seg[j] != "]":
                j += 1
            if j >= n:  # no closing bracket: a literal "["
                out.append(re.escape(c))
            else:
                body = seg[i + 1 : j]
                negated = body[:1] in ("!", "^")
                if negated:
                    body = body[1:]
                body = body.replace("\\", "\\\\").replace("[", "\\[")
                out.append(f"[^/{body}]" if negated else f"(?!/)[{body}]")
                i = j
        else:
            out.append(re.escape(c))
        i += 1
    return "".join(out)


def _glob_regex(pattern: str, anchored: bool) -> re.Pattern[str]:
    parts = pattern.split("/")
    regex = "" if anchored else "(?:.*/)?"
    for i, seg in enumerate(parts):
        last = i == len(parts) - 1
        if seg == "**":
            # `**/x` and `a/**/x`: zero or more directories; `a/**`: all inside.
            regex += ".*" if last else "(?:.*/)?"
            continue
        regex += _translate_segment(seg)
        if not last:
            regex += "/"
    return re.compile(f"^{regex}$", re.DOTALL)


def parse_gitignore(text: str, base: str = "") -> list[IgnoreRule]:
    """The rules of one ``.gitignore`` (git's syntax: ``#`` comments,
    ``!`` negation, a trailing ``/`` for directories only, a leading or
    inner ``/`` anchoring to the file's directory, ``*``, ``?``, ``[…]``,
    ``**``, ``\\`` escapes)."""
    rules: list[IgnoreRule] = []
    for raw in text.splitlines():
        line = raw
        if not line or line.startswith("#"):
            continue
        while line.endswith(" ") and not line.endswith("\\ "):
            line = line[:-1]
        if not line:
            continue
        negate = line.startswith("!")
        if negate:
            line = line[1:]
        elif line.startswith(("\\!", "\\#")):
            line = line[1:]
        dir_only = line.endswith("/")
        line = line.rstrip("/")
        if not line:
            continue
        anchored = "/" in line
        line = line.lstrip("/")
        if not line:
            continue
        rules.append(IgnoreRule(base, raw, _glob_regex(line, anchored), negate, dir_only))
    return rules


def is_ignored(path: str, is_dir: bool, rules: list[IgnoreRule]) -> bool:
    """Whether ``path`` (relative to the root, ``/``-separated) is ignored:
    the last rule that matches decides (rules are in file order, shallower
    files first)."""
    ignored = False
    for rule in rules:
        if rule.dir_only and not is_dir:
            continue
        if rule.base:
            if not path.startswith(rule.base + "/"):
                continue
            sub = path[len(rule.base) + 1 :]
        else:
            sub = path
        if rule.regex.match(sub):
            ignored = not rule.negate
    return ignored


# ---------------------------------------------------------------- walk


def walk_directory(root: str | os.PathLike[str], *, include_git: bool = False) -> Iterator[tuple[str, str]]:
    """``(relative path, full path)`` of every directory, regular file and
    symlink under ``root`` that is packed, parents before their contents,
    in name order. ``.gitignore`` files are honoured as git does (an
    ignored directory is not entered); ``.git`` is skipped unless
    ``include_git`` (then it is packed whole). Other kinds (sockets, fifos,
    devices) are left out."""
    top = os.fspath(root)
    if not os.path.isdir(top):
        raise NotADirectoryError(top)

    def entries(full: str, rel: str, rules: list[IgnoreRule], in_git: bool) -> Iterator[tuple[str, str]]:
        if not in_git:
            gitignore = os.path.join(full, ".gitignore")
            if os.path.isfile(gitignore):
                with open(gitignore, encoding="utf-8", errors="replace") as f:
                    rules = rules + parse_gitignore(f.read(), rel)
        with os.scandir(full) as it:
            names = sorted(e.name for e in it)
        for name in names:
            child_full = os.path.join(full, name)
            child_rel = f"{rel}/{name}" if rel else name
            st = os.lstat(child_full)
            is_dir = stat.S_ISDIR(st.st_mode)
            git = in_git or name == ".git"
            if name == ".git" and not in_git and not include_git:
                continue
            if not git and is_ignored(child_rel, is_dir, rules):
                continue
            if is_dir:
                yield child_rel, child_full
                yield from entries(child_full, child_rel, rules, git)
            elif stat.S_ISREG(st.st_mode) or stat.S_ISLNK(st.st_mode):
                yield child_rel, child_full

    yield from entries(top, "", [], False)


# ---------------------------------------------------------------- packing


class _HashingWriter:
    """A write-only file that hashes and counts what passes through."""

    def __init__(self, out: IO[bytes]) -> None:
        self._out = out
        self.sha256 = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> int:
        self._out.write(data)
        self.sha256.update(data)
        self.size += len(data)
        return len(data)

    def flush(self) -> None:
        self._out.flush()


@dataclass
class PackedArchive:
    """A packed ``.tar.gz``: ``file`` (positioned at 0; in memory up to
    32 MiB, a temporary file beyond), ``size_bytes``, ``sha256``
    (lower-case hex) and ``entries`` (the relative paths packed). Close it
    (or use ``with``) to drop the temporary file."""

    file: IO[bytes]
    size_bytes: int
    sha256: str
    entries: list[str]

    @property
    def archive(self) -> dict[str, Any]:
        """The ``archive`` field of a create: ``{sizeBytes, sha256}``."""
        return {"sizeBytes": self.size_bytes, "sha256": self.sha256}

    def close(self) -> None:
        self.file.close()

    def __enter__(self) -> PackedArchive:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def pack_directory(directory: str | os.PathLike[str], *, include_git: bool = False) -> PackedArchive:
    """Packs ``directory`` into a gzipped tar of relative paths (no leading
    ``/``): directories, regular files, and symlinks as symlinks, owned by
    0:0 with their modes and mtimes, ``.gitignore`` respected, ``.git``
    skipped unless ``include_git``."""
    out: IO[bytes] = tempfile.SpooledTemporaryFile(max_size=DIRECT_UPLOAD_MAX)  # noqa: SIM115
    try:
        hashing = _HashingWriter(out)
        packed: list[str] = []
        with tarfile.open(fileobj=hashing, mode="w|gz", format=tarfile.PAX_FORMAT) as tar:  # type: ignore[call-overload]
            for rel, full in walk_directory(directory, include_git=include_git):
                st = os.lstat(full)
                info = tarfile.TarInfo(rel)
                info.mode = stat.S_IMODE(st.st_mode)
                info.mtime = int(st.st_mtime)
                info.uid = info.gid = 0
                info.uname = info.gname = ""
                if stat.S_ISDIR(st.st_mode):
                    info.type = tarfile.DIRTYPE
                    tar.addfile(info)
                elif stat.S_ISLNK(st.st_mode):
                    info.type = tarfile.SYMTYPE
                    info.linkname = os.readlink(full)
                    tar.addfile(info)
                else:
                    with open(full, "rb") as f:
                        info.type = tarfile.REGTYPE
                        info.size = os.fstat(f.fileno()).st_size
                        tar.addfile(info, f)
                packed.append(rel)
        out.flush()
        out.seek(0)
        return PackedArchive(out, hashing.size, hashing.sha256.hexdigest(), packed)
    except BaseException:
        out.close()
        raise


def archive_source_size(source: Any) -> int:
    """The size of an archive given as bytes, a path or a seekable binary
    file (from its current position)."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        return len(source)
    if isinstance(source, (str, os.PathLike)):
        return os.path.getsize(source)
    pos = source.tell()
    end = source.seek(0, os.SEEK_END)
    source.seek(pos)
    return int(end - pos)
