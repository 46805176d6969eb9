// @crownest/sdk against a live crownest server (started for this file).
import assert from "node:assert/strict";
import { execFile } from "node:child_process";
import { createHash, createPublicKey, randomBytes, randomUUID, verify } from "node:crypto";
import { mkdirSync, mkdtempSync, readFileSync, rmSync, symlinkSync, writeFileSync } from "node:fs";
import http from "node:http";
import net from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, describe, test } from "node:test";
import { promisify } from "node:util";

import {
  Command,
  CrowNestApiError,
  CrowNestConnectionError,
  CrowNestTimeoutError,
  createCrowNestClient,
  isIgnored,
  packDirectory,
  parseGitignore,
  type CodeLanguage,
  type CodeOutput,
  type CrowNestClient,
  type LogEvent,
  type Sandbox,
  type WorkspaceRun,
  type WorkspaceRunEvent,
} from "@crownest/sdk";
import { REPO, startServer, type TestServer } from "./server.js";

let server: TestServer;
let apiKey: string;
let client: CrowNestClient;
const live: Sandbox[] = [];

async function newSandbox(options: Record<string, unknown> = {}): Promise<Sandbox> {
  const sandbox = await client.sandboxes.create({ template: "python", ...options });
  live.push(sandbox);
  return sandbox;
}

async function rejectsWith(promise: Promise<unknown>, status: number, code: string): Promise<CrowNestApiError> {
  try {
    await promise;
  } catch (error) {
    assert.ok(error instanceof CrowNestApiError, `expected CrowNestApiError, got ${String(error)}`);
    assert.equal(error.status, status, error.message);
    assert.equal(error.code, code, error.message);
    return error;
  }
  assert.fail(`expected ${status} ${code}`);
}

before(async () => {
  server = await startServer();
  apiKey = server.mintKey("sdk-ts-tests");
  client = createCrowNestClient({ apiKey, baseUrl: server.baseUrl });
});

after(async () => {
  for (const s of live) await s.kill().catch(() => undefined);
  await server?.stop();
});

describe("network policy", () => {
  test("a sandbox narrows its template's policy and is refused anything wider", async () => {
    // The python template's policy is "none": narrowing to none is all a
    // sandbox of it may do.
    const sandbox = await newSandbox({ network: { mode: "none" } });
    assert.deepEqual(sandbox.network, { mode: "none", allow: [], deny: [], bytesIn: 0, bytesOut: 0 });
    await rejectsWith(sandbox.setNetwork({ allow: ["pypi.org"] }), 400, "network_policy_too_wide");
    assert.equal((await sandbox.setNetwork({ mode: "none" })).network?.mode, "none");
    await rejectsWith(newSandbox({ network: { mode: "open" } }), 400, "network_policy_too_wide");
  });
});

describe("sandbox env", () => {
  test("reaches every command and is never returned", async () => {
    const sandbox = await newSandbox({ env: { SDK_SECRET: "ts-secret-value", GREETING: "hi" } });
    const fields = Object.fromEntries(Object.entries(sandbox).filter(([, v]) => typeof v !== "object" || v === null));
    assert.ok(!JSON.stringify(fields).includes("ts-secret-value"));
    assert.equal((sandbox as unknown as Record<string, unknown>).env, undefined);
    const run = await sandbox.commands.run('test "$SDK_SECRET" = ts-secret-value && echo "$GREETING"');
    assert.equal(run.stdout, "hi\n");
  });
});

describe("the landing page's end-to-end snippet", () => {
  test("streams stdout through onStdout before the result, and collects report.html", async () => {
    const sandbox = await client.sandboxes.create({ template: "python" });
    live.push(sandbox);
    await sandbox.files.write(
      "main.py",
      [
        "import time",
        "print('working', flush=True)",
        "time.sleep(1.5)",
        "open('/workspace/report.html', 'w').write('<h1>report</h1>\\n')",
        "print('done', flush=True)",
      ].join("\n"),
    );
    const chunks: { chunk: string; at: number }[] = [];
    const result = await sandbox.commands.run("python3 main.py", {
      collect: [{ path: "/workspace/report.html", name: "report.html" }],
      onStdout: (chunk) => chunks.push({ chunk, at: Date.now() }),
    });
    const returnedAt = Date.now();
    assert.equal(result.exitCode, 0);
    assert.equal(chunks.map((c) => c.chunk).join(""), "working\ndone\n");
    assert.ok(returnedAt - chunks[0]!.at > 1000, "the first chunk arrived while the command still ran");
    assert.equal(result.stdout, "working\ndone\n");
    const [report] = result.artifacts ?? [];
    assert.ok(report, "result.artifacts has the collected file");
    assert.equal(report.name, "report.html");
    assert.ok(report.artifactId, `collected: ${report.error}`);
    const html = new TextDecoder().decode(await client.artifacts.download(report.artifactId!));
    assert.equal(html, "<h1>report</h1>\n");
    await sandbox.kill();
    assert.equal(sandbox.status, "destroyed");
  });

  test("collect reports a missing path in artifacts, not as a failed command", async () => {
    const sandbox = await newSandbox();
    const result = await sandbox.commands.run("true", { collect: [{ path: "nope.txt" }] });
    assert.equal(result.status, "completed");
    const [missing] = result.artifacts!;
    assert.equal(missing!.artifactId ?? null, null);
    assert.ok(missing!.error);
  });
});

describe("examples/typescript", () => {
  const run = promisify(execFile);
  const env = () => ({ ...process.env, CROWNEST_API_KEY: apiKey, CROWNEST_BASE_URL: server.baseUrl });
  const built = (name: string) => join(REPO, "sdk", "typescript", "build-test", "examples", "typescript", name);

  test("end_to_end.ts", async () => {
    const { stdout } = await run("node", [built("end_to_end.js")], { env: env() });
    assert.match(stdout, /^step 1\/3\nstep 2\/3\nstep 3\/3\nwrote report.html\n0\nreport.html \(art_\w+\): <ul><li>1 squared is 1<\/li>/);
  });

  test("streaming.ts (the code-interpreter snippet)", async () => {
    const { stdout, stderr } = await run("node", [built("streaming.js")], { env: env() });
    assert.equal(stderr, "");
    assert.match(stdout, /^\d+\.\d+\.\d+\nok\n$/);
  });

  test("code_contexts.ts", async () => {
    const { stdout } = await run("node", [built("code_contexts.js")], { env: env() });
    assert.match(stdout, /^42\ncontext cctx_\w+, execution \d+\n$/);
  });

  test("streaming_commands.ts", async () => {
    const { stdout, stderr } = await run("node", [built("streaming_commands.js")], { env: env() });
    assert.equal(stderr, "warning: demo\n");
    assert.match(stdout, /^\d+\.\d+\.\d+\nok\n#1 stdout: tick 1\n#2 stdout: tick 2\n#3 stdout: tick 3\nexit 0 after event 4\n$/);
  });
});

describe("sandboxes", () => {
  test("create, fields, get, list (every page), refresh, kill", async () => {
    const sandbox = await newSandbox({ ttlMs: 300_000, metadata: { job: "ts" } });
    assert.match(sandbox.id, /^sbx_/);
    assert.equal(sandbox.status, "running");
    assert.deepEqual(sandbox.metadata, { job: "ts" });
    assert.equal(JSON.parse(JSON.stringify(sandbox)).expiresAt, sandbox.expiresAt);
    assert.equal(Object.keys(sandbox.toJSON()).includes("commands"), false);
    const other = await newSandbox();
    assert.equal((await client.sandboxes.get(sandbox.id)).expiresAt, sandbox.expiresAt);
    const pages: Sandbox[][] = [];
    for await (const page of client.sandboxes.list({ limit: 1 }).pages()) pages.push(page);
    assert.ok(pages.length >= 2 && pages.every((p) => p.length <= 1));
    const ids = (await client.sandboxes.list({ limit: 1 }).toArray()).map((s) => s.id);
    assert.ok(ids.includes(sandbox.id) && ids.includes(other.id));
    assert.equal((await sandbox.refresh()).status, "running");
    await sandbox.kill();
    assert.equal(sandbox.endReason, "killed");
    assert.equal((await client.sandboxes.get(sandbox.id)).status, "destroyed");
  });

  test("templates and health", async () => {
    assert.ok((await client.templates.list()).some((t) => t.name === "python"));
    assert.equal((await client.health()).status, "ok");
  });
});

describe("commands", () => {
  test("run: the record, non-zero exit, cwd, env, timeout", async () => {
    const sandbox = await newSandbox();
    const ok = await sandbox.commands.run("python -c 'print(40 + 2)'");
    assert.deepEqual([ok.exitCode, ok.stdout, ok.status], [0, "42\n", "completed"]);
    const bad = await sandbox.commands.run("echo out; echo err >&2; exit 3");
    assert.deepEqual([bad.exitCode, bad.status, bad.stdout, bad.stderr], [3, "completed", "out\n", "err\n"]);
    await sandbox.files.mkdir("sub");
    const env = await sandbox.commands.run("pwd; echo $GREETING", { cwd: "sub", env: { GREETING: "hi" } });
    assert.equal(env.stdout, "/workspace/sub\nhi\n");
    assert.equal((await sandbox.commands.run("sleep 10", { timeoutMs: 300 })).status, "timed_out");
  });

  test("onStderr, start, logs (and resume), stdin, signal, cancel, get, list", async () => {
    const sandbox = await newSandbox();
    const errs: string[] = [];
    const r = await sandbox.commands.run("echo a; echo b >&2", { onStderr: (c) => errs.push(c) });
    assert.deepEqual([r.stdout, errs.join("")], ["a\n", "b\n"]);

    const cat = await sandbox.commands.start("cat; echo done", { stdin: true });
    assert.ok(cat instanceof Command);
    assert.equal(cat.status, "running");
    await cat.sendStdin("hello\n");
    await cat.sendStdin(new TextEncoder().encode("bytes\n"), { close: true });
    const done = await cat.wait();
    assert.deepEqual([done.exitCode, done.stdout], [0, "hello\nbytes\ndone\n"]);

    const events: LogEvent[] = [];
    for await (const e of cat.logs()) events.push(e);
    assert.equal(events.filter((e) => e.type === "stdout").map((e) => e.data).join(""), "hello\nbytes\ndone\n");
    assert.deepEqual(events.at(-1)!.exit, { status: "completed", exitCode: 0, signal: null, error: null });
    assert.deepEqual(events.map((e) => e.id), events.map((_, i) => i + 1));
    const resumed: LogEvent[] = [];
    for await (const e of cat.logs({ after: events.length - 1 })) resumed.push(e);
    assert.deepEqual(resumed.map((e) => e.type), ["exit"]);

    const sleeper = await sandbox.commands.start("sleep 30");
    await sleeper.sendSignal("SIGTERM");
    const ended = await sleeper.wait();
    assert.deepEqual([ended.signal, ended.exitCode], [15, null]);
    const doomed = await sandbox.commands.start("sleep 30");
    assert.equal((await doomed.cancel()).status, "canceled");

    assert.equal((await sandbox.commands.get(cat.id)).stdout, "hello\nbytes\ndone\n");
    const listed = (await sandbox.commands.list({ limit: 2 }).toArray()).map((c) => c.id);
    for (const id of [cat.id, sleeper.id, doomed.id]) assert.ok(listed.includes(id));
  });
});

describe("code", () => {
  test("the docs' Code Contexts snippet keeps state; the context calls", async () => {
    const sandbox = await newSandbox();
    const context = await sandbox.code.createContext({ language: "python" });
    assert.match(context.id, /^cctx_/);
    assert.deepEqual([context.language, context.sandboxId, context.isDefault], ["python", sandbox.id, false]);
    await sandbox.code.run({ contextId: context.id, code: "value = 42" });
    const result = await sandbox.code.run({ contextId: context.id, code: "print(value)" });
    assert.equal(result.stdout.join(""), "42\n");
    assert.deepEqual([result.contextId, result.error], [context.id, null]);
    // The context object works as contextId too.
    assert.equal((await sandbox.code.run({ contextId: context, code: "print(value + 1)" })).stdout.join(""), "43\n");
    assert.equal((await sandbox.code.getContext(context.id)).language, "python");
    assert.ok((await sandbox.code.listContexts()).some((c) => c.id === context.id));
    await sandbox.code.deleteContext(context);
    assert.ok(!(await sandbox.code.listContexts()).some((c) => c.id === context.id));
    await rejectsWith(sandbox.code.getContext(context.id), 404, "not_found");
  });

  test("without contextId the default context is reused", async () => {
    const sandbox = await newSandbox();
    const first = await sandbox.code.run({ code: "x = 7" });
    const second = await sandbox.code.run({ code: "print(x * 6)" });
    assert.equal(second.contextId, first.contextId);
    assert.equal(second.stdout.join(""), "42\n");
    const contexts = await sandbox.code.listContexts();
    assert.equal(contexts.find((c) => c.id === first.contextId)?.isDefault, true);
  });

  test("an exception in the code is result.error, not a thrown error", async () => {
    const sandbox = await newSandbox();
    const result = await sandbox.code.run({ code: "print('before'); 1/0" });
    assert.equal(result.error?.name, "ZeroDivisionError");
    assert.equal(result.stdout.join(""), "before\n");
    const streamed = await sandbox.code.run({ code: "1/0", onStdout: () => undefined });
    assert.equal(streamed.error?.name, "ZeroDivisionError");
  });

  test("onStdout/onStderr receive chunks before the result; same stdout as a blocking run", async () => {
    const sandbox = await newSandbox();
    const code = "import sys, time\nprint('first', flush=True)\ntime.sleep(1)\nprint('second')\nprint('oops', file=sys.stderr)";
    const out: { chunk: string; at: number }[] = [];
    const err: string[] = [];
    const streamed = await sandbox.code.run({
      code,
      onStdout: (chunk) => out.push({ chunk, at: Date.now() }),
      onStderr: (chunk) => err.push(chunk),
    });
    const returnedAt = Date.now();
    assert.equal(out.map((c) => c.chunk).join(""), "first\nsecond\n");
    assert.equal(err.join(""), "oops\n");
    assert.ok(returnedAt - out[0]!.at > 800, "the first chunk arrived while the code still ran");
    const blocking = await sandbox.code.run({ code });
    assert.deepEqual([blocking.stdout, blocking.stderr], [streamed.stdout, streamed.stderr]);
    assert.equal(blocking.contextId, streamed.contextId);
  });

  test("onOutput receives the rich outputs of the result", async () => {
    const sandbox = await newSandbox();
    const outputs: CodeOutput[] = [];
    const result = await sandbox.code.run({
      code: "import pandas as pd\npd.DataFrame({'a': [1, 2]})",
      onOutput: (o) => outputs.push(o),
    });
    assert.equal(result.error, null);
    assert.ok(outputs.length > 0);
    assert.deepEqual(outputs, result.outputs);
  });

  test("a replayed streamed run gives the stored result", async () => {
    const sandbox = await newSandbox();
    const idempotencyKey = randomUUID();
    const code = "import random; print(random.random())";
    const first = await sandbox.code.run({ code, idempotencyKey, onStdout: () => undefined });
    const replayed: string[] = [];
    const second = await sandbox.code.run({ code, idempotencyKey, onStdout: (c) => replayed.push(c) });
    assert.deepEqual(second, first);
    assert.deepEqual(replayed, []);
  });

  test("API errors: unsupported_code_language, context_language_mismatch, sandbox_destroyed", async () => {
    const sandbox = await newSandbox();
    await rejectsWith(sandbox.code.run({ language: "cobol" as CodeLanguage, code: "DISPLAY 'HI'." }), 400, "unsupported_code_language");
    await rejectsWith(
      sandbox.code.run({ language: "cobol" as CodeLanguage, code: "x", onStdout: () => undefined }),
      400,
      "unsupported_code_language",
    );
    await rejectsWith(sandbox.code.run({ language: "javascript", code: "1" }), 400, "unsupported_code_language");
    await sandbox.kill();
    await rejectsWith(sandbox.code.run({ code: "1" }), 410, "sandbox_destroyed");
  });

  test("javascript keeps let state; typescript runs; contexts are per language (node template)", async () => {
    const sandbox = await client.sandboxes.create({ template: "node" });
    live.push(sandbox);
    const js = await sandbox.code.createContext({ language: "javascript" });
    await sandbox.code.run({ language: "javascript", contextId: js, code: "let n = 41;" });
    const r = await sandbox.code.run({ language: "javascript", contextId: js, code: "n += 1; console.log(n)" });
    assert.deepEqual([r.stdout.join(""), r.error], ["42\n", null]);
    const ts = await sandbox.code.run({ language: "typescript", code: "const t: number = 6;" });
    const again = await sandbox.code.run({ language: "typescript", code: "console.log(t * 7)" });
    assert.equal(again.contextId, ts.contextId);
    assert.deepEqual([again.stdout.join(""), again.error], ["42\n", null]);
    await rejectsWith(sandbox.code.run({ language: "typescript", contextId: js, code: "1" }), 400, "context_language_mismatch");
  });
});

describe("files and artifacts", () => {
  test("write, read, list, stat, mkdir, move, delete", async () => {
    const sandbox = await newSandbox();
    const info = await sandbox.files.write("dir/hello.txt", "héllo\n");
    assert.deepEqual([info.path, info.type, info.size], ["/workspace/dir/hello.txt", "file", 7]);
    assert.equal(await sandbox.files.readText("dir/hello.txt"), "héllo\n");
    const bytes = Uint8Array.from({ length: 256 }, (_, i) => i);
    await sandbox.files.write("dir/blob.bin", bytes);
    assert.deepEqual(await sandbox.files.read("dir/blob.bin"), bytes);
    const listing = await sandbox.files.list("dir");
    assert.deepEqual([listing.data.map((e) => e.name), listing.truncated], [["blob.bin", "hello.txt"], false]);
    assert.equal((await sandbox.files.stat("dir")).type, "dir");
    assert.equal((await sandbox.files.mkdir("a/b", { parents: true })).path, "/workspace/a/b");
    assert.equal((await sandbox.files.move("dir/hello.txt", "a/b/hi.txt")).path, "/workspace/a/b/hi.txt");
    await rejectsWith(sandbox.files.stat("dir/hello.txt"), 404, "file_not_found");
    await rejectsWith(sandbox.files.delete("a"), 409, "directory_not_empty");
    await sandbox.files.delete("a", { recursive: true });
    assert.ok(!(await sandbox.files.list()).data.some((e) => e.name === "a"));
  });

  test("staged upload and download", async () => {
    const sandbox = await newSandbox();
    const payload = new Uint8Array(randomBytes(3 * 1024 * 1024 + 17));
    assert.equal((await sandbox.files.upload("big/data.bin", payload)).size, payload.byteLength);
    assert.deepEqual(await sandbox.files.download("big/data.bin"), payload);
    const target = await sandbox.files.downloadUrl("big/data.bin");
    assert.equal(target.method, "GET");
    assert.equal((await (await fetch(target.url)).arrayBuffer()).byteLength, payload.byteLength);
  });

  test("artifacts: create, get, list, download; they outlive the sandbox", async () => {
    const sandbox = await newSandbox();
    await sandbox.files.write("table.csv", "a,b\n1,2\n");
    const artifact = await sandbox.artifacts.create({ path: "table.csv", name: "data.csv" });
    assert.match(artifact.id, /^art_/);
    assert.deepEqual([artifact.name, artifact.size, artifact.sandboxId], ["data.csv", 8, sandbox.id]);
    assert.equal((await client.artifacts.get(artifact.id)).sha256, artifact.sha256);
    assert.ok((await sandbox.artifacts.list().toArray()).some((a) => a.id === artifact.id));
    assert.ok((await client.artifacts.list().toArray()).some((a) => a.id === artifact.id));
    await sandbox.kill();
    assert.equal(new TextDecoder().decode(await client.artifacts.download(artifact.id)), "a,b\n1,2\n");
    await rejectsWith(sandbox.artifacts.create({ path: "table.csv" }), 410, "sandbox_destroyed");
  });
});

/** One GET as a browser sends it to a `*.localhost` URL: to 127.0.0.1, with
 * the URL's `Host` (Node's resolver does not know those names). */
function browserGet(url: string, headers: Record<string, string> = {}): Promise<{ status: number; headers: http.IncomingHttpHeaders; body: string }> {
  const target = new URL(url);
  return new Promise((resolve, reject) => {
    http
      .get({ host: "127.0.0.1", port: Number(target.port), path: target.pathname + target.search, headers: { ...headers, host: target.host } }, (res) => {
        let body = "";
        res.setEncoding("utf8");
        res.on("data", (chunk: string) => (body += chunk));
        res.on("end", () => resolve({ status: res.statusCode!, headers: res.headers, body }));
        res.on("error", reject);
      })
      .on("error", reject);
  });
}

describe("previews", () => {
  test("create, fetch through the URL, the browser token, get, list, delete", async () => {
    const sandbox = await newSandbox();
    await sandbox.files.write("index.html", "<p>from the sandbox</p>");
    await sandbox.files.write("sub/data.json", '{"from": "the sandbox"}');
    await sandbox.commands.start("python3 -m http.server 8000 --bind 127.0.0.1");
    const preview = await sandbox.previews.create({ port: 8000 });
    assert.match(preview.id, /^prv_/);
    assert.deepEqual([preview.port, preview.status], [8000, "active"]);
    assert.match(preview.token!, /^cn_prv_/);
    // Its own origin: the id as the first label under localhost, on the API's port.
    assert.equal(preview.url, `http://${preview.id.replace("_", "-")}.localhost:${new URL(server.baseUrl).port}/`);
    assert.ok(preview.browserUrl!.startsWith(`${preview.url}?crownest_preview_token=cn_prv_`));
    let response = await sandbox.previews.fetch(preview, "index.html");
    for (let i = 0; i < 100 && response.status === 502; i++) {
      await new Promise((r) => setTimeout(r, 100));
      response = await sandbox.previews.fetch(preview, "index.html");
    }
    assert.equal(response.status, 200);
    assert.ok(response instanceof Response);
    assert.equal(response.url, `${preview.url}index.html`);
    assert.match(response.headers.get("content-type")!, /^text\/html/);
    assert.equal(await response.text(), "<p>from the sandbox</p>");
    // The app's redirect (a directory without its slash) is followed on the preview's origin.
    const followed = await sandbox.previews.fetch(preview, "/sub");
    assert.deepEqual([followed.status, followed.redirected, followed.url], [200, true, `${preview.url}sub/`]);
    assert.match(await followed.text(), /data\.json/);
    const manual = await sandbox.previews.fetch(preview, "sub", { redirect: "manual" });
    assert.deepEqual([manual.status, manual.headers.get("location")], [301, "/sub/"]);
    await manual.body?.cancel();
    assert.deepEqual(await (await sandbox.previews.fetch(preview, "sub/data.json")).json(), { from: "the sandbox" });
    // Without a key: 401; with the token: a host-only cookie and a redirect to the path without it.
    assert.equal((await browserGet(preview.url)).status, 401);
    const opened = await browserGet(preview.browserUrl!.replace("?", "index.html?"));
    assert.deepEqual([opened.status, opened.headers.location], [303, "/index.html"]);
    const setCookie = opened.headers["set-cookie"]![0]!;
    assert.match(setCookie, /; Path=\/;/);
    assert.doesNotMatch(setCookie, /domain=/i);
    const cookie = setCookie.split(";")[0]!;
    const page = await browserGet(`${preview.url}index.html`, { cookie });
    assert.deepEqual([page.status, page.body], [200, "<p>from the sandbox</p>"]);
    await rejectsWith(sandbox.previews.create({ port: 8000 }), 409, "preview_exists");
    const got = await sandbox.previews.get(preview.id);
    assert.equal(got.url, preview.url);
    assert.equal(got.token, undefined);
    assert.deepEqual((await sandbox.previews.list().toArray()).map((p) => p.id), [preview.id]);
    const closed = await sandbox.previews.delete(preview);
    assert.deepEqual([closed.status, closed.closeReason], ["closed", "deleted"]);
    assert.equal((await sandbox.previews.fetch(preview, "index.html")).status, 410);
  });
});

describe("errors", () => {
  test("not_found", async () => {
    const e = await rejectsWith(client.sandboxes.get("sbx_does_not_exist"), 404, "not_found");
    assert.equal(e.message, "sandbox `sbx_does_not_exist` not found");
    assert.equal(e.details.id, "sbx_does_not_exist");
  });

  test("forbidden without the scope", async () => {
    const reader = createCrowNestClient({ apiKey: server.mintKey("sdk-ts-tests", "sandboxes:read"), baseUrl: server.baseUrl });
    const e = await rejectsWith(reader.sandboxes.create({ template: "python" }), 403, "forbidden");
    assert.equal(e.details.requiredScope, "sandboxes:create");
  });

  test("sandbox_destroyed after kill", async () => {
    const sandbox = await newSandbox();
    await sandbox.kill();
    await rejectsWith(sandbox.commands.run("echo too late"), 410, "sandbox_destroyed");
  });

  test("unauthorized, and a connection error", async () => {
    const bad = createCrowNestClient({ apiKey: "cn_live_nope", baseUrl: server.baseUrl });
    await rejectsWith(bad.sandboxes.list().toArray(), 401, "unauthorized");
    const port = await new Promise<number>((r) => {
      const s = net.createServer().listen(0, "127.0.0.1", () => {
        const p = (s.address() as net.AddressInfo).port;
        s.close(() => r(p));
      });
    });
    const down = createCrowNestClient({ apiKey: "cn_live_x", baseUrl: `http://127.0.0.1:${port}`, maxRetries: 1 });
    await assert.rejects(down.sandboxes.get("sbx_x"), CrowNestConnectionError);
  });
});

describe("idempotency", () => {
  test("an explicit key replays a create and a run", async () => {
    const key = randomUUID();
    const first = await client.sandboxes.create({ template: "python", idempotencyKey: key });
    live.push(first);
    assert.equal((await client.sandboxes.create({ template: "python", idempotencyKey: key })).id, first.id);
    await rejectsWith(client.sandboxes.create({ template: "python", ttlMs: 60_000, idempotencyKey: key }), 409, "idempotency_key_reused");
    const runKey = randomUUID();
    const r1 = await first.commands.run("echo $RANDOM", { idempotencyKey: runKey });
    const r2 = await first.commands.run("echo $RANDOM", { idempotencyKey: runKey });
    assert.deepEqual([r2.id, r2.stdout], [r1.id, r1.stdout]);
  });

  test("an SDK retry after a dropped connection does not create a second sandbox", async () => {
    const key = server.mintKey(`sdk-ts-retry-${randomUUID().slice(0, 8)}`);
    const upstream = new URL(server.baseUrl);
    let drops = 1;
    let dropped = 0;
    let connections = 0;
    // Forwards to the server; on the first connection it waits for the
    // server's answer and closes the client's connection instead of passing it on.
    const proxy = net.createServer((socket) => {
      connections++;
      const up = net.connect(Number(upstream.port), upstream.hostname);
      socket.pipe(up);
      if (drops > 0) {
        drops--;
        up.once("data", () => {
          dropped++;
          socket.destroy();
          up.destroy();
        });
      } else {
        up.pipe(socket);
      }
      socket.on("error", () => up.destroy());
      up.on("error", () => socket.destroy());
    });
    await new Promise<void>((r) => proxy.listen(0, "127.0.0.1", r));
    const port = (proxy.address() as net.AddressInfo).port;
    try {
      const through = createCrowNestClient({ apiKey: key, baseUrl: `http://127.0.0.1:${port}` });
      const sandbox = await through.sandboxes.create({ template: "python" });
      assert.equal(dropped, 1);
      assert.ok(connections >= 2);
      const direct = createCrowNestClient({ apiKey: key, baseUrl: server.baseUrl });
      const all = await direct.sandboxes.list().toArray();
      assert.deepEqual(all.map((s) => s.id), [sandbox.id], "exactly one sandbox for the org");
      await all[0]!.kill();
    } finally {
      proxy.close();
    }
  });
});

// ------------------------------------------------------------------ workspace runs

const REPORT_PY = `import json, os, sys
os.makedirs("out", exist_ok=True)
with open("out/report.json", "w") as f:
    json.dump({"ok": True, "files": sorted(os.listdir("."))}, f)
with open("out/summary.txt", "w") as f:
    f.write("summary: all good\\n")
print("report ok", flush=True)
print("a warning", file=sys.stderr, flush=True)
`;

/** Fails (and so the run) when the sandbox sees what .gitignore excludes. */
const CHECKS = [
  "test ! -e ignored.txt",
  "test ! -e build",
  "test ! -e scratch.tmp",
  "test -e keep.tmp",
  "test ! -e anchored.txt",
  "test -e sub/anchored.txt",
  "test ! -e sub/local.txt",
  "test -e sub/kept.txt",
  "test ! -e logs/deep/x.log",
  "test ! -e .git",
  "test -L link.json",
].join(" && ");

const tempDirs: string[] = [];

function tempDir(): string {
  const dir = mkdtempSync(join(tmpdir(), "crownest-wsr-ts-"));
  tempDirs.push(dir);
  return dir;
}

after(() => {
  for (const dir of tempDirs) rmSync(dir, { recursive: true, force: true });
});

/** A small checkout: package.json, report.py, and files .gitignore excludes. */
function makeProject(): string {
  const root = tempDir();
  const write = (path: string, text: string) => {
    mkdirSync(join(root, path, ".."), { recursive: true });
    writeFileSync(join(root, path), text);
  };
  write("package.json", JSON.stringify({ name: "wsr-sdk-test", version: "1.0.0" }));
  write("report.py", REPORT_PY);
  write(".gitignore", "ignored.txt\nbuild/\n*.tmp\n!keep.tmp\n/anchored.txt\nlogs/**/*.log\n");
  for (const name of ["ignored.txt", "scratch.tmp", "keep.tmp", "anchored.txt"]) write(name, name);
  write("build/out.bin", "\0\0\0");
  write("sub/.gitignore", "local.txt\n");
  for (const name of ["anchored.txt", "local.txt", "kept.txt"]) write(`sub/${name}`, name);
  write("logs/deep/x.log", "log");
  write(".git/HEAD", "ref: refs/heads/main\n");
  symlinkSync("package.json", join(root, "link.json"));
  return root;
}

/** RFC 8785 canonical JSON for what a bundle holds (no floats). */
function canonicalJson(value: unknown): string {
  if (Array.isArray(value)) return `[${value.map(canonicalJson).join(",")}]`;
  if (value !== null && typeof value === "object") {
    const entries = Object.entries(value as Record<string, unknown>).filter(([, v]) => v !== undefined);
    entries.sort(([a], [b]) => (a < b ? -1 : a > b ? 1 : 0)); // UTF-16 code units
    return `{${entries.map(([k, v]) => `${JSON.stringify(k)}:${canonicalJson(v)}`).join(",")}}`;
  }
  return JSON.stringify(value);
}

function sha256Hex(data: Uint8Array | string): string {
  return createHash("sha256").update(data).digest("hex");
}

async function tinyArchive(files: Record<string, string>): Promise<Uint8Array> {
  const dir = tempDir();
  for (const [name, text] of Object.entries(files)) writeFileSync(join(dir, name), text);
  const packed = await packDirectory(dir);
  try {
    return new Uint8Array(readFileSync(packed.path));
  } finally {
    await packed.remove();
  }
}

async function createdRun(command: string, data: Uint8Array, options: Record<string, unknown> = {}): Promise<WorkspaceRun> {
  return client.workspaceRuns.create(command, { archive: { sizeBytes: data.byteLength, sha256: sha256Hex(data) }, ...options });
}

async function cancelQuietly(run: WorkspaceRun): Promise<void> {
  await client.workspaceRuns.cancel(run).catch((e: unknown) => {
    if (!(e instanceof CrowNestApiError) || e.code !== "workspace_run_finished") throw e;
  });
}

async function collect(events: AsyncIterable<WorkspaceRunEvent>): Promise<WorkspaceRunEvent[]> {
  const all: WorkspaceRunEvent[] = [];
  for await (const e of events) all.push(e);
  return all;
}

async function allPages(run: WorkspaceRun): Promise<WorkspaceRunEvent[]> {
  const all: WorkspaceRunEvent[] = [];
  let afterSeq = 0;
  for (;;) {
    const page = await client.workspaceRuns.listEvents(run, { afterSeq, limit: 1000 });
    all.push(...page.data);
    afterSeq = page.nextAfterSeq;
    if (page.terminal && page.data.length < 1000) return all;
  }
}

function text(events: WorkspaceRunEvent[], type: "stdout" | "stderr"): string {
  return events.map((e) => (e.type === type ? e.data.data : "")).join("");
}

describe("workspace runs", () => {
  test(".gitignore patterns: name, dir/, *.ext, /anchored, !negation, **, nested files", () => {
    const rules = parseGitignore("# c\n\nname\ndir/\n*.ext\n/anchored\n!keep.ext\na/**/z\n**/deep\nx/**\n\\#hash\nf[0-9].txt\n");
    const cases: [string, boolean, boolean][] = [
      ["name", false, true],
      ["sub/name", false, true],
      ["dir", true, true],
      ["dir", false, false],
      ["sub/dir", true, true],
      ["a.ext", false, true],
      ["sub/b.ext", false, true],
      ["keep.ext", false, false],
      ["anchored", false, true],
      ["sub/anchored", false, false],
      ["a/z", false, true],
      ["a/b/c/z", false, true],
      ["q/r/deep", true, true],
      ["x/anything/below", false, true],
      ["x", true, false],
      ["#hash", false, true],
      ["f1.txt", false, true],
      ["fa.txt", false, false],
      ["other", false, false],
    ];
    for (const [path, isDir, expected] of cases) assert.equal(isIgnored(path, isDir, rules), expected, `${path} (dir: ${isDir})`);
    const nested = [...rules, ...parseGitignore("!name\nlocal\n", "sub")];
    assert.equal(isIgnored("sub/name", false, nested), false);
    assert.equal(isIgnored("name", false, nested), true);
    assert.equal(isIgnored("sub/local", false, nested), true);
    assert.equal(isIgnored("local", false, nested), false);
  });

  test("packDirectory: relative entries, symlinks kept, ignored files and .git left out", async () => {
    const packed = await packDirectory(makeProject());
    try {
      const data = readFileSync(packed.path);
      assert.equal(data.byteLength, packed.sizeBytes);
      assert.equal(sha256Hex(data), packed.sha256);
      const { stdout } = await promisify(execFile)("tar", ["-tvzf", packed.path]);
      const listing = stdout.trim().split("\n");
      const names = listing.map((l) => l.split(/\s+/).slice(5).join(" "));
      assert.ok(names.every((n) => !n.startsWith("/")), stdout);
      assert.ok(listing.some((l) => l.startsWith("l") && l.endsWith("link.json -> package.json")), stdout);
      assert.ok(names.includes("sub/") && names.includes("report.py") && names.includes("keep.tmp"), stdout);
      for (const gone of ["ignored.txt", "build/", "sub/local.txt", ".git/HEAD", "logs/deep/x.log"]) assert.ok(!names.includes(gone), gone);
    } finally {
      await packed.remove();
    }
  });

  test("runDirectory on python-node: events 1..n, stdout, artifacts, a verifiable Evidence Bundle", async () => {
    const seen: WorkspaceRunEvent[] = [];
    const tag = `wsr-${randomUUID().slice(0, 8)}`;
    const { run, evidence } = await client.workspaceRuns.runDirectory(
      makeProject(),
      `${CHECKS} && node -e "console.log('node sees ' + require('./package.json').name)" && python3 report.py`,
      {
        template: "python-node",
        artifacts: [{ path: "out/report.json", name: "report" }, { path: "out/summary.txt" }],
        env: { CI: "1" },
        metadata: { suite: tag },
        timeoutMs: 120_000,
        onEvent: (e) => void seen.push(e),
      },
    );
    assert.equal(run.status, "succeeded", JSON.stringify({ run, stdout: text(seen, "stdout"), stderr: text(seen, "stderr") }));
    assert.deepEqual([run.reason, run.exitCode, run.template, run.archive.uploaded], [null, 0, "python-node", true]);
    assert.deepEqual(run.metadata, { suite: tag });
    assert.deepEqual(seen.map((e) => e.seq), seen.map((_, i) => i + 1));
    const last = seen[seen.length - 1]!;
    assert.ok(last.type === "terminal" && last.data.status === "succeeded" && last.data.exitCode === 0);
    assert.match(text(seen, "stdout"), /node sees wsr-sdk-test\n/);
    assert.match(text(seen, "stdout"), /report ok\n/);
    assert.match(text(seen, "stderr"), /a warning/);
    assert.ok(seen.some((e) => e.type === "status" && e.data.status === "running"));
    assert.deepEqual(await allPages(run), seen);
    assert.deepEqual(await collect(client.workspaceRuns.events(run)), seen);

    const byName = new Map(run.collected.map((c) => [c.name, c]));
    assert.deepEqual([...byName.keys()].sort(), ["report", "summary.txt"]);
    const summary = await client.artifacts.download(byName.get("summary.txt")!.artifactId!);
    assert.equal(new TextDecoder().decode(summary), "summary: all good\n");
    assert.equal(sha256Hex(summary), byName.get("summary.txt")!.sha256);
    const report = JSON.parse(new TextDecoder().decode(await client.artifacts.download(byName.get("report")!.artifactId!)));
    assert.equal(report.ok, true);
    assert.ok(!report.files.includes("ignored.txt") && report.files.includes("package.json"));

    const { bundle, signature } = evidence;
    assert.equal(signature.algorithm, "ed25519");
    assert.deepEqual([bundle.runId, bundle.status, bundle.exitCode, bundle.template.name], [run.id, "succeeded", 0, "python-node"]);
    assert.deepEqual(bundle.envNames, ["CI"]);
    assert.deepEqual(bundle.archive, { sha256: run.archive.sha256, sizeBytes: run.archive.sizeBytes });
    assert.deepEqual(bundle.artifacts.map((a) => a.name).sort(), ["report", "summary.txt"]);
    for (const a of bundle.artifacts) {
      assert.match(a.sha256, /^[0-9a-f]{64}$/);
      assert.equal(a.sha256, byName.get(a.name)!.sha256);
    }
    assert.equal(bundle.events.count, seen.length);
    assert.deepEqual(bundle.terminalEvent, last);
    assert.equal(bundle.events.sha256, sha256Hex(seen.map((e) => canonicalJson(e) + "\n").join("")));
    // The signature verifies with the server's published key.
    const key = (await client.workspaceRuns.evidenceKeys()).find((k) => k.keyId === signature.keyId);
    assert.ok(key, "the bundle's key is published");
    const raw = Buffer.from(key.publicKey, "base64");
    assert.equal(sha256Hex(raw).slice(0, 16), key.keyId);
    const publicKey = createPublicKey({ key: Buffer.concat([Buffer.from("302a300506032b6570032100", "hex"), raw]), format: "der", type: "spki" });
    assert.ok(verify(null, Buffer.from(canonicalJson(bundle)), publicKey, Buffer.from(signature.value, "base64")), "signature");
    const tampered = { ...bundle, exitCode: 1 };
    assert.ok(!verify(null, Buffer.from(canonicalJson(tampered)), publicKey, Buffer.from(signature.value, "base64")));
    assert.deepEqual(await client.workspaceRuns.evidence(run.id), evidence);
  });

  test("without the .gitignore the same check fails the run (exit_code)", async () => {
    const project = makeProject();
    writeFileSync(join(project, ".gitignore"), "");
    const { run, evidence } = await client.workspaceRuns.runDirectory(project, "test ! -e ignored.txt", { template: "python-node" });
    assert.deepEqual([run.status, run.reason, run.exitCode], ["failed", "exit_code", 1]);
    assert.equal(evidence.bundle.status, "failed");
  });

  test("staged upload from a file; start twice; upload after start", async () => {
    const data = await tinyArchive({ "hello.txt": "staged hello\n" });
    const path = join(tempDir(), "workspace.tar.gz");
    writeFileSync(path, data);
    const run = await createdRun("cat hello.txt", data);
    assert.deepEqual([run.status, run.archive.uploaded], ["awaiting_archive", false]);
    const target = await client.workspaceRuns.archiveUploadUrl(run);
    assert.equal(target.method, "PUT");
    const uploaded = await client.workspaceRuns.uploadArchive(run, path, { staged: true });
    assert.deepEqual([uploaded.id, uploaded.status, uploaded.archive.uploaded], [run.id, "awaiting_archive", true]);
    assert.equal((await client.workspaceRuns.start(run)).status, "queued");
    await rejectsWith(client.workspaceRuns.start(run), 409, "workspace_run_already_started");
    await rejectsWith(client.workspaceRuns.uploadArchive(run, data), 409, "workspace_run_not_awaiting_archive");
    const ended = await client.workspaceRuns.wait(run, { timeoutMs: 120_000 });
    assert.equal(ended.status, "succeeded");
    // wait() resolves once the evidence is written too.
    assert.equal(ended.evidenceReady, true);
    assert.equal((await client.workspaceRuns.evidence(run)).bundle.status, "succeeded");
    assert.equal(text(await collect(client.workspaceRuns.events(run)), "stdout"), "staged hello\n");

    const other = await createdRun("true", new Uint8Array([...data, 0]));
    await rejectsWith(client.workspaceRuns.uploadArchive(other, new Blob([new Uint8Array(data)]), { staged: true }), 422, "archive_size_mismatch");
    await cancelQuietly(other);
  });

  test("archive_digest_mismatch (direct and staged), archive_not_uploaded, evidence_not_ready", async () => {
    const data = await tinyArchive({ "a.txt": "a" });
    const wrong = await client.workspaceRuns.create("true", { archive: { sizeBytes: data.byteLength, sha256: "0".repeat(64) } });
    try {
      await rejectsWith(client.workspaceRuns.uploadArchive(wrong, data), 422, "archive_digest_mismatch");
      await rejectsWith(client.workspaceRuns.uploadArchive(wrong, data, { staged: true }), 422, "archive_digest_mismatch");
      const still = await client.workspaceRuns.get(wrong.id);
      assert.deepEqual([still.status, still.archive.uploaded], ["awaiting_archive", false]);
      await rejectsWith(client.workspaceRuns.start(wrong), 409, "archive_not_uploaded");
      await rejectsWith(client.workspaceRuns.evidence(wrong), 409, "evidence_not_ready");
      await rejectsWith(
        client.workspaceRuns.create("true", { archive: { sizeBytes: 1, sha256: "a".repeat(64) }, template: "no-such-template" }),
        400,
        "template_not_found",
      );
    } finally {
      await cancelQuietly(wrong);
    }
  });

  test("cancel a running run", async () => {
    const data = await tinyArchive({ "a.txt": "a" });
    const run = await createdRun("echo sleeping; sleep 30", data);
    try {
      await client.workspaceRuns.uploadArchive(run, data);
      await client.workspaceRuns.start(run);
      for await (const e of client.workspaceRuns.events(run)) if (e.type === "stdout" && e.data.data.includes("sleeping")) break;
      const started = Date.now();
      assert.equal((await client.workspaceRuns.cancel(run)).id, run.id);
      const ended = await client.workspaceRuns.wait(run, { timeoutMs: 60_000 });
      assert.ok(Date.now() - started < 25_000, "cancel stopped the command");
      assert.deepEqual([ended.status, ended.reason], ["canceled", "canceled"]);
    } finally {
      await cancelQuietly(run);
    }
    const events = await collect(client.workspaceRuns.events(run));
    assert.deepEqual(events.map((e) => e.seq), events.map((_, i) => i + 1));
    const last = events[events.length - 1]!;
    assert.ok(last.type === "terminal" && last.data.status === "canceled");
    const evidence = await client.workspaceRuns.evidence(run);
    assert.deepEqual([evidence.bundle.status, evidence.bundle.reason], ["canceled", "canceled"]);
    await rejectsWith(client.workspaceRuns.cancel(run), 409, "workspace_run_finished");
  });

  test("list: metadata and status filters, pages; wait times out", async () => {
    const tag = `list-${randomUUID().slice(0, 8)}`;
    const archive = { sizeBytes: 10, sha256: "b".repeat(64) };
    const first = await client.workspaceRuns.create("true", { archive, metadata: { suite: tag, n: "1" } });
    const second = await client.workspaceRuns.create("true", { archive, metadata: { suite: tag, n: "2" } });
    try {
      const page = await client.workspaceRuns.listPage({ metadata: { suite: tag }, limit: 1 });
      assert.deepEqual(page.data.map((r) => r.id), [second.id]);
      assert.ok(page.nextCursor);
      const page2 = await client.workspaceRuns.listPage({ metadata: { suite: tag }, limit: 1, cursor: page.nextCursor! });
      assert.deepEqual(page2.data.map((r) => r.id), [first.id]);
      const ids = async (o: Parameters<typeof client.workspaceRuns.list>[0]) => (await client.workspaceRuns.list(o).toArray()).map((r) => r.id);
      assert.deepEqual(await ids({ metadata: { suite: tag }, limit: 1 }), [second.id, first.id]);
      assert.deepEqual(await ids({ metadata: { suite: tag, n: "1" } }), [first.id]);
      assert.deepEqual(await ids({ status: "awaiting_archive", metadata: { suite: tag } }), [second.id, first.id]);
      assert.deepEqual(await ids({ status: "running", metadata: { suite: tag } }), []);
      await assert.rejects(client.workspaceRuns.wait(first, { timeoutMs: 500 }), CrowNestTimeoutError);
    } finally {
      await cancelQuietly(first);
      await cancelQuietly(second);
    }
    const canceled = await client.workspaceRuns.list({ status: "canceled", metadata: { suite: tag } }).toArray();
    assert.deepEqual(canceled.map((r) => r.id), [second.id, first.id]);
  });

  test("events: afterSeq resumes without duplicates; a cut stream is resumed without gaps", async () => {
    const data = await tinyArchive({ "a.txt": "a" });
    const run = await createdRun("for i in 1 2 3 4 5; do echo line $i; done; echo oops >&2", data);
    await client.workspaceRuns.uploadArchive(run, data);
    await client.workspaceRuns.start(run);
    // A proxy that cuts its first two connections after two SSE events.
    const upstream = new URL(server.baseUrl);
    let cutsLeft = 2;
    let cut = 0;
    const proxy = net.createServer((socket) => {
      const up = net.connect(Number(upstream.port), upstream.hostname);
      socket.pipe(up);
      socket.on("error", () => up.destroy());
      up.on("error", () => socket.destroy());
      if (cutsLeft <= 0) {
        up.pipe(socket);
        return;
      }
      cutsLeft--;
      let seen = "";
      up.on("data", (chunk: Buffer) => {
        seen += chunk.toString("latin1");
        const body = seen.split("\r\n\r\n").slice(1).join("\r\n\r\n");
        let at = -2;
        let found = 0;
        while (found < 2 && (at = body.indexOf("\n\n", at + 2)) !== -1) found++;
        if (found < 2) {
          socket.write(chunk);
          return;
        }
        const keep = chunk.length - (body.length - (at + 2));
        socket.end(chunk.subarray(0, Math.max(0, keep)));
        cut++;
        up.destroy();
        socket.destroySoon();
      });
    });
    await new Promise<void>((r) => proxy.listen(0, "127.0.0.1", r));
    try {
      const through = createCrowNestClient({ apiKey, baseUrl: `http://127.0.0.1:${(proxy.address() as net.AddressInfo).port}` });
      const live = await collect(through.workspaceRuns.events(run));
      assert.ok(cut >= 1, "the proxy cut the stream");
      const n = live.length;
      assert.deepEqual(live.map((e) => e.seq), live.map((_, i) => i + 1));
      assert.ok(n >= 5 && live[n - 1]!.type === "terminal");
      assert.deepEqual(live, await allPages(run));
      assert.equal(text(live, "stdout"), [1, 2, 3, 4, 5].map((i) => `line ${i}\n`).join(""));
      for (const k of [1, Math.floor(n / 2), n - 1]) {
        const resumed = await collect(client.workspaceRuns.events(run, { afterSeq: k }));
        assert.deepEqual(resumed.map((e) => e.seq), Array.from({ length: n - k }, (_, i) => k + 1 + i));
      }
      const page = await client.workspaceRuns.listEvents(run, { afterSeq: 1, limit: 2 });
      assert.deepEqual([page.data.map((e) => e.seq), page.nextAfterSeq], [[2, 3], 3]);
      const tail = await client.workspaceRuns.listEvents(run, { afterSeq: n - 1 });
      assert.deepEqual([tail.data.map((e) => e.seq), tail.terminal], [[n], true]);
    } finally {
      proxy.close();
    }
  });
});
