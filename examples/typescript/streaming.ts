// The code-interpreter page's snippet: run model-written Python in a
// sandbox and stream its stdout back as it is printed.
//
// Run it against a local server:
//   (cd sdk/typescript && npm ci && npm run build && npm run build:test)
//   export CROWNEST_API_KEY=cn_live_...            # crownest keys create --org demo --scopes all
//   export CROWNEST_BASE_URL=http://127.0.0.1:7420 # the default
//   node sdk/typescript/build-test/examples/typescript/streaming.js
import { createCrowNestClient } from "@crownest/sdk";
const client = createCrowNestClient();
const sandbox = await client.sandboxes.create({ template: "python" });
// run model output and stream stdout + results back
const result = await sandbox.code.run({
  language: "python",
  code: "import pandas as pd; print(pd.__version__)",
  onStdout: (chunk) => process.stdout.write(chunk),
});
console.log(result.error ?? "ok");
await sandbox.kill();
