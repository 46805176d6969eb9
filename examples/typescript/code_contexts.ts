// The Code Contexts snippet of the Code concept page: a Code Context keeps
// interpreter state (here `value`) alive across Code Runs.
//
// Run it against a local server:
//   (cd sdk/typescript && npm ci && npm run build && npm run build:test)
//   export CROWNEST_API_KEY=cn_live_...            # crownest keys create --org demo --scopes all
//   export CROWNEST_BASE_URL=http://127.0.0.1:7420 # the default
//   node sdk/typescript/build-test/examples/typescript/code_contexts.js
import { createCrowNestClient } from "@crownest/sdk";

const client = createCrowNestClient();
const sandbox = await client.sandboxes.create({ template: "python" });
try {
  const context = await sandbox.code.createContext({ language: "python" });
  await sandbox.code.run({ contextId: context.id, code: "value = 42" });
  const result = await sandbox.code.run({ contextId: context.id, code: "print(value)" });
  process.stdout.write(result.stdout.join(""));
  console.log(`context ${context.id}, execution ${result.executionCount}`);
} finally {
  await sandbox.kill();
}
