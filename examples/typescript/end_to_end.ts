// The end-to-end flow of the CrowNest landing page (create, run with
// streamed stdout and collected artifacts, kill), with the program it runs
// written into the sandbox first.
//
// Run it against a local server:
//   (cd sdk/typescript && npm ci && npm run build && npm run build:test)
//   export CROWNEST_API_KEY=cn_live_...            # crownest keys create --org demo --scopes all
//   export CROWNEST_BASE_URL=http://127.0.0.1:7420 # the default
//   node sdk/typescript/build-test/examples/typescript/end_to_end.js
// (In your own project: `npm install @crownest/sdk` and run it with any
// TypeScript runner.)
import { createCrowNestClient } from "@crownest/sdk";

const MAIN_PY = `
import time
rows = []
for n in range(1, 4):
    print(f"step {n}/3", flush=True)
    rows.append(f"<li>{n} squared is {n * n}</li>")
    time.sleep(0.3)
with open("/workspace/report.html", "w") as f:
    f.write("<ul>" + "".join(rows) + "</ul>\\n")
print("wrote report.html", flush=True)
`;

const client = createCrowNestClient(); // reads CROWNEST_API_KEY
const sandbox = await client.sandboxes.create({ template: "python" });
await sandbox.files.write("main.py", MAIN_PY);

const result = await sandbox.commands.run("python3 main.py", {
  collect: [{ path: "/workspace/report.html", name: "report.html" }],
  onStdout: (chunk) => process.stdout.write(chunk),
});
console.log(result.exitCode);

const report = result.artifacts?.find((a) => a.name === "report.html");
if (report?.artifactId) {
  const html = new TextDecoder().decode(await client.artifacts.download(report.artifactId));
  console.log(`report.html (${report.artifactId}): ${html.trim()}`);
} else {
  console.log(`report.html was not collected: ${report?.error}`);
}
await sandbox.kill();
