"""Logic of the plugin that needs no bindings, so plain Python tests it:
python3 -m unittest"""


def cut(text: str, limit: int) -> tuple[str, bool]:
    """`text` cut to at most `limit` bytes of UTF-8 on a character boundary,
    and whether it was cut."""
    data = text.encode("utf-8")
    if len(data) <= limit:
        return text, False
    return data[:limit].decode("utf-8", errors="ignore"), True


def strip_ansi(line: str) -> str:
    """A traceback line without terminal colour codes."""
    out, i = [], 0
    while i < len(line):
        if line[i] == "\x1b":
            i += 1
            while i < len(line) and not line[i].isalpha():
                i += 1
            i += 1
            continue
        out.append(line[i])
        i += 1
    return "".join(out)


def decide(size: int, unknown: bool, promote_allowed: bool, max_inline: int, max_artifact: int) -> str:
    """`inline`, `promote`, or the reason to reject."""
    if size > max_artifact:
        return "output-too-large"
    if unknown:
        return "unsupported-format"
    if size <= max_inline:
        return "inline"
    return "promote" if promote_allowed else "requires-artifact-promotion"
