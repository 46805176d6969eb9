#!/usr/bin/env bash
# `npm run test:pack`: what `npm install @crownest/sdk` gets works.
#
# Packs a clean copy of this directory (no dist/: `prepack` must build it),
# checks the tarball's files (ESM and CommonJS builds, types for each,
# source maps whose sources are in the tarball), installs it into a scratch
# project, and there:
#   - type-checks consumers with the packed types: an ES module (.mts,
#     `await using`), a CommonJS one (.cts), and one with only @types/node
#     (no DOM lib), without skipLibCheck;
#   - under each Node major it can run (this one, and node@18 / node@22
#     through npx when the registry has them), runs `import` and `require`
#     of the package against a tiny local HTTP server: a create (its
#     Idempotency-Key from node:crypto), a streamed upload, an SSE stream,
#     and `await using` compiled by tsc.
# Set CROWNEST_PACK_NODES="20 22" to choose the majors (default: the
# installed one, 18 and 22).
set -euo pipefail
SDK=$(cd "$(dirname "$0")/.." && pwd)
TSC="$SDK/node_modules/.bin/tsc"
[ -x "$TSC" ] || { echo "test-pack: run npm ci in $SDK first" >&2; exit 1; }
work=$(mktemp -d "${TMPDIR:-/tmp}/crownest-pack-XXXXXX")
trap 'rm -rf "$work"' EXIT
fail() { echo "test-pack: FAIL: $*" >&2; exit 1; }

# ---------------------------------------------------------------- pack a clean copy
clean="$work/clean"
mkdir "$clean"
(cd "$SDK" && tar --exclude=./dist --exclude=./build-test --exclude=./node_modules --exclude='./*.tgz' -cf - .) | tar -xf - -C "$clean"
ln -s "$SDK/node_modules" "$clean/node_modules"
[ ! -e "$clean/dist" ] || fail "the clean copy has a dist/"
(cd "$clean" && npm pack --silent --pack-destination "$work" >/dev/null)
tarball=$(ls "$work"/crownest-sdk-*.tgz)
echo "test-pack: packed $(basename "$tarball") from a checkout without dist/" >&2

listing=$(tar -tzf "$tarball" | sed 's|^package/||' | sort)
for f in package.json README.md LICENSE dist/esm/index.js dist/esm/index.d.ts dist/cjs/index.js dist/cjs/index.d.ts \
    dist/cjs/package.json dist/esm/generated/openapi.d.ts src/index.ts src/generated/openapi.ts; do
    grep -qx "$f" <<<"$listing" || fail "the tarball has no $f"
done
! grep -q '^build-test/\|^test/\|^node_modules/\|^scripts/' <<<"$listing" || fail "the tarball ships test or build files"
mkdir "$work/unpacked"
tar -xzf "$tarball" -C "$work/unpacked"
# Every source map's sources are in the tarball.
node -e '
  const fs = require("fs"), path = require("path");
  const root = process.argv[1];
  let maps = 0;
  const walk = (d) => { for (const e of fs.readdirSync(d, { withFileTypes: true })) {
    const p = path.join(d, e.name);
    if (e.isDirectory()) walk(p);
    else if (p.endsWith(".map")) {
      maps++;
      const map = JSON.parse(fs.readFileSync(p, "utf8"));
      for (const s of map.sources) {
        const src = path.resolve(path.dirname(p), map.sourceRoot || "", s);
        if (!fs.existsSync(src)) { console.error(`test-pack: FAIL: ${path.relative(root, p)} points to missing ${s}`); process.exit(1); }
      }
    }
  } };
  walk(path.join(root, "dist"));
  if (maps === 0) { console.error("test-pack: FAIL: no source maps"); process.exit(1); }
  console.error(`test-pack: ${maps} source maps resolve inside the tarball`);
' "$work/unpacked/package"
[ "$(cat "$work/unpacked/package/dist/cjs/package.json")" = '{"type":"commonjs"}' ] || fail "dist/cjs/package.json is not {\"type\":\"commonjs\"}"

# ---------------------------------------------------------------- a scratch project
app="$work/app"
mkdir "$app"
cd "$app"
echo '{ "name": "crownest-pack-consumer", "private": true, "version": "1.0.0" }' > package.json
npm install --silent --offline --no-audit --no-fund "$tarball" >/dev/null
[ -f node_modules/@crownest/sdk/dist/esm/index.js ] || fail "the tarball did not install"

cat > smoke-lib.cjs <<'EOF'
// Exercises the installed SDK against a tiny HTTP server; `sdk` is the
// module as `import` or `require` loaded it.
const assert = require("node:assert/strict");
const http = require("node:http");

const SANDBOX = {
  id: "sbx_pack", status: "running", template: "python", createdAt: "2026-01-01T00:00:00Z",
  expiresAt: "2026-01-01T00:10:00Z", metadata: {}, vcpus: 1, memoryMiB: 512, runtime: "oci",
  network: { mode: "none", allow: [], deny: [], bytesIn: 0, bytesOut: 0 },
};

module.exports = async function smoke(sdk, label, disposeWithAwaitUsing) {
  const seen = [];
  const server = http.createServer((req, res) => {
    const chunks = [];
    req.on("data", (c) => chunks.push(c));
    req.on("end", () => {
      const body = Buffer.concat(chunks);
      seen.push({ method: req.method, path: req.url.split("?")[0], key: req.headers["idempotency-key"], bytes: body.length });
      const json = (status, value) => { res.writeHead(status, { "content-type": "application/json" }); res.end(JSON.stringify(value)); };
      const { port } = server.address();
      if (req.method === "POST" && req.url === "/v1/sandboxes") return json(201, SANDBOX);
      if (req.method === "DELETE") return json(200, { ...SANDBOX, status: "destroyed" });
      if (req.url.startsWith("/v1/sandboxes/sbx_pack/metrics")) {
        res.writeHead(200, { "content-type": "text/event-stream" });
        res.write(`event: metrics\ndata: ${JSON.stringify({ sandboxId: "sbx_pack", cpuUsageSeconds: 1.5 })}\n\n`);
        return res.end('event: end\ndata: {"status":"destroyed"}\n\n');
      }
      if (req.url === "/v1/sandboxes/sbx_pack/files/uploads") {
        return json(201, { url: `http://127.0.0.1:${port}/v1/transfers/t1`, method: "PUT", expiresAt: "2026-01-01T00:05:00Z" });
      }
      if (req.url === "/v1/transfers/t1") return json(200, { name: "s.bin", path: "/workspace/s.bin", type: "file", size: body.length, mode: 420, mtime: "" });
      json(404, { error: { code: "not_found", message: req.url, details: {} } });
    });
  });
  await new Promise((r) => server.listen(0, "127.0.0.1", r));
  try {
    const client = sdk.createCrowNestClient({ apiKey: "cn_live_pack", baseUrl: `http://127.0.0.1:${server.address().port}` });
    assert.equal(typeof Symbol.asyncDispose, "symbol");
    let id;
    if (disposeWithAwaitUsing) id = await disposeWithAwaitUsing(client);
    else {
      const sandbox = await client.sandboxes.create({ template: "python" });
      id = sandbox.id;
      await sandbox[Symbol.asyncDispose]();
    }
    assert.equal(id, "sbx_pack");
    assert.match(seen[0].key, /^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$/);
    assert.deepEqual(seen.map((s) => s.method), ["POST", "DELETE"], "disposal killed the sandbox");
    const sandbox = await client.sandboxes.kill("sbx_pack");
    const metrics = [];
    for await (const m of sandbox.metricsStream()) metrics.push(m.cpuUsageSeconds);
    assert.deepEqual(metrics, [1.5]);
    async function* chunks() { for (let i = 0; i < 4; i++) yield new Uint8Array(1000).fill(i); }
    const written = await sandbox.files.write("s.bin", chunks());
    assert.equal(written.size, 4000, "the streamed body arrived whole");
    let failed;
    await client.sandboxes.get("sbx_nope").catch((e) => (failed = e));
    assert.ok(failed instanceof sdk.CrowNestApiError && failed.code === "not_found");
    console.log(`${label} ok on node ${process.version}`);
  } finally {
    server.close();
  }
};
EOF
cat > esm.mjs <<'EOF'
import * as sdk from "@crownest/sdk";
import { createRequire } from "node:module";
const smoke = createRequire(import.meta.url)("./smoke-lib.cjs");
if ("default" in sdk || "__esModule" in sdk) throw new Error("import loaded the CommonJS build");
await smoke(sdk, "import (ESM)");
EOF
cat > cjs.cjs <<'EOF'
const sdk = require("@crownest/sdk");
if (!sdk.__esModule) throw new Error("require did not load the CommonJS build");
if (!require.resolve("@crownest/sdk").includes("/dist/cjs/")) throw new Error(`require resolved ${require.resolve("@crownest/sdk")}`);
require("./smoke-lib.cjs")(sdk, "require (CJS)").catch((e) => { console.error(e); process.exit(1); });
EOF

# ---------------------------------------------------------------- type-check consumers with the packed types
mkdir -p ts
cat > ts/consumer.mts <<'EOF'
import { createCrowNestClient, CrowNestApiError, type CommandResult, type CrowNestClient, type SandboxStatus } from "@crownest/sdk";

const client: CrowNestClient = createCrowNestClient({ apiKey: "cn_live_x", timeoutMs: 30_000 });

export async function run(): Promise<SandboxStatus> {
  await using sandbox = await client.sandboxes.create({ template: "python", ttlMs: 60_000, metadata: { job: "demo" } });
  const result: CommandResult = await sandbox.commands.run("true", { requestTimeoutMs: 5_000 });
  const exit: number | null | undefined = result.exitCode;
  // @ts-expect-error: "nope" is not an ArtifactPolicy
  await sandbox.code.run({ code: "1", artifactPolicy: "nope" });
  for await (const s of client.sandboxes.list({ status: "running", metadata: { job: "demo" }, createdAfter: new Date() })) void s.id;
  const stream: ReadableStream<Uint8Array> = await sandbox.files.readStream("big.bin");
  await stream.cancel();
  const watch = await sandbox.files.watch("/workspace", (e) => void e.type, { recursive: true });
  await watch.stop();
  void exit;
  return sandbox.status;
}

/** What the compiled consumer runs: `await using` disposes of the sandbox. */
export async function disposeWithAwaitUsing(c: CrowNestClient): Promise<string> {
  await using sandbox = await c.sandboxes.create({ template: "python" });
  return sandbox.id;
}

export const isApiError = (e: unknown): boolean => e instanceof CrowNestApiError;
EOF
cat > ts/consumer.cts <<'EOF'
import { createCrowNestClient, type Sandbox } from "@crownest/sdk";
import sdk = require("@crownest/sdk");

export async function make(): Promise<Sandbox> {
  const client = createCrowNestClient({ apiKey: "cn_live_x" });
  const sandbox = await client.sandboxes.create({ template: "python" });
  await sandbox.setTimeout(120_000);
  return sdk.createCrowNestClient({ apiKey: "y" }).sandboxes.kill(sandbox.id);
}
EOF
cat > ts/tsconfig.json <<'EOF'
{
  "compilerOptions": {
    "strict": true,
    "target": "ES2022",
    "module": "NodeNext",
    "moduleResolution": "NodeNext",
    "lib": ["ES2022", "ESNext.Disposable", "DOM"],
    "types": [],
    "skipLibCheck": false,
    "outDir": "../out"
  },
  "files": ["consumer.mts", "consumer.cts"]
}
EOF
explained=$("$TSC" -p ts/tsconfig.json --explainFiles) || { echo "$explained" >&2; fail "tsc rejected the consumers"; }
grep -q "node_modules/@crownest/sdk/dist/esm/index.d.ts" <<<"$explained" || fail "consumer.mts did not get the ESM types"
grep -q "node_modules/@crownest/sdk/dist/cjs/index.d.ts" <<<"$explained" || fail "consumer.cts did not get the CommonJS types"
echo "test-pack: tsc type-checks an ESM and a CommonJS consumer against the packed types (ESM and CJS .d.ts)" >&2

# A Node project with @types/node and neither the DOM lib nor esnext.disposable.
mkdir -p nodeonly
cat > nodeonly/consumer.mts <<'EOF'
import { createCrowNestClient } from "@crownest/sdk";
const sandbox = await createCrowNestClient({ apiKey: "x" }).sandboxes.create({ template: "python" });
const stream = await sandbox.files.readStream("a.txt");
await stream.cancel();
await sandbox[Symbol.asyncDispose]();
EOF
cat > nodeonly/tsconfig.json <<EOF
{
  "compilerOptions": {
    "strict": true, "target": "ES2022", "module": "NodeNext", "moduleResolution": "NodeNext",
    "lib": ["ES2022"], "types": ["node"], "typeRoots": ["$SDK/node_modules/@types"], "skipLibCheck": false, "noEmit": true
  },
  "files": ["consumer.mts"]
}
EOF
"$TSC" -p nodeonly/tsconfig.json || fail "tsc rejected a consumer with @types/node only"
echo "test-pack: tsc type-checks a consumer with @types/node and no DOM lib" >&2

# ---------------------------------------------------------------- run under each Node major
cat > run-compiled.mjs <<'EOF'
import * as sdk from "@crownest/sdk";
import { createRequire } from "node:module";
import { disposeWithAwaitUsing } from "./out/consumer.mjs";
await createRequire(import.meta.url)("./smoke-lib.cjs")(sdk, "await using (tsc output)", disposeWithAwaitUsing);
EOF
majors=${CROWNEST_PACK_NODES:-"$(node -p 'process.versions.node.split(".")[0]') 18 22"}
ran=()
skipped=()
for major in $(tr ' ' '\n' <<<"$majors" | awk '!seen[$0]++'); do
    if [ "$(node -p 'process.versions.node.split(".")[0]')" = "$major" ]; then
        nodecmd=(node)
    elif npx -y "node@$major" --version >/dev/null 2>&1; then
        nodecmd=(npx -y "node@$major")
    else
        skipped+=("$major")
        continue
    fi
    "${nodecmd[@]}" esm.mjs || fail "import failed on node $major"
    "${nodecmd[@]}" cjs.cjs || fail "require failed on node $major"
    "${nodecmd[@]}" run-compiled.mjs || fail "the compiled consumer failed on node $major"
    ran+=("$major")
done
[ "${#ran[@]}" -gt 0 ] || fail "no Node ran"
echo "test-pack: ok on node ${ran[*]}" >&2
if [ "${#skipped[@]}" -gt 0 ]; then
    echo "test-pack: WARNING: node ${skipped[*]} could not be had (npx -y node@N failed): not tested there" >&2
fi
