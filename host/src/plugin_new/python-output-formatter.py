"""A CrowNest output formatter in Python: one rich output (a MIME bundle)
-> one normalised output. This one keeps the `text/plain` representation,
with the template's `formatter_config` string before it."""

import wit_world
from componentize_py_types import Err
from wit_world.imports.types import Format, MimeData_Text, Output

import helpers


class WitWorld(wit_world.WitWorld):
    def format(self, output, limits, config: str) -> Output:
        for item in output.bundle:
            if item.mime == "text/plain" and isinstance(item.data, MimeData_Text):
                text, truncated = helpers.cut(config + item.data.value, limits.max_text_bytes)
                return Output(
                    kind=output.kind,
                    format=Format.TEXT,
                    mime="text/plain",
                    text=text,
                    bytes=None,
                    size=len(text.encode("utf-8")),
                    truncated=truncated,
                    execution_count=output.execution_count,
                )
        raise Err("no text/plain representation")
