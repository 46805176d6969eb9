"""A CrowNest result adapter in Python: a run's raw interpreter events ->
stdout and stderr chunks, rich outputs and the error."""

import wit_world
from wit_world.imports.types import (
    Adapted,
    OutputKind,
    RawEvent_DisplayData,
    RawEvent_Error,
    RawEvent_ExecuteResult,
    RawEvent_Stream,
    RichOutput,
    RunError,
    StreamName,
)

import helpers


class WitWorld(wit_world.WitWorld):
    def adapt(self, events, config: str) -> Adapted:
        adapted = Adapted(stdout=[], stderr=[], outputs=[], error=None, execution_count=None)
        for event in events:
            if isinstance(event, RawEvent_Stream):
                target = adapted.stdout if event.value.name == StreamName.STDOUT else adapted.stderr
                target.append(event.value.text)
            elif isinstance(event, (RawEvent_DisplayData, RawEvent_ExecuteResult)):
                kind = OutputKind.EXECUTE_RESULT if isinstance(event, RawEvent_ExecuteResult) else OutputKind.DISPLAY_DATA
                if kind == OutputKind.EXECUTE_RESULT:
                    adapted.execution_count = event.value.execution_count
                adapted.outputs.append(
                    RichOutput(kind=kind, bundle=event.value.bundle, execution_count=event.value.execution_count)
                )
            elif isinstance(event, RawEvent_Error):
                adapted.error = RunError(
                    name=event.value.ename,
                    message=event.value.evalue,
                    traceback=[helpers.strip_ansi(line) for line in event.value.traceback],
                )
        return adapted
