// @crownest/sdk against a live crownest server (started for this file).
import assert from "node:assert/strict";
import { execFile } from "node:child_process";
import { randomBytes, randomUUID } from "node:crypto";
import http from "node:http";
import net from "node:net";
import { join } from "node:path";
import { after, before, describe, test } from "node:test";
import { promisify } from "node:util";

import {
  Command,
  CrowNestApiError,
  CrowNestConnectionError,
  createCrowNestClient,
  type CodeLanguage,
  type CodeOutput,
  type CrowNestClient,
  type LogEvent,
  type Sandbox,
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
