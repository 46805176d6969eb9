// Helpers shared by the test files.
import assert from "node:assert/strict";

import { CrowNestApiError } from "@crownest/sdk";

/** Awaits `promise` and checks that it failed with this status and code. */
export async function rejectsWith(promise: Promise<unknown>, status: number, code: string): Promise<CrowNestApiError> {
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

export interface SentRequest {
  method: string;
  url: URL;
}

/** Records the requests `globalThis.fetch` sends while `body` runs (the
 * SDK's own requests go through it). */
export async function recordingFetch<T>(body: (sent: SentRequest[]) => Promise<T>): Promise<T> {
  const original = globalThis.fetch;
  const sent: SentRequest[] = [];
  globalThis.fetch = ((input: string | URL | Request, init?: RequestInit) => {
    const url = new URL(input instanceof Request ? input.url : String(input));
    sent.push({ method: (init?.method ?? (input instanceof Request ? input.method : "GET")).toUpperCase(), url });
    return original(input, init);
  }) as typeof fetch;
  try {
    return await body(sent);
  } finally {
    globalThis.fetch = original;
  }
}

export function sleep(ms: number): Promise<void> {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

/** Polls `check` every `everyMs` until it returns a value other than
 * undefined, or fails after `timeoutMs`. */
export async function eventually<T>(what: string, check: () => Promise<T | undefined> | T | undefined, timeoutMs = 15_000, everyMs = 200): Promise<T> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const value = await check();
    if (value !== undefined) return value;
    if (Date.now() > deadline) assert.fail(`timed out waiting for ${what}`);
    await sleep(everyMs);
  }
}
