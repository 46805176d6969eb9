"""An output formatter written in Python: a pandas DataFrame becomes a
Markdown table; every other output keeps its best plain representation.

Built with componentize-py into a WASM component for the
`crownest:plugin/output-formatter@0.1.0` world (see README.md).
"""

import json

import wit_world
from componentize_py_types import Err
from wit_world.imports import host
from wit_world.imports.types import (
    Format,
    FormatLimits,
    MimeData_Bytes,
    MimeData_Text,
    Output,
    RichOutput,
)

DATAFRAME_MIME = "application/vnd.crownest.dataframe+json"

# Representations taken as they are, best first, with their format.
PASSTHROUGH = [
    ("image/png", Format.PNG),
    ("image/jpeg", Format.JPEG),
    ("image/svg+xml", Format.SVG),
    ("text/html", Format.HTML),
    ("text/markdown", Format.MARKDOWN),
    ("text/latex", Format.LATEX),
    ("application/json", Format.JSON),
    ("text/plain", Format.TEXT),
]


def cell(value) -> str:
    """One table cell: Markdown's pipes and line breaks escaped."""
    if value is None:
        return ""
    text = value if isinstance(value, str) else json.dumps(value)
    return text.replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ")


def markdown_table(frame: dict) -> str:
    columns = [cell(c) for c in frame.get("columns", [])]
    rows = frame.get("rows", [])
    index = frame.get("index", [])
    lines = [
        "| " + " | ".join([""] + columns) + " |",
        "|" + "---|" * (len(columns) + 1),
    ]
    for i, row in enumerate(rows):
        label = cell(index[i]) if i < len(index) else str(i)
        cells = [cell(v) for v in row][: len(columns)]
        cells += [""] * (len(columns) - len(cells))
        lines.append("| " + " | ".join([label] + cells) + " |")
    total = frame.get("totalRows", len(rows))
    if frame.get("truncated") or total > len(rows):
        lines.append("")
        lines.append(f"({len(rows)} of {total} rows)")
    return "\n".join(lines) + "\n"


def cut(text: str, limit: int) -> tuple[str, bool]:
    """`text` cut to `limit` bytes of UTF-8, on a character boundary."""
    data = text.encode("utf-8")
    if len(data) <= limit:
        return text, False
    return data[:limit].decode("utf-8", errors="ignore"), True


def text_output(output: RichOutput, fmt: Format, mime: str, text: str, limits: FormatLimits) -> Output:
    text, truncated = cut(text, limits.max_text_bytes)
    return Output(
        kind=output.kind,
        format=fmt,
        mime=mime,
        text=text,
        bytes=None,
        size=len(text.encode("utf-8")),
        truncated=truncated,
        execution_count=output.execution_count,
    )


class WitWorld(wit_world.WitWorld):
    def format(self, output: RichOutput, limits: FormatLimits) -> Output:
        items = {item.mime: item.data for item in output.bundle}
        frame = items.get(DATAFRAME_MIME)
        if isinstance(frame, MimeData_Text):
            try:
                table = markdown_table(json.loads(frame.value))
            except (ValueError, TypeError, AttributeError) as e:
                host.log(host.LogLevel.WARN, f"not a DataFrame description: {e}")
            else:
                return text_output(output, Format.MARKDOWN, "text/markdown", table, limits)
        for mime, fmt in PASSTHROUGH:
            data = items.get(mime)
            if isinstance(data, MimeData_Bytes) and fmt in (Format.PNG, Format.JPEG):
                return Output(
                    kind=output.kind,
                    format=fmt,
                    mime=mime,
                    text=None,
                    bytes=data.value,
                    size=len(data.value),
                    truncated=False,
                    execution_count=output.execution_count,
                )
            if isinstance(data, MimeData_Text) and fmt not in (Format.PNG, Format.JPEG):
                if fmt == Format.JSON:
                    try:
                        json.loads(data.value)
                    except ValueError:
                        continue
                return text_output(output, fmt, mime, data.value, limits)
        raise Err("no representation this formatter knows")
