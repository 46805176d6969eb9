// A CrowNest result adapter in JavaScript: a run's raw interpreter events
// -> stdout and stderr chunks, rich outputs and the error.

/** A traceback line without terminal colour codes. */
export function stripAnsi(line) {
  return line.replace(/\x1b\[[0-9;]*[A-Za-z]/g, "");
}

export function adapt(events, config) {
  const adapted = { stdout: [], stderr: [], outputs: [], error: undefined, executionCount: undefined };
  for (const event of events) {
    switch (event.tag) {
      case "stream":
        (event.val.name === "stdout" ? adapted.stdout : adapted.stderr).push(event.val.text);
        break;
      case "display-data":
      case "execute-result":
        if (event.tag === "execute-result") adapted.executionCount = event.val.executionCount;
        adapted.outputs.push({
          kind: event.tag,
          bundle: event.val.bundle,
          executionCount: event.val.executionCount,
        });
        break;
      case "error":
        adapted.error = {
          name: event.val.ename,
          message: event.val.evalue,
          traceback: event.val.traceback.map(stripAnsi),
        };
        break;
    }
  }
  return adapted;
}
