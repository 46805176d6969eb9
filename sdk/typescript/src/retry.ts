/**
 * When the SDK retries a request, and how long it waits: pure functions,
 * so the policy is readable in one place (`CrowNestClient.send` applies it
 * within one deadline per call).
 */

/** Exponential backoff with jitter: ~250 ms, 500 ms, 1 s, … capped at 8 s. */
export function backoff(attempt: number): number {
  return Math.min(8000, 250 * 2 ** attempt) * (0.5 + Math.random() / 2);
}

/**
 * A `Retry-After` header as milliseconds from `now`: delay-seconds (`"3"`)
 * or an HTTP date (`"Wed, 21 Oct 2026 07:28:00 GMT"`, 0 when it has
 * passed); `null` when absent or unreadable.
 */
export function parseRetryAfter(value: string | null | undefined, now = Date.now()): number | null {
  if (value === null || value === undefined) return null;
  const text = value.trim();
  if (/^\d+$/.test(text)) return Number(text) * 1000;
  if (!/[a-z]/i.test(text)) return null; // "1.5", "-1": neither form
  const at = Date.parse(text);
  return Number.isNaN(at) ? null : Math.max(0, at - now);
}

/** Methods whose repetition does what one request does, without a key.
 * (Not DELETE: a repeated kill or file delete answers 410 or 404 after the
 * first one worked. The client sends a key with every mutating call but
 * raw-byte uploads, so this decides for those uploads and for GETs.) */
const IDEMPOTENT = new Set(["GET", "HEAD", "PUT"]);

/** Errors that no wait will cure, though sent with a status that usually is transient. */
const PERMANENT_CODES = new Set(["quota_exceeded", "template_unavailable", "too_many_watches", "too_many_streams"]);

/**
 * Whether an error response may be sent again:
 * - 429 (`rate_limited`, or any 429 with `Retry-After`) always: the server
 *   refused it before doing anything;
 * - 502, 503 (`capacity_exhausted`, `sandbox_busy`, …) and 504 when the
 *   request is idempotent: GET or PUT (of a whole file), or carrying an
 *   Idempotency-Key (the server does not store a 5xx answer under the key,
 *   so the retry is a fresh attempt, and a success is stored once);
 * - 409 `idempotency_key_in_use`: our own earlier attempt with this key is
 *   still being processed; the retry gets its stored answer.
 */
export function mayRetryStatus(
  method: string,
  keyed: boolean,
  status: number,
  code: string,
  retryAfter: number | null,
): boolean {
  if (PERMANENT_CODES.has(code)) return false;
  if (status === 429) return code === "rate_limited" || retryAfter !== null;
  if (status === 502 || status === 503 || status === 504) return keyed || IDEMPOTENT.has(method);
  return status === 409 && keyed && code === "idempotency_key_in_use";
}

/** A network error's code (`ECONNREFUSED`, …), looked for along its causes. */
function errorCode(error: unknown): string | undefined {
  let e: unknown = error;
  for (let i = 0; i < 4 && e; i++) {
    const code = (e as { code?: unknown }).code;
    if (typeof code === "string") return code;
    e = (e as { cause?: unknown }).cause;
  }
  return undefined;
}

/** Whether a request that failed on the network may be sent again: a
 * connection that could not be made never reached the server; otherwise
 * only idempotent requests (GET, PUT of a whole file, and requests
 * carrying an Idempotency-Key). */
export function mayRetryNetwork(method: string, keyed: boolean, error: unknown): boolean {
  const code = errorCode(error);
  if (code === "ECONNREFUSED" || code === "UND_ERR_CONNECT_TIMEOUT" || code === "ENOTFOUND") return true;
  return keyed || IDEMPOTENT.has(method);
}
