// Files calls against a live crownest server (started for this file):
// exists, writeFiles, streamed reads and writes past 32 MiB, and watch.
import assert from "node:assert/strict";
import { createHash, randomBytes } from "node:crypto";
import { after, before, describe, test } from "node:test";

import {
  CrowNestApiError,
  CrowNestConnectionError,
  DIRECT_UPLOAD_MAX,
  createCrowNestClient,
  type CrowNestClient,
  type Sandbox,
  type WatchEvent,
} from "@crownest/sdk";
import { eventually, recordingFetch, rejectsWith, sleep, type SentRequest } from "./helpers.js";
import { startServer, type TestServer } from "./server.js";

let server: TestServer;
let client: CrowNestClient;
const live: Sandbox[] = [];

async function newSandbox(): Promise<Sandbox> {
  const sandbox = await client.sandboxes.create({ template: "python" });
  live.push(sandbox);
  return sandbox;
}

before(async () => {
  server = await startServer();
  client = createCrowNestClient({ apiKey: server.mintKey("sdk-ts-files"), baseUrl: server.baseUrl });
});

after(async () => {
  for (const s of live) await s.kill().catch(() => undefined);
  await server?.stop();
});

/** `METHOD /path` of each request, transfer tokens elided. */
function routes(sent: SentRequest[]): string[] {
  return sent.map((r) => `${r.method} ${r.url.pathname.replace(/\/v1\/transfers\/.*/, "/v1/transfers/…")}`);
}

/** `total` random bytes in 1 MiB chunks, made as they are read, hashed into `hash`. */
async function* randomChunks(total: number, hash: ReturnType<typeof createHash>): AsyncGenerator<Uint8Array> {
  for (let sent = 0; sent < total; ) {
    const chunk = new Uint8Array(randomBytes(Math.min(1 << 20, total - sent)));
    hash.update(chunk);
    sent += chunk.byteLength;
    yield chunk;
  }
}

/** Reads a stream to its end: its SHA-256, size and number of chunks. */
async function drain(stream: ReadableStream<Uint8Array>): Promise<{ sha256: string; size: number; chunks: number }> {
  const hash = createHash("sha256");
  const reader = stream.getReader();
  let size = 0;
  let chunks = 0;
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    hash.update(value);
    size += value.byteLength;
    chunks++;
  }
  return { sha256: hash.digest("hex"), size, chunks };
}

async function remoteSha256(sandbox: Sandbox, path: string): Promise<string> {
  const run = await sandbox.commands.run(`sha256sum ${path}`);
  assert.equal(run.exitCode, 0, run.stderr);
  return run.stdout.split(" ")[0]!;
}

describe("exists", () => {
  test("files and directories exist, missing paths do not; outside /workspace is refused", async () => {
    const sandbox = await newSandbox();
    await sandbox.files.write("e/x.txt", "x");
    assert.equal(await sandbox.files.exists("e/x.txt"), true);
    assert.equal(await sandbox.files.exists("/workspace/e/x.txt"), true);
    assert.equal(await sandbox.files.exists("e"), true);
    assert.equal(await sandbox.files.exists("e/nope.txt"), false);
    assert.equal(await sandbox.files.exists("nope/x.txt"), false);
    await sandbox.files.delete("e/x.txt");
    assert.equal(await sandbox.files.exists("e/x.txt"), false);
    await rejectsWith(sandbox.files.exists("/etc/passwd"), 400, "path_outside_workspace");
  });
});

describe("writeFiles", () => {
  test("writes text, bytes, a Blob and a stream, in order, and returns each file", async () => {
    const sandbox = await newSandbox();
    const bytes = Uint8Array.from({ length: 300 }, (_, i) => i % 256);
    const stream = new ReadableStream<Uint8Array>({
      start(c) {
        c.enqueue(new TextEncoder().encode("str"));
        c.enqueue(new TextEncoder().encode("eamed"));
        c.close();
      },
    });
    const written = await sandbox.files.writeFiles([
      { path: "many/a.txt", data: "héllo" },
      { path: "many/deep/b.bin", data: bytes },
      { path: "many/c.txt", data: new Blob(["from ", "a blob"]) },
      { path: "many/d.txt", data: stream, size: 8 },
    ]);
    assert.deepEqual(
      written.map((f) => [f.path, f.size]),
      [["/workspace/many/a.txt", 6], ["/workspace/many/deep/b.bin", 300], ["/workspace/many/c.txt", 11], ["/workspace/many/d.txt", 8]],
    );
    assert.equal(await sandbox.files.readText("many/a.txt"), "héllo");
    assert.deepEqual(await sandbox.files.read("many/deep/b.bin"), bytes);
    assert.equal(await sandbox.files.readText("many/c.txt"), "from a blob");
    assert.equal(await sandbox.files.readText("many/d.txt"), "streamed");
    await rejectsWith(sandbox.files.writeFiles([{ path: "ok.txt", data: "1" }, { path: "/etc/x", data: "2" }]), 400, "path_outside_workspace");
    assert.equal(await sandbox.files.exists("ok.txt"), true, "the files before the failing one are written");
  });
});

describe("streamed files", () => {
  test("a 40 MiB stream of unknown size goes through a staged upload, and readStream streams it back staged", async () => {
    const sandbox = await newSandbox();
    const size = 40 * 1024 * 1024 + 123;
    const hash = createHash("sha256");
    const written = await recordingFetch(async (sent) => {
      const info = await sandbox.files.write("big/unknown.bin", randomChunks(size, hash));
      assert.deepEqual(routes(sent), [`POST /v1/sandboxes/${sandbox.id}/files/uploads`, "PUT /v1/transfers/…"]);
      return info;
    });
    const sha256 = hash.digest("hex");
    assert.equal(written.size, size);
    assert.equal(await remoteSha256(sandbox, "big/unknown.bin"), sha256);

    const read = await recordingFetch(async (sent) => {
      const stream = await sandbox.files.readStream("big/unknown.bin");
      assert.deepEqual(routes(sent), [
        `GET /v1/sandboxes/${sandbox.id}/files/stat`,
        `POST /v1/sandboxes/${sandbox.id}/files/downloads`,
        "GET /v1/transfers/…",
      ]);
      return drain(stream);
    });
    assert.deepEqual([read.size, read.sha256], [size, sha256]);
    assert.ok(read.chunks > 10, `delivered in ${read.chunks} chunks as they came`);
  });

  test("a stream with its size: over 32 MiB staged with that size, under it one PUT; a Blob knows its size", async () => {
    const sandbox = await newSandbox();
    const size = DIRECT_UPLOAD_MAX + 5 * 1024 * 1024;
    const hash = createHash("sha256");
    await recordingFetch(async (sent) => {
      const info = await sandbox.files.write("big/sized.bin", randomChunks(size, hash), { size });
      assert.equal(info.size, size);
      assert.deepEqual(routes(sent), [`POST /v1/sandboxes/${sandbox.id}/files/uploads`, "PUT /v1/transfers/…"]);
    });
    assert.equal(await remoteSha256(sandbox, "big/sized.bin"), hash.digest("hex"));
    // A declared size smaller than the stream: the server refuses the
    // extra bytes (413 file_too_large, or a reset connection when it
    // answers while the body is still being sent), and no file is left.
    await assert.rejects(
      sandbox.files.write("big/lie.bin", randomChunks(DIRECT_UPLOAD_MAX + 2 * 1024 * 1024, createHash("sha256")), { size: DIRECT_UPLOAD_MAX + 1024 }),
      (e) => (e instanceof CrowNestApiError && e.code === "file_too_large") || e instanceof CrowNestConnectionError,
    );
    assert.equal(await sandbox.files.exists("big/lie.bin"), false);

    const small = createHash("sha256");
    await recordingFetch(async (sent) => {
      await sandbox.files.write("small.bin", randomChunks(3 * 1024 * 1024, small), { size: 3 * 1024 * 1024 });
      assert.deepEqual(routes(sent), [`PUT /v1/sandboxes/${sandbox.id}/files`]);
    });
    const smallSha = small.digest("hex");
    assert.equal(await remoteSha256(sandbox, "small.bin"), smallSha);
    await recordingFetch(async (sent) => {
      const read = await drain(await sandbox.files.readStream("small.bin"));
      assert.deepEqual([read.size, read.sha256], [3 * 1024 * 1024, smallSha]);
      assert.deepEqual(routes(sent), [`GET /v1/sandboxes/${sandbox.id}/files/stat`, `GET /v1/sandboxes/${sandbox.id}/files`]);
    });
    // A Blob over 32 MiB: staged, its size from the Blob.
    const blob = new Blob([new Uint8Array(DIRECT_UPLOAD_MAX + 1).fill(7)]);
    await recordingFetch(async (sent) => {
      assert.equal((await sandbox.files.write("big/blob.bin", blob)).size, blob.size);
      assert.deepEqual(routes(sent), [`POST /v1/sandboxes/${sandbox.id}/files/uploads`, "PUT /v1/transfers/…"]);
    });
    await rejectsWith(sandbox.files.readStream("big/missing.bin"), 404, "file_not_found");
  });

  test("readStream can be cancelled part way", async () => {
    const sandbox = await newSandbox();
    await sandbox.files.write("c.bin", new Uint8Array(8 * 1024 * 1024).fill(1));
    const reader = (await sandbox.files.readStream("c.bin")).getReader();
    const first = await reader.read();
    assert.ok(first.value && first.value.byteLength > 0);
    await reader.cancel();
    assert.equal((await sandbox.files.stat("c.bin")).size, 8 * 1024 * 1024);
  });
});

describe("watch", () => {
  test("create, modify, rename and delete of a script's changes, recursively, after ready", async () => {
    const sandbox = await newSandbox();
    await sandbox.files.mkdir("w/sub", { parents: true });
    const events: WatchEvent[] = [];
    const handle = await sandbox.files.watch("w", (e) => void events.push(e), { recursive: true });
    assert.equal(handle.path, "/workspace/w");
    const script = "echo one > w/sub/f.txt && echo two >> w/sub/f.txt && mv w/sub/f.txt w/sub/g.txt && rm w/sub/g.txt";
    assert.equal((await sandbox.commands.run(script)).exitCode, 0);
    await eventually("the delete of g.txt", () =>
      events.some((e) => e.type === "delete" && e.path === "/workspace/w/sub/g.txt") ? true : undefined,
    );
    const at = (predicate: (e: WatchEvent) => boolean, what: string): number => {
      const i = events.findIndex(predicate);
      assert.ok(i >= 0, `${what} in ${JSON.stringify(events)}`);
      return i;
    };
    const created = at((e) => e.type === "create" && e.path === "/workspace/w/sub/f.txt", "create f.txt");
    const modified = at((e) => e.type === "modify" && e.path === "/workspace/w/sub/f.txt", "modify f.txt");
    const renamed = at((e) => e.type === "rename" && e.path === "/workspace/w/sub/g.txt" && e.oldPath === "/workspace/w/sub/f.txt", "rename f.txt -> g.txt");
    const deleted = at((e) => e.type === "delete" && e.path === "/workspace/w/sub/g.txt", "delete g.txt");
    assert.ok(created < modified && modified < renamed && renamed < deleted, JSON.stringify(events));
    assert.ok(events.every((e) => !("isDir" in e) || e.isDir === false), "no directory changed");
    await handle.stop();
    assert.equal(await handle.closed, "stopped");
    const seen = events.length;
    await sandbox.commands.run("echo late > w/late.txt");
    await sleep(1000);
    assert.equal(events.length, seen, "no event after stop()");
  });

  test("recursive: false watches only the directory itself; a created directory is isDir", async () => {
    const sandbox = await newSandbox();
    await sandbox.files.mkdir("flat/sub", { parents: true });
    const events: WatchEvent[] = [];
    const handle = await sandbox.files.watch("/workspace/flat", (e) => void events.push(e), { recursive: false });
    await sandbox.commands.run("touch flat/sub/hidden.txt && mkdir flat/newdir && touch flat/top.txt");
    await eventually("the create of top.txt", () =>
      events.some((e) => e.type === "create" && e.path === "/workspace/flat/top.txt") ? true : undefined,
    );
    assert.ok(!events.some((e) => "path" in e && e.path.startsWith("/workspace/flat/sub/")), JSON.stringify(events));
    assert.ok(events.some((e) => e.type === "create" && e.path === "/workspace/flat/newdir" && e.isDir), JSON.stringify(events));
    await handle.stop();
  });

  test("by default /workspace and its subdirectories; the watch ends with the sandbox, or its directory", async () => {
    const sandbox = await newSandbox();
    await sandbox.files.mkdir("deep/er", { parents: true });
    const events: WatchEvent[] = [];
    const handle = await sandbox.files.watch(undefined, (e) => void events.push(e));
    assert.equal(handle.path, "/workspace");
    await sandbox.files.write("deep/er/root.txt", "r");
    await eventually("an event for deep/er/root.txt", () =>
      events.some((e) => "path" in e && e.path === "/workspace/deep/er/root.txt") ? true : undefined,
    );
    const gone = await sandbox.files.watch("deep", () => undefined);
    await sandbox.files.delete("deep", { recursive: true });
    assert.equal(await Promise.race([gone.closed, sleep(15_000).then(() => "still open")]), "directory_removed");
    await sandbox.kill();
    assert.equal(await Promise.race([handle.closed, sleep(15_000).then(() => "still open")]), "sandbox_destroyed");
  });

  test("at most 8 watches per sandbox: the next is too_many_watches, and a stopped one frees its place", async () => {
    const sandbox = await newSandbox();
    const handles = [];
    for (let i = 0; i < 8; i++) handles.push(await sandbox.files.watch(undefined, () => undefined));
    await rejectsWith(sandbox.files.watch(undefined, () => undefined), 429, "too_many_watches");
    await handles.pop()!.stop();
    const again = await eventually("a place for a new watch", async () =>
      sandbox.files.watch(undefined, () => undefined).catch((e: unknown) => {
        if (e instanceof CrowNestApiError && e.code === "too_many_watches") return undefined;
        throw e;
      }),
    );
    handles.push(again);
    for (const h of handles) await h.stop();
  });

  test("a missing directory is file_not_found, a file not_a_directory", async () => {
    const sandbox = await newSandbox();
    await sandbox.files.write("plain.txt", "p");
    await rejectsWith(sandbox.files.watch("missing", () => undefined), 404, "file_not_found");
    await rejectsWith(sandbox.files.watch("plain.txt", () => undefined), 400, "not_a_directory");
  });

  test("an onEvent that throws ends the watch: onError and closed get the error", async () => {
    const sandbox = await newSandbox();
    const errors: unknown[] = [];
    const handle = await sandbox.files.watch(
      undefined,
      () => {
        throw new Error("handler failed");
      },
      { onError: (e) => void errors.push(e) },
    );
    await sandbox.files.write("boom.txt", "b");
    await assert.rejects(handle.closed, /handler failed/);
    assert.equal(errors.length, 1);
    await handle.stop(); // stopping an ended watch is fine
  });
});
