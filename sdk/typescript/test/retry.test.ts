// The SDK's retries and deadlines, against a tiny node:http server on
// 127.0.0.1 that answers as each test says (no crownest server needed).
import assert from "node:assert/strict";
import http from "node:http";
import type { AddressInfo } from "node:net";
import { after, before, beforeEach, describe, test } from "node:test";

import { CrowNestApiError, CrowNestTimeoutError, createCrowNestClient, parseRetryAfter } from "@crownest/sdk";

interface Seen {
  method: string;
  url: string;
  headers: http.IncomingHttpHeaders;
  at: number;
}

type Answer = (req: http.IncomingMessage, res: http.ServerResponse, n: number) => void;

let server: http.Server;
let baseUrl: string;
let seen: Seen[] = [];
let answer: Answer = (_req, res) => res.end();

const SANDBOX = {
  id: "sbx_fake",
  status: "running",
  template: "python",
  createdAt: "2026-01-01T00:00:00Z",
  expiresAt: "2026-01-01T00:10:00Z",
  metadata: {},
  vcpus: 1,
  memoryMiB: 512,
  runtime: "oci",
  network: { mode: "none", allow: [], deny: [], bytesIn: 0, bytesOut: 0 },
};

function json(res: http.ServerResponse, status: number, body: unknown, headers: Record<string, string> = {}): void {
  res.writeHead(status, { "content-type": "application/json", ...headers });
  res.end(JSON.stringify(body));
}

function envelope(code: string, message = code): { error: { code: string; message: string; details: object } } {
  return { error: { code, message, details: {} } };
}

before(async () => {
  server = http.createServer((req, res) => {
    seen.push({ method: req.method!, url: req.url!, headers: req.headers, at: Date.now() });
    req.resume();
    req.on("end", () => answer(req, res, seen.length));
  });
  await new Promise<void>((r) => server.listen(0, "127.0.0.1", r));
  baseUrl = `http://127.0.0.1:${(server.address() as AddressInfo).port}`;
});

after(async () => {
  server.closeAllConnections();
  await new Promise<void>((r) => server.close(() => r()));
});

beforeEach(() => {
  seen = [];
});

function client(options: { timeoutMs?: number; maxRetries?: number } = {}) {
  return createCrowNestClient({ apiKey: "cn_live_test", baseUrl, ...options });
}

/** The milliseconds between consecutive requests. */
function gaps(): number[] {
  return seen.slice(1).map((s, i) => s.at - seen[i]!.at);
}

describe("Retry-After", () => {
  test("parses delay-seconds and HTTP dates; anything else is null", () => {
    const now = Date.parse("2026-10-21T07:28:00Z");
    assert.equal(parseRetryAfter("3", now), 3000);
    assert.equal(parseRetryAfter(" 0 ", now), 0);
    assert.equal(parseRetryAfter("Wed, 21 Oct 2026 07:28:02 GMT", now), 2000);
    assert.equal(parseRetryAfter("Wed, 21 Oct 2026 07:27:00 GMT", now), 0, "a date in the past: now");
    assert.equal(parseRetryAfter("1.5", now), null);
    assert.equal(parseRetryAfter("-1", now), null);
    assert.equal(parseRetryAfter("soon", now), null);
    assert.equal(parseRetryAfter(null, now), null);
  });

  test("a GET answered 503 with Retry-After: 1 is sent again after a second, then succeeds", async () => {
    answer = (_req, res, n) =>
      n === 1 ? json(res, 503, envelope("sandbox_busy"), { "retry-after": "1" }) : json(res, 200, SANDBOX);
    const sandbox = await client().sandboxes.get("sbx_fake");
    assert.equal(sandbox.id, "sbx_fake");
    assert.equal(seen.length, 2);
    assert.ok(gaps()[0]! >= 950, `waited ${gaps()[0]} ms, Retry-After said 1 s`);
  });

  test("an HTTP-date Retry-After is honoured", async () => {
    answer = (_req, res, n) =>
      n === 1
        ? json(res, 503, envelope("sandbox_busy"), { "retry-after": new Date(Date.now() + 2000).toUTCString() })
        : json(res, 200, SANDBOX);
    await client().sandboxes.get("sbx_fake");
    assert.equal(seen.length, 2);
    // The date has a one-second resolution: the wait is 1 … 2 s.
    assert.ok(gaps()[0]! >= 950, `waited ${gaps()[0]} ms`);
  });

  test("429 rate_limited is retried after its Retry-After; 429 quota_exceeded is not", async () => {
    answer = (_req, res, n) =>
      n === 1 ? json(res, 429, envelope("rate_limited"), { "retry-after": "1" }) : json(res, 200, SANDBOX);
    await client().sandboxes.get("sbx_fake");
    assert.equal(seen.length, 2);
    assert.ok(gaps()[0]! >= 950);

    seen = [];
    answer = (_req, res) => json(res, 429, envelope("quota_exceeded"));
    await assert.rejects(client().sandboxes.get("sbx_fake"), (e) => e instanceof CrowNestApiError && e.code === "quota_exceeded");
    assert.equal(seen.length, 1);
  });
});

describe("which requests are retried", () => {
  test("a keyed create that got 503 capacity_exhausted is retried with the same Idempotency-Key", async () => {
    answer = (_req, res, n) => (n === 1 ? json(res, 503, envelope("capacity_exhausted"), { "retry-after": "0" }) : json(res, 201, SANDBOX));
    const sandbox = await client().sandboxes.create({ template: "python" });
    assert.equal(sandbox.id, "sbx_fake");
    assert.equal(seen.length, 2);
    const [first, second] = seen.map((s) => s.headers["idempotency-key"]);
    assert.match(String(first), /^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$/);
    assert.equal(second, first);
  });

  test("502 and 504 of a keyed run are retried (backoff without Retry-After)", async () => {
    answer = (_req, res) => json(res, 200, SANDBOX);
    const sandbox = await client().sandboxes.get("sbx_fake");
    seen = [];
    answer = (_req, res, n) =>
      n === 1
        ? json(res, 502, envelope("bad_gateway"))
        : n === 2
          ? json(res, 504, envelope("gateway_timeout"))
          : json(res, 200, { id: "cmd_1", status: "completed", exitCode: 0 });
    const run = await sandbox.commands.run("true");
    assert.equal(run.exitCode, 0);
    assert.deepEqual(seen.map((s) => s.method), ["POST", "POST", "POST"]);
    assert.equal(new Set(seen.map((s) => s.headers["idempotency-key"])).size, 1);
  });

  test("every mutating call carries a key: a mkdir that got 502 is retried with the same one", async () => {
    answer = (_req, res) => json(res, 200, SANDBOX);
    const sandbox = await client().sandboxes.get("sbx_fake");
    assert.equal(seen[0]!.headers["idempotency-key"], undefined, "a GET carries none");
    seen = [];
    answer = (_req, res, n) =>
      n === 1 ? json(res, 502, envelope("bad_gateway")) : json(res, 200, { name: "d", path: "/workspace/d", type: "dir", size: 0 });
    assert.equal((await sandbox.files.mkdir("d")).path, "/workspace/d");
    assert.deepEqual(seen.map((s) => s.method), ["POST", "POST"]);
    assert.match(String(seen[0]!.headers["idempotency-key"]), /^[0-9a-f-]{36}$/);
    assert.equal(seen[1]!.headers["idempotency-key"], seen[0]!.headers["idempotency-key"]);
    // Each call has its own key.
    seen = [];
    answer = (_req, res) => json(res, 200, { ...SANDBOX, status: "destroyed" });
    await client().sandboxes.kill("sbx_fake");
    await client().sandboxes.kill("sbx_fake");
    const [a, b] = seen.map((s) => s.headers["idempotency-key"]);
    assert.ok(a && b && a !== b, `two kills, two keys: ${a} ${b}`);
  });

  test("a keyed create whose connection dropped before the answer is sent again with the same key", async () => {
    answer = (req, res, n) => (n === 1 ? req.socket.destroy() : json(res, 201, SANDBOX));
    const sandbox = await client().sandboxes.create({ template: "python" });
    assert.equal(sandbox.id, "sbx_fake");
    assert.equal(seen.length, 2);
    assert.equal(seen[1]!.headers["idempotency-key"], seen[0]!.headers["idempotency-key"]);
  });

  test("a file upload carries no key: a whole-file PUT is retried as it is, a streamed one is sent once", async () => {
    answer = (_req, res) => json(res, 200, SANDBOX);
    const sandbox = await client().sandboxes.get("sbx_fake");
    const file = { name: "f", path: "/workspace/f", type: "file", size: 2 };
    seen = [];
    answer = (_req, res, n) => (n === 1 ? json(res, 503, envelope("sandbox_busy"), { "retry-after": "0" }) : json(res, 200, file));
    await sandbox.files.write("f", "hi");
    assert.deepEqual(seen.map((s) => [s.method, s.headers["idempotency-key"]]), [["PUT", undefined], ["PUT", undefined]]);
    seen = [];
    answer = (_req, res) => json(res, 503, envelope("sandbox_busy"), { "retry-after": "0" });
    const stream = new ReadableStream<Uint8Array>({
      start(c) {
        c.enqueue(new Uint8Array([104, 105]));
        c.close();
      },
    });
    await assert.rejects(sandbox.files.write("f", stream, { size: 2 }), (e) => e instanceof CrowNestApiError && e.status === 503);
    assert.deepEqual(seen.map((s) => s.method), ["PUT"], "a stream is read once: not retried");
  });

  test("a 4xx other than 429 and 409 idempotency_key_in_use is final", async () => {
    answer = (_req, res) => json(res, 400, envelope("invalid_request"));
    await assert.rejects(client().sandboxes.get("sbx_fake"), (e) => e instanceof CrowNestApiError && e.status === 400);
    assert.equal(seen.length, 1);
  });

  test("at most maxRetries retries", async () => {
    answer = (_req, res) => json(res, 503, envelope("sandbox_busy"), { "retry-after": "0" });
    await assert.rejects(client({ maxRetries: 2 }).sandboxes.get("sbx_fake"), (e) => e instanceof CrowNestApiError && e.status === 503);
    assert.equal(seen.length, 3);
  });
});

describe("one deadline per call", () => {
  test("timeout 2 s against a server that always says 503 Retry-After: 1 fails within 3 s", async () => {
    answer = (_req, res) => json(res, 503, envelope("capacity_exhausted"), { "retry-after": "1" });
    const started = Date.now();
    await assert.rejects(
      client({ timeoutMs: 2000, maxRetries: 10 }).sandboxes.create({ template: "python" }),
      (e) => e instanceof CrowNestApiError && e.code === "capacity_exhausted",
    );
    const took = Date.now() - started;
    assert.ok(took < 3000, `took ${took} ms`);
    // 0 s, 1 s, (2 s would be past the deadline): two or three attempts, never ten.
    assert.ok(seen.length >= 2 && seen.length <= 3, `${seen.length} attempts`);
  });

  test("a Retry-After longer than what is left is not slept: the error comes at once", async () => {
    answer = (_req, res) => json(res, 503, envelope("sandbox_busy"), { "retry-after": "30" });
    const started = Date.now();
    await assert.rejects(client({ timeoutMs: 5000 }).sandboxes.get("sbx_fake"), (e) => e instanceof CrowNestApiError && e.status === 503);
    assert.ok(Date.now() - started < 1000, `took ${Date.now() - started} ms`);
    assert.equal(seen.length, 1);
  });

  test("requestTimeoutMs bounds one call below the client's timeout; the next call has the client's", async () => {
    answer = (_req, res, n) => {
      if (n === 1) setTimeout(() => json(res, 200, SANDBOX), 5000); // too late for the first call
      else json(res, 200, SANDBOX);
    };
    const c = client({ timeoutMs: 60_000 });
    const started = Date.now();
    await assert.rejects(c.sandboxes.get("sbx_fake", { requestTimeoutMs: 1000 }), CrowNestTimeoutError);
    const took = Date.now() - started;
    assert.ok(took >= 950 && took < 2000, `took ${took} ms`);
    assert.equal(seen.length, 1, "a timed-out attempt is not retried past the deadline");
    assert.equal((await c.sandboxes.get("sbx_fake")).id, "sbx_fake");
  });

  test("the client's timeoutMs bounds a body that stalls after the headers", async () => {
    answer = (_req, res) => {
      res.writeHead(200, { "content-type": "application/json" });
      res.write('{"id": "sbx_fake",'); // and never the rest
    };
    const started = Date.now();
    await assert.rejects(client({ timeoutMs: 1000 }).sandboxes.get("sbx_fake"), CrowNestTimeoutError);
    assert.ok(Date.now() - started < 2000);
  });
});
