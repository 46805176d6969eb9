// Streaming output from a sandbox with Commands: a recorded process with an
// exit code and a log you can follow (and resume) by event id. For
// notebook-style snippets streamed from an interpreter, see streaming.ts
// (`sandbox.code.run`).
//
// Run it against a local server:
//   (cd sdk/typescript && npm ci && npm run build && npm run build:test)
//   export CROWNEST_API_KEY=cn_live_...            # crownest keys create --org demo --scopes all
//   export CROWNEST_BASE_URL=http://127.0.0.1:7420 # the default
//   node sdk/typescript/build-test/examples/typescript/streaming_commands.js
import { createCrowNestClient } from "@crownest/sdk";

const client = createCrowNestClient();
const sandbox = await client.sandboxes.create({ template: "python" });
try {
  // 1. run model output and stream stdout + stderr back through callbacks
  //    (-u: unbuffered, so each line streams as soon as it is printed)
  const code = "import pandas as pd, sys; print(pd.__version__); print('warning: demo', file=sys.stderr)";
  await sandbox.files.write("snippet.py", code);
  const result = await sandbox.commands.run("python3 -u snippet.py", {
    onStdout: (chunk) => process.stdout.write(chunk),
    onStderr: (chunk) => process.stderr.write(chunk),
  });
  console.log(result.exitCode === 0 ? "ok" : `failed: ${result.stderr}`);

  // 2. or start a long process and follow its log as events
  const ticker = await sandbox.commands.start("for i in 1 2 3; do echo tick $i; sleep 0.2; done");
  for await (const event of ticker.logs()) {
    if (event.type === "exit") console.log(`exit ${event.exit?.exitCode} after event ${event.id}`);
    else process.stdout.write(`#${event.id} ${event.type}: ${event.data}`);
  }
} finally {
  await sandbox.kill();
}
