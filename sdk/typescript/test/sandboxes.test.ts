// Sandbox lifecycle calls against a live crownest server (started for this
// file): kill by id, setTimeout, list filters, metrics (and their stream),
// `await using`, code contexts' restart, usage and audit events.
import assert from "node:assert/strict";
import { randomUUID } from "node:crypto";
import { after, before, describe, test } from "node:test";

import { createCrowNestClient, type AuditAction, type CrowNestClient, type Sandbox, type SandboxMetrics } from "@crownest/sdk";
import { eventually, recordingFetch, rejectsWith } from "./helpers.js";
import { startServer, type TestServer } from "./server.js";

let server: TestServer;
let client: CrowNestClient;
const live: Sandbox[] = [];

async function newSandbox(options: Record<string, unknown> = {}): Promise<Sandbox> {
  const sandbox = await client.sandboxes.create({ template: "python", ...options });
  live.push(sandbox);
  return sandbox;
}

before(async () => {
  server = await startServer();
  client = createCrowNestClient({ apiKey: server.mintKey("sdk-ts-sandboxes"), baseUrl: server.baseUrl });
});

after(async () => {
  for (const s of live) await s.kill().catch(() => undefined);
  await server?.stop();
});

describe("kill by id", () => {
  test("one DELETE destroys the sandbox and resolves to its tombstone; a second kill is sandbox_destroyed", async () => {
    const sandbox = await newSandbox();
    const killed = await recordingFetch(async (sent) => {
      const tombstone = await client.sandboxes.kill(sandbox.id);
      assert.deepEqual(sent.map((r) => `${r.method} ${r.url.pathname}`), [`DELETE /v1/sandboxes/${sandbox.id}`]);
      return tombstone;
    });
    assert.deepEqual([killed.id, killed.status, killed.endReason], [sandbox.id, "destroyed", "killed"]);
    assert.equal((await client.sandboxes.get(sandbox.id)).status, "destroyed");
    await rejectsWith(client.sandboxes.kill(sandbox.id), 410, "sandbox_destroyed");
    await rejectsWith(client.sandboxes.kill("sbx_does_not_exist"), 404, "not_found");
  });
});

describe("setTimeout", () => {
  test("moves expiresAt to now + ttlMs, later or earlier; a ttl outside the bounds is invalid_request", async () => {
    const sandbox = await newSandbox({ ttlMs: 120_000 });
    const initial = Date.parse(sandbox.expiresAt);
    const asked = Date.now();
    await sandbox.setTimeout(600_000);
    const extended = Date.parse(sandbox.expiresAt);
    assert.ok(extended > initial + 400_000, `expiresAt ${sandbox.expiresAt} moved later`);
    assert.ok(Math.abs(extended - (asked + 600_000)) < 10_000, `expiresAt ≈ now + 600 s, got ${sandbox.expiresAt}`);
    const shortened = await client.sandboxes.setTimeout(sandbox.id, 60_000);
    assert.ok(Date.parse(shortened.expiresAt) < extended - 400_000, "and earlier");
    assert.equal((await client.sandboxes.get(sandbox.id)).expiresAt, shortened.expiresAt);
    const tooShort = await rejectsWith(sandbox.setTimeout(1), 400, "invalid_request");
    assert.equal(tooShort.details.field, "ttlMs");
    await rejectsWith(sandbox.setTimeout(400 * 24 * 3_600_000), 400, "invalid_request");
    await sandbox.kill();
    await rejectsWith(client.sandboxes.setTimeout(sandbox.id, 60_000), 410, "sandbox_destroyed");
  });

  test("a sandbox shortened to a second expires", async () => {
    const sandbox = await newSandbox();
    await sandbox.setTimeout(1000);
    const ended = await eventually("the sandbox to expire", async () => {
      const s = await client.sandboxes.get(sandbox.id);
      return s.status === "destroyed" ? s : undefined;
    }, 30_000, 250);
    assert.equal(ended.endReason, "expired");
  });
});

describe("list filters", () => {
  test("status, template, metadata[KEY], createdAfter/createdBefore, with pages", async () => {
    const suite = randomUUID();
    const a = await newSandbox({ metadata: { suite, job: "demo", n: 1 } });
    const b = await newSandbox({ metadata: { suite, job: "other", n: 2 } });
    const c = await newSandbox({ metadata: { suite, job: "demo", n: 3, flag: true } });
    await c.kill();
    const ids = async (options: Parameters<CrowNestClient["sandboxes"]["list"]>[0]) =>
      (await client.sandboxes.list(options).toArray()).map((s) => s.id);

    // Newest first; only this test's sandboxes.
    assert.deepEqual(await ids({ metadata: { suite } }), [c.id, b.id, a.id]);
    assert.deepEqual(await ids({ metadata: { suite, job: "demo" } }), [c.id, a.id]);
    assert.deepEqual(await ids({ metadata: { suite, job: "demo" }, status: "running" }), [a.id]);
    assert.deepEqual(await ids({ metadata: { suite }, status: "destroyed" }), [c.id]);
    // Numbers and booleans match by their JSON text.
    assert.deepEqual(await ids({ metadata: { suite, n: 2 } }), [b.id]);
    assert.deepEqual(await ids({ metadata: { suite, flag: true } }), [c.id]);
    assert.deepEqual(await ids({ metadata: { suite, job: "nobody" } }), []);
    assert.deepEqual(await ids({ metadata: { suite }, template: "python" }), [c.id, b.id, a.id]);
    assert.deepEqual(await ids({ metadata: { suite }, template: "node" }), []);
    // Time bounds, as a Date or a string; both exclusive.
    assert.deepEqual(await ids({ metadata: { suite }, createdAfter: new Date(b.createdAt) }), [c.id]);
    assert.deepEqual(await ids({ metadata: { suite }, createdBefore: b.createdAt }), [a.id]);
    assert.deepEqual(await ids({ metadata: { suite }, createdAfter: a.createdAt, createdBefore: c.createdAt }), [b.id]);
    // The cursor keeps the filters: pages of one.
    const pages: string[][] = [];
    for await (const page of client.sandboxes.list({ metadata: { suite, job: "demo" }, limit: 1 }).pages()) pages.push(page.map((s) => s.id));
    assert.deepEqual(pages, [[c.id], [a.id]]);
    // Bad values are refused.
    await rejectsWith(client.sandboxes.list({ status: "paused" as never }).toArray(), 400, "invalid_request");
    await rejectsWith(client.sandboxes.list({ createdAfter: "yesterday" }).toArray(), 400, "invalid_request");
  });
});

describe("metrics", () => {
  test("cpuUsageSeconds grows while a command burns CPU; the fields are there", async () => {
    const sandbox = await newSandbox();
    const first = await sandbox.metrics();
    assert.equal(first.sandboxId, sandbox.id);
    assert.ok(!Number.isNaN(Date.parse(first.timestamp)));
    for (const field of ["cpuUsageSeconds", "cpuPercent", "vcpus", "memoryUsedBytes", "memoryLimitBytes", "pids", "pidsLimit",
      "workspaceUsedBytes", "workspaceLimitBytes", "networkBytesIn", "networkBytesOut"] as const) {
      assert.equal(typeof first[field], "number", `${field}: ${JSON.stringify(first)}`);
    }
    assert.equal(first.vcpus, sandbox.vcpus);
    assert.ok(first.memoryLimitBytes > 0 && first.memoryUsedBytes > 0);
    const burner = await sandbox.commands.start("timeout 20 sh -c 'while :; do :; done'");
    const grown = await eventually("cpuUsageSeconds to grow by a second", async () => {
      const m = await client.sandboxes.metrics(sandbox.id);
      return m.cpuUsageSeconds >= first.cpuUsageSeconds + 1 ? m : undefined;
    }, 15_000, 500);
    assert.ok(grown.pids >= 2, `the burner's processes count: ${grown.pids}`);
    const busy = await eventually("cpuPercent to show the busy CPU", async () => {
      const m = await sandbox.metrics();
      return m.cpuPercent > 30 ? m : undefined;
    }, 10_000, 500);
    assert.ok(busy.cpuPercent <= 100 * sandbox.vcpus + 20, `cpuPercent ${busy.cpuPercent}`);
    await burner.cancel();
  });

  test("metricsStream yields about every second and ends when the sandbox ends", async () => {
    const sandbox = await newSandbox();
    const received: { at: number; m: SandboxMetrics }[] = [];
    for await (const m of sandbox.metricsStream()) {
      received.push({ at: Date.now(), m });
      if (received.length === 3) break; // stopping the loop closes the stream
    }
    assert.ok(received.every((r) => r.m.sandboxId === sandbox.id));
    const span = received[2]!.at - received[0]!.at;
    assert.ok(span >= 1000 && span < 6000, `3 events over ${span} ms`);

    // Until `end`: the loop finishes by itself once the sandbox is killed.
    let count = 0;
    const ended = (async () => {
      for await (const m of client.sandboxes.metricsStream(sandbox.id)) {
        assert.equal(m.sandboxId, sandbox.id);
        count++;
      }
      return Date.now();
    })();
    await eventually("a first streamed event", () => (count > 0 ? true : undefined), 10_000, 100);
    const killedAt = Date.now();
    await sandbox.kill();
    const endedAt = await ended;
    assert.ok(endedAt - killedAt < 10_000, `the stream ended ${endedAt - killedAt} ms after the kill`);
    await rejectsWith(sandbox.metrics(), 410, "sandbox_destroyed");
  });

  test("metricsStream stops on its signal", async () => {
    const sandbox = await newSandbox();
    const controller = new AbortController();
    let count = 0;
    for await (const _ of sandbox.metricsStream({ signal: controller.signal })) {
      if (++count === 1) controller.abort();
    }
    assert.equal(count, 1);
  });
});

describe("await using", () => {
  test("a sandbox is killed when its scope ends; one already killed is fine", async () => {
    let id: string;
    {
      await using sandbox = await client.sandboxes.create({ template: "python" });
      id = sandbox.id;
      assert.equal((await client.sandboxes.get(id)).status, "running");
    }
    const disposed = await client.sandboxes.get(id);
    assert.deepEqual([disposed.status, disposed.endReason], ["destroyed", "killed"]);
    {
      await using sandbox = await client.sandboxes.create({ template: "python" });
      await sandbox.kill(); // the dispose then meets 410 sandbox_destroyed, and ignores it
    }
  });

  test("the scope's own error is what propagates", async () => {
    let id = "";
    await assert.rejects(
      (async () => {
        await using sandbox = await client.sandboxes.create({ template: "python" });
        id = sandbox.id;
        throw new Error("the body failed");
      })(),
      /the body failed/,
    );
    assert.equal((await client.sandboxes.get(id)).status, "destroyed");
  });
});

describe("code contexts", () => {
  test("restartContext: same id, a fresh interpreter without the old variables", async () => {
    const sandbox = await newSandbox();
    const context = await sandbox.code.createContext({ language: "python" });
    await sandbox.code.run({ contextId: context, code: "value = 42" });
    assert.equal((await sandbox.code.run({ contextId: context, code: "print(value)" })).stdout.join(""), "42\n");
    const restarted = await sandbox.code.restartContext(context.id);
    assert.deepEqual([restarted.id, restarted.language, restarted.sandboxId], [context.id, "python", sandbox.id]);
    const fresh = await sandbox.code.run({ contextId: context.id, code: "print(value)" });
    assert.equal(fresh.error?.name, "NameError");
    assert.equal((await sandbox.code.run({ contextId: context, code: "print(1 + 1)" })).stdout.join(""), "2\n");
    await rejectsWith(sandbox.code.restartContext("cctx_does_not_exist"), 404, "not_found");
  });
});

describe("usage and audit", () => {
  test("usage.get: per sandbox, per day, a window; a bad groupBy is invalid_request", async () => {
    const sandbox = await newSandbox();
    await sandbox.commands.run("sleep 1.2");
    const report = await client.usage.get();
    assert.equal(report.groupBy, "sandbox");
    const line = report.data.find((l) => l.key === sandbox.id);
    assert.ok(line, `a line for ${sandbox.id}: ${JSON.stringify(report.data)}`);
    assert.ok(line.seconds >= 1 && line.computeUnitSeconds >= line.seconds * Math.min(1, sandbox.vcpus));
    assert.ok(report.totalComputeUnitSeconds >= line.computeUnitSeconds);
    const days = await client.usage.get({ groupBy: "day", from: new Date(Date.now() - 86_400_000), to: new Date(Date.now() + 60_000) });
    assert.equal(days.groupBy, "day");
    assert.ok(days.data.some((l) => l.key === new Date().toISOString().slice(0, 10)));
    const empty = await client.usage.get({ from: "2020-01-01T00:00:00Z", to: "2020-01-02T00:00:00Z" });
    assert.deepEqual([empty.data, empty.totalComputeUnitSeconds], [[], 0]);
    await rejectsWith(client.usage.get({ groupBy: "week" as never }), 400, "invalid_request");
  });

  test("audit.list: a sandbox's create, timeout and kill, filtered and paged", async () => {
    const sandbox = await newSandbox();
    await sandbox.setTimeout(300_000);
    await sandbox.kill();
    const events = await client.audit.list({ resourceId: sandbox.id }).toArray();
    const actions = events.map((e) => e.action);
    const expected: AuditAction[] = ["sandbox.create", "sandbox.timeout", "sandbox.kill"];
    for (const action of expected) assert.ok(actions.includes(action), `${action} in ${actions.join(", ")}`);
    assert.ok(events.every((e) => e.resourceId === sandbox.id && e.outcome === "success"));
    const kills = await client.audit.list({ resourceId: sandbox.id, action: "sandbox.kill" }).toArray();
    assert.deepEqual(kills.map((e) => e.action), ["sandbox.kill"]);
    const pages: number[] = [];
    for await (const page of client.audit.list({ resourceId: sandbox.id, limit: 1 }).pages()) pages.push(page.length);
    assert.equal(pages.length, events.length);
    assert.deepEqual(await client.audit.list({ resourceId: sandbox.id, to: new Date(Date.parse(events.at(-1)!.at)) }).toArray(), []);
    await rejectsWith(client.audit.list({ action: "sandbox.explode" as never }).toArray(), 400, "invalid_request");
  });
});
