/**
 * The CrowNest client: `createCrowNestClient()` and the resources under it
 * (sandboxes, their commands, code, files, artifacts and previews;
 * templates, Workspace Runs, usage and audit events). Every call goes
 * through `CrowNestClient.send`, which owns authentication, idempotency
 * keys, retries (retry.ts) and the one deadline per call.
 */
import { DIRECT_UPLOAD_MAX, nodeFs, openAsBlob, packDirectory } from "./archive.js";
import {
  CrowNestApiError,
  CrowNestConnectionError,
  CrowNestError,
  CrowNestTimeoutError,
  apiErrorFromResponse,
} from "./errors.js";
import { backoff, mayRetryNetwork, mayRetryStatus, parseRetryAfter } from "./retry.js";
import { SSEDecoder, lines, type ServerSentEvent } from "./sse.js";
import type {
  ArchiveSpec,
  ArtifactData,
  ArtifactPolicy,
  AuditAction,
  AuditEvent,
  CodeContextData,
  CodeLanguage,
  CodeOutput,
  CollectSpec,
  CommandData,
  CommandResult,
  EvidenceBundle,
  EvidenceKey,
  ExitInfo,
  FileData,
  FileListing,
  LogEvent,
  NetworkPolicyRequest,
  Page,
  PreviewData,
  RunCodeResult,
  SandboxData,
  SandboxMetrics,
  SandboxStatus,
  TemplateData,
  TransferData,
  UsageGroupBy,
  UsageReport,
  WatchEndReason,
  WatchEvent,
  WorkspaceRun,
  WorkspaceRunArtifactSpec,
  WorkspaceRunEvent,
  WorkspaceRunEventPage,
  WorkspaceRunStatus,
} from "./types.js";

export const VERSION = "0.1.0";
export const DEFAULT_BASE_URL = "http://127.0.0.1:7420";

// `await using sandbox = await client.sandboxes.create(…)` (TypeScript
// 5.2+) looks the dispose method up by `Symbol.asyncDispose`, which older
// runtimes (Node 18, early 20) lack: define it where missing, as the
// TypeScript handbook suggests, before any class below uses it.
(Symbol as { asyncDispose?: symbol }).asyncDispose ??= Symbol.for("Symbol.asyncDispose");

declare global {
  // So that the `.d.ts` of `Sandbox[Symbol.asyncDispose]` type-checks in
  // a project without the `esnext.disposable` lib or Node's types.
  interface SymbolConstructor {
    readonly asyncDispose: unique symbol;
  }
}

export interface ClientOptions {
  /** Org-scoped API key; default `process.env.CROWNEST_API_KEY`. */
  apiKey?: string;
  /** Default `process.env.CROWNEST_BASE_URL`, else `http://127.0.0.1:7420`. */
  baseUrl?: string;
  /** How long one call may take, its retries included, in milliseconds
   * (default 660 000: a blocking run waits for its command within one
   * request). Each method's `requestTimeoutMs` overrides it for one call. */
  timeoutMs?: number;
  /** Retries of a request that failed on the network or with a transient
   * status (429, 502, 503, 504; see retry.ts), default 3. */
  maxRetries?: number;
}

/** Options every call takes. */
export interface CallOptions {
  /** This call's overall timeout in milliseconds, retries and their waits
   * included (default: the client's `timeoutMs`). Past it the call throws
   * `CrowNestTimeoutError`. (`timeoutMs` of a command or Code Run is the
   * server's limit on the command itself.) */
  requestTimeoutMs?: number;
}

type QueryValue = string | number | boolean | undefined;

interface RequestOptions {
  json?: unknown;
  body?: Uint8Array | Blob | ReadableStream<Uint8Array>;
  query?: Record<string, QueryValue>;
  idempotencyKey?: string;
  headers?: Record<string, string>;
  /** `path` is a signed transfer URL: sent once, without the API key. */
  signed?: boolean;
  /** The call's overall timeout (default: the client's). */
  timeoutMs?: number;
  /** The call's deadline (`Date.now()` time), for a call made of several
   * requests; wins over `timeoutMs`. */
  deadline?: number;
  /** The response body is a stream read at the caller's pace: the timeout
   * covers the answer's headers only, and `signal` ends the stream. */
  stream?: boolean;
  signal?: AbortSignal;
}

function env(name: string): string | undefined {
  const p = (globalThis as { process?: { env?: Record<string, string | undefined> } }).process;
  return p?.env?.[name] || undefined;
}

function sleep(ms: number): Promise<void> {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

interface NodeCrypto {
  randomUUID(): string;
}

let nodeCrypto: Promise<NodeCrypto> | undefined;

/** A random UUID for an Idempotency-Key: `node:crypto`'s on Node (Node
 * 18's global `crypto` is not there unflagged), the Web Crypto one
 * elsewhere. */
async function newIdempotencyKey(): Promise<string> {
  if (runsOnNode()) {
    nodeCrypto ??= import(/* webpackIgnore: true */ /* @vite-ignore */ "node:crypto" as string) as Promise<NodeCrypto>;
    return (await nodeCrypto).randomUUID();
  }
  return (globalThis as unknown as { crypto: NodeCrypto }).crypto.randomUUID();
}

function toBytes(data: string | Uint8Array): Uint8Array {
  return typeof data === "string" ? new TextEncoder().encode(data) : data;
}

function base64(bytes: Uint8Array): string {
  let binary = "";
  for (const b of bytes) binary += String.fromCharCode(b);
  return btoa(binary);
}

/** An RFC 3339 time for a query parameter. */
function rfc3339(time: Date | string | undefined): string | undefined {
  return time instanceof Date ? time.toISOString() : time;
}

function isAsyncIterable(value: unknown): value is AsyncIterable<unknown> {
  return typeof value === "object" && value !== null && Symbol.asyncIterator in value;
}

/** An async iterable of bytes or text as a `ReadableStream` (Node 18 has no `ReadableStream.from`). */
function streamOf(source: AsyncIterable<Uint8Array | string>): ReadableStream<Uint8Array> {
  const iterator = source[Symbol.asyncIterator]();
  return new ReadableStream<Uint8Array>({
    async pull(controller) {
      const { value, done } = await iterator.next();
      if (done) controller.close();
      else controller.enqueue(typeof value === "string" ? new TextEncoder().encode(value) : value);
    },
    async cancel(reason) {
      await iterator.return?.(reason);
    },
  });
}

const OCTET_STREAM = { "content-type": "application/octet-stream" };

// ------------------------------------------------------------------ preview requests over loopback

/** `localhost` or a name under it (`prv-….localhost`, the default preview
 * domain). Browsers resolve these to loopback on their own; Node's resolver
 * (and so its `fetch`) often does not. */
function isLoopbackName(hostname: string): boolean {
  const host = hostname.toLowerCase().replace(/\.$/, "");
  return host === "localhost" || host.endsWith(".localhost");
}

function runsOnNode(): boolean {
  const p = (globalThis as { process?: { versions?: { node?: unknown } } }).process;
  return typeof p?.versions?.node === "string";
}

/** The part of `node:http` / `node:https` used here (the SDK does not
 * depend on Node's type declarations, and loads the modules only when a
 * `*.localhost` preview is requested). */
interface NodeIncomingMessage {
  readonly statusCode?: number;
  readonly statusMessage?: string;
  readonly rawHeaders: string[];
  readonly complete: boolean;
  on(event: "data", listener: (chunk: Uint8Array) => void): unknown;
  on(event: "end" | "close", listener: () => void): unknown;
  on(event: "error", listener: (error: Error) => void): unknown;
  pause(): unknown;
  resume(): unknown;
  destroy(error?: Error): unknown;
}

interface NodeClientRequest {
  on(event: "response", listener: (response: NodeIncomingMessage) => void): unknown;
  on(event: "error", listener: (error: Error) => void): unknown;
  once(event: "drain" | "close", listener: () => void): unknown;
  write(chunk: Uint8Array): boolean;
  end(chunk?: Uint8Array): unknown;
  destroy(error?: Error): unknown;
}

interface NodeHttpModule {
  request(options: {
    host: string;
    port: number;
    path: string;
    method: string;
    headers: Record<string, string>;
    /** TLS: the name to send (SNI) and verify the certificate against. */
    servername?: string;
  }): NodeClientRequest;
}

const LOOPBACK_ADDRESS = "127.0.0.1";
const REDIRECT_STATUSES = new Set([301, 302, 303, 307, 308]);
const NULL_BODY_STATUSES = new Set([101, 103, 204, 205, 304]);
/** Dropped when a redirect turns the request into a GET without a body. */
const BODY_HEADERS = ["content-type", "content-length", "content-encoding", "content-language", "content-location"];
/** Not sent to another origin a redirect points to. */
const CREDENTIAL_HEADERS = ["x-api-key", "authorization", "cookie", "proxy-authorization"];

function asError(reason: unknown): Error {
  return reason instanceof Error ? reason : new Error(String(reason));
}

/** `fetch` for a preview URL. On Node, a URL under `localhost` goes to
 * 127.0.0.1 on the URL's scheme and port with `Host` set to the URL's
 * `host[:port]` (which is how the server picks the preview), through
 * `node:http`/`node:https` because `fetch` replaces a `Host` header.
 * Redirects are followed here as `init.redirect` says (default `follow`),
 * so that credentials (the API key) are never sent to another origin. The
 * result is a real `Response`, its body streamed. */
async function previewFetchFollowing(url: URL, init: RequestInit): Promise<Response> {
  const mode = init.redirect ?? "follow";
  let current = url;
  let hop: RequestInit = { ...init, headers: new Headers(init.headers) };
  for (let redirects = 0; ; redirects++) {
    // Every hop is taken here, never by fetch's own redirect handling,
    // which would carry the API key to whatever origin an app names.
    const response =
      isLoopbackName(current.hostname) && runsOnNode()
        ? await loopbackRequest(current, hop)
        : await fetch(current, { ...hop, redirect: "manual" });
    // A browser hides a manual redirect (opaque): nothing to follow.
    if (response.type === "opaqueredirect") return response;
    const location = response.headers.get("location");
    if (mode === "manual" || !REDIRECT_STATUSES.has(response.status) || location === null) {
      Object.defineProperty(response, "url", { value: current.href });
      Object.defineProperty(response, "redirected", { value: redirects > 0 });
      return response;
    }
    await response.body?.cancel();
    if (mode === "error") throw new TypeError(`fetch failed: redirected to ${location} (redirect: "error")`);
    if (redirects >= 20) throw new TypeError("fetch failed: too many redirects");
    const next = new URL(location, current);
    const headers = new Headers(hop.headers);
    const method = (hop.method ?? "GET").toUpperCase();
    const toGet =
      (response.status === 303 && method !== "GET" && method !== "HEAD") ||
      ((response.status === 301 || response.status === 302) && method === "POST");
    if (toGet) {
      for (const name of BODY_HEADERS) headers.delete(name);
      hop = { ...hop, method: "GET", body: null };
    }
    if (next.origin !== current.origin) for (const name of CREDENTIAL_HEADERS) headers.delete(name);
    hop = { ...hop, headers };
    current = next;
  }
}

/** One request over loopback, no redirects followed. */
async function loopbackRequest(url: URL, init: RequestInit): Promise<Response> {
  const signal = init.signal ?? undefined;
  signal?.throwIfAborted();
  // Normalizes method, headers and body as fetch would (a content-type for
  // URLSearchParams, FormData or a Blob); throws where fetch would.
  const normalized = new Request(url, init);
  const https = url.protocol === "https:";
  if (!https && url.protocol !== "http:") throw new TypeError(`fetch failed: unsupported scheme ${url.protocol}`);
  const specifier = https ? "node:https" : "node:http";
  const http = (await import(/* webpackIgnore: true */ /* @vite-ignore */ specifier)) as NodeHttpModule;
  const headers: Record<string, string> = { accept: "*/*" };
  normalized.headers.forEach((value, name) => {
    headers[name] = value;
  });
  headers.host = url.host; // host[:port], the port unless the scheme's default
  // A stream is sent as it comes (chunked); anything else with its length.
  const streamed = init.body instanceof ReadableStream ? normalized.body : null;
  let bytes: Uint8Array | null = null;
  if (normalized.body !== null && streamed === null) {
    bytes = new Uint8Array(await normalized.arrayBuffer());
    headers["content-length"] = String(bytes.byteLength);
  }
  const method = normalized.method;

  return new Promise<Response>((resolve, reject) => {
    let response: NodeIncomingMessage | undefined;
    let settled = false; // the promise resolved or rejected
    let ended = false; // the response body closed, errored or was cancelled
    const request = http.request({
      host: LOOPBACK_ADDRESS,
      port: url.port ? Number(url.port) : https ? 443 : 80,
      path: url.pathname + url.search,
      method,
      headers,
      ...(https ? { servername: url.hostname } : {}),
    });
    const onAbort = (): void => {
      const reason = asError(signal?.reason);
      request.destroy(reason);
      response?.destroy(reason);
    };
    const done = (): void => {
      ended = true;
      signal?.removeEventListener("abort", onAbort);
    };
    signal?.addEventListener("abort", onAbort, { once: true });
    request.on("error", (error) => {
      if (settled) return;
      settled = true;
      done();
      reject(signal?.aborted ? signal.reason : new TypeError("fetch failed", { cause: error }));
    });
    request.on("response", (res) => {
      response = res;
      try {
        const status = res.statusCode ?? 0;
        const responseHeaders = new Headers();
        for (let i = 0; i + 1 < res.rawHeaders.length; i += 2) responseHeaders.append(res.rawHeaders[i], res.rawHeaders[i + 1]);
        let body: ReadableStream<Uint8Array> | null = null;
        if (NULL_BODY_STATUSES.has(status) || method === "HEAD") {
          res.resume(); // drain, so the connection can be reused
          res.on("end", done);
        } else {
          body = new ReadableStream<Uint8Array>({
            start(controller) {
              const fail = (error: unknown): void => {
                if (ended) return;
                done();
                controller.error(signal?.aborted ? signal.reason : new TypeError("terminated", { cause: error }));
              };
              res.on("data", (chunk) => {
                if (ended) return;
                controller.enqueue(new Uint8Array(chunk.buffer, chunk.byteOffset, chunk.byteLength));
                if ((controller.desiredSize ?? 1) <= 0) res.pause();
              });
              res.on("end", () => {
                if (ended) return;
                done();
                controller.close();
              });
              res.on("error", fail);
              res.on("close", () => {
                if (!res.complete) fail(new Error("the connection closed before the response ended"));
              });
            },
            pull() {
              res.resume();
            },
            cancel() {
              done();
              res.destroy();
            },
          });
        }
        const result = new Response(body, { status, statusText: res.statusMessage ?? "", headers: responseHeaders });
        settled = true;
        resolve(result);
      } catch (error) {
        settled = true;
        done();
        res.destroy();
        reject(new TypeError("fetch failed", { cause: error }));
      }
    });
    if (streamed === null) {
      request.end(bytes ?? undefined);
      return;
    }
    void (async () => {
      const reader = streamed.getReader();
      for (;;) {
        const { done: last, value } = await reader.read();
        if (last) break;
        if (!request.write(value)) await new Promise<void>((r) => { request.once("drain", r); request.once("close", r); });
      }
      request.end();
    })().catch((error: unknown) => request.destroy(asError(error)));
  });
}

/** Async iteration over every item of a paginated list, pages fetched lazily. */
export class PageIterator<T> implements AsyncIterable<T> {
  constructor(private readonly fetchPage: (cursor: string | null) => Promise<{ items: T[]; next: string | null }>) {}

  async *pages(): AsyncGenerator<T[]> {
    let cursor: string | null = null;
    for (;;) {
      const { items, next } = await this.fetchPage(cursor);
      yield items;
      if (!next) return;
      cursor = next;
    }
  }

  async *[Symbol.asyncIterator](): AsyncGenerator<T> {
    for await (const page of this.pages()) yield* page;
  }

  /** Every item of every page. */
  async toArray(): Promise<T[]> {
    const all: T[] = [];
    for await (const item of this) all.push(item);
    return all;
  }
}

export class CrowNestClient {
  readonly baseUrl: string;
  readonly timeoutMs: number;
  readonly maxRetries: number;
  readonly sandboxes: Sandboxes;
  readonly artifacts: Artifacts;
  readonly templates: Templates;
  readonly workspaceRuns: WorkspaceRuns;
  readonly usage: Usage;
  readonly audit: Audit;
  private readonly apiKey: string;

  constructor(options: ClientOptions = {}) {
    const apiKey = options.apiKey ?? env("CROWNEST_API_KEY");
    if (!apiKey) throw new CrowNestError("no API key: pass apiKey or set CROWNEST_API_KEY");
    this.apiKey = apiKey;
    this.baseUrl = (options.baseUrl ?? env("CROWNEST_BASE_URL") ?? DEFAULT_BASE_URL).replace(/\/+$/, "");
    this.timeoutMs = options.timeoutMs ?? 660_000;
    this.maxRetries = options.maxRetries ?? 3;
    this.sandboxes = new Sandboxes(this);
    this.artifacts = new Artifacts(this);
    this.templates = new Templates(this);
    this.workspaceRuns = new WorkspaceRuns(this);
    this.usage = new Usage(this);
    this.audit = new Audit(this);
  }

  /** `GET /v1/health`. */
  health(options: CallOptions = {}): Promise<{ status: string; version: string; runtime: string }> {
    return this.request("GET", "/v1/health", { timeoutMs: options.requestTimeoutMs });
  }

  private url(path: string, query?: RequestOptions["query"]): string {
    const url = new URL(/^https?:\/\//.test(path) ? path : this.baseUrl + path);
    for (const [k, v] of Object.entries(query ?? {})) if (v !== undefined) url.searchParams.set(k, String(v));
    return url.toString();
  }

  /**
   * @internal One API call; throws `CrowNestApiError` on an error status.
   *
   * The call has one deadline (`options.timeoutMs`, else the client's
   * `timeoutMs`): each attempt gets what remains of it, and a retry whose
   * wait (`Retry-After`, else backoff) would end past it is not made: the
   * last error is thrown instead. An attempt cut by the deadline throws
   * `CrowNestTimeoutError`. What is retried is retry.ts's policy; a signed
   * transfer URL (single use) and a streamed body (read once) are sent once.
   */
  async send(method: string, path: string, options: RequestOptions = {}): Promise<Response> {
    const headers: Record<string, string> = {
      accept: "application/json",
      "user-agent": `crownest-typescript/${VERSION}`,
      ...options.headers,
    };
    if (!options.signed) headers["x-api-key"] = this.apiKey;
    // Every mutating call carries an Idempotency-Key, the same one on each
    // of its retries; except an upload of raw bytes (a PUT of a whole file
    // or archive is idempotent as it is, and a key would make the server
    // buffer the body to fingerprint it) and a signed transfer URL.
    const mutating = method !== "GET" && method !== "HEAD";
    const idempotencyKey =
      options.idempotencyKey ??
      (mutating && !options.signed && options.body === undefined ? await newIdempotencyKey() : undefined);
    const keyed = idempotencyKey !== undefined;
    if (idempotencyKey !== undefined) headers["idempotency-key"] = idempotencyKey;
    let body: string | Uint8Array | Blob | ReadableStream<Uint8Array> | undefined = options.body;
    if (options.json !== undefined) {
      headers["content-type"] = "application/json";
      body = JSON.stringify(options.json);
    }
    const streamedBody = body instanceof ReadableStream;
    const once = options.signed || streamedBody;
    const deadline = options.deadline ?? Date.now() + (options.timeoutMs ?? this.timeoutMs);
    const budget = options.timeoutMs ?? deadline - Date.now();
    const url = this.url(path, options.query);
    const what = `${method} ${new URL(url).pathname}`;
    for (let attempt = 0; ; attempt++) {
      const remaining = deadline - Date.now();
      if (remaining <= 0) throw new CrowNestTimeoutError(`${what}: no answer within ${budget} ms`);
      // One controller per attempt: the deadline aborts it, and so does
      // the caller's signal (Node 18 has no AbortSignal.any).
      const controller = new AbortController();
      const timedOut = new CrowNestTimeoutError(`${what}: no answer within ${budget} ms`);
      const timer = setTimeout(() => controller.abort(timedOut), remaining);
      // The timer must not keep a finished program alive (Node).
      (timer as unknown as { unref?: () => void }).unref?.();
      const onAbort = (): void => controller.abort(options.signal?.reason);
      if (options.signal?.aborted) onAbort();
      options.signal?.addEventListener("abort", onAbort, { once: true });
      const settle = (): void => {
        clearTimeout(timer);
        options.signal?.removeEventListener("abort", onAbort);
      };
      let response: Response;
      try {
        response = await fetch(url, {
          method,
          headers,
          body: body as BodyInit | undefined,
          signal: controller.signal,
          // A stream body: Node's fetch sends it as it is read.
          ...(streamedBody ? { duplex: "half" } : {}),
        } as RequestInit);
      } catch (error) {
        settle();
        if (controller.signal.reason === timedOut) throw timedOut;
        if (options.signal?.aborted) throw options.signal.reason;
        const retryable = !once && mayRetryNetwork(method, keyed, error);
        const wait = backoff(attempt);
        if (attempt >= this.maxRetries || !retryable || Date.now() + wait >= deadline) {
          throw new CrowNestConnectionError(`${what}: ${String(error)}`, { cause: error });
        }
        await sleep(wait);
        continue;
      }
      if (response.status >= 400) {
        const error: CrowNestApiError = await apiErrorFromResponse(response).finally(settle);
        const retryAfter = parseRetryAfter(response.headers.get("retry-after"));
        if (!once && attempt < this.maxRetries && mayRetryStatus(method, keyed, response.status, error.code, retryAfter)) {
          const wait = retryAfter ?? backoff(attempt);
          // Never sleep past the deadline: a wait that would end after it
          // could only lead to a timeout, so the error is the answer.
          if (Date.now() + wait < deadline) {
            await sleep(wait);
            continue;
          }
        }
        throw error;
      }
      // A stream is read at the caller's pace (the deadline was for the
      // answer; the caller's signal still ends it); any other body stays
      // under the deadline until read.
      if (options.stream) clearTimeout(timer);
      return response;
    }
  }

  /** @internal The deadline of a call with these options (a `Date.now()` time). */
  deadline(options: CallOptions): number {
    return Date.now() + (options.requestTimeoutMs ?? this.timeoutMs);
  }

  /** @internal A request to a preview URL with this client's key; the
   * app's response as it is (no error mapping, no retries). On Node, a URL
   * under `localhost` (the default preview domain) goes to 127.0.0.1 with
   * its `Host`, as a browser would resolve it. */
  previewFetch(url: string, init: RequestInit = {}): Promise<Response> {
    const headers = new Headers(init.headers);
    headers.set("x-api-key", this.apiKey);
    const request: RequestInit = { ...init, headers, signal: init.signal ?? AbortSignal.timeout(this.timeoutMs) };
    return previewFetchFollowing(new URL(url), request);
  }

  /** @internal */
  async request<T>(method: string, path: string, options: RequestOptions = {}): Promise<T> {
    const response = await this.send(method, path, options);
    return (await response.json()) as T;
  }

  /** @internal Pages of `GET path` (with `query`), following `nextCursor`. */
  page<T, U>(
    path: string,
    query: Record<string, QueryValue>,
    wrap: (data: T) => U,
    options: CallOptions = {},
  ): PageIterator<U> {
    return new PageIterator(async (cursor) => {
      const body = await this.request<Page<T>>("GET", path, {
        query: { ...query, cursor: cursor ?? query.cursor },
        timeoutMs: options.requestTimeoutMs,
      });
      return { items: body.data.map(wrap), next: body.nextCursor ?? null };
    });
  }

  /** @internal The events of an SSE endpoint until the server closes it,
   * `signal` aborts it or the consumer stops; an `error` event (the error
   * envelope) is thrown as `CrowNestApiError`. The call's timeout covers
   * the answer's headers. */
  async *events(path: string, query: Record<string, QueryValue>, options: { signal?: AbortSignal; timeoutMs?: number } = {}): AsyncGenerator<ServerSentEvent> {
    const response = await this.send("GET", path, {
      query,
      headers: { accept: "text/event-stream" },
      stream: true,
      signal: options.signal,
      timeoutMs: options.timeoutMs,
    });
    if (!response.body) throw new CrowNestConnectionError(`GET ${path}: no response body`);
    const decoder = new SSEDecoder();
    try {
      for await (const line of lines(response.body)) {
        const sse = decoder.feed(line);
        if (!sse) continue;
        if (sse.event === "error") throw streamError(sse.data, response.status);
        yield sse;
      }
    } catch (error) {
      // Ours, or the caller's abort reason, as they are; a failed read is
      // a dropped connection.
      if (error instanceof CrowNestError || options.signal?.aborted) throw error;
      throw new CrowNestConnectionError(`GET ${path}: the event stream broke: ${String(error)}`, { cause: error });
    }
  }

  /** @internal Follows an SSE command log to its `exit` event, reconnecting
   * with `Last-Event-ID` after a dropped connection. */
  async *logStream(path: string, after?: number): AsyncGenerator<LogEvent> {
    let last = after;
    let failures = 0;
    for (;;) {
      const headers: Record<string, string> = {
        accept: "text/event-stream",
        "x-api-key": this.apiKey,
        "user-agent": `crownest-typescript/${VERSION}`,
      };
      if (last !== undefined) headers["last-event-id"] = String(last);
      let response: Response;
      try {
        response = await fetch(this.url(path), { headers });
      } catch (error) {
        if (failures >= this.maxRetries) throw new CrowNestConnectionError(`GET ${path}: ${String(error)}`, { cause: error });
        await sleep(backoff(failures++));
        continue;
      }
      if (response.status >= 400) throw await apiErrorFromResponse(response);
      if (!response.body) throw new CrowNestConnectionError(`GET ${path}: no response body`);
      const decoder = new SSEDecoder();
      try {
        for await (const line of lines(response.body)) {
          const sse = decoder.feed(line);
          if (!sse) continue;
          const event = toLogEvent(sse.event, sse.data, sse.id);
          if (!event) continue;
          failures = 0;
          if (event.id !== null) last = event.id;
          yield event;
          if (event.type === "exit") return;
        }
      } catch (error) {
        if (failures >= this.maxRetries) throw new CrowNestConnectionError(`GET ${path}: ${String(error)}`, { cause: error });
        await sleep(backoff(failures++));
        continue;
      }
      // The stream ended before the exit event: reconnect after `last`.
      if (failures >= this.maxRetries) throw new CrowNestConnectionError(`GET ${path}: the log ended before the exit event`);
      await sleep(backoff(failures++));
    }
  }

  /** @internal Follows a Workspace Run's SSE event log to its `terminal`
   * event. After a dropped connection it reconnects with `Last-Event-ID` /
   * `afterSeq` of the last event seen; an event already seen is skipped and
   * a hole in the numbering is filled from the JSON pages, so every `seq`
   * is yielded once, in order. */
  async *runEvents(runId: string, afterSeq = 0): AsyncGenerator<WorkspaceRunEvent> {
    const path = `/v1/workspace-runs/${runId}/events`;
    let last = afterSeq;
    let failures = 0;
    for (;;) {
      const headers: Record<string, string> = {
        accept: "text/event-stream",
        "x-api-key": this.apiKey,
        "user-agent": `crownest-typescript/${VERSION}`,
      };
      if (last > 0) headers["last-event-id"] = String(last);
      let response: Response;
      try {
        response = await fetch(this.url(path, { afterSeq: last }), { headers });
      } catch (error) {
        if (failures >= this.maxRetries) throw new CrowNestConnectionError(`GET ${path}: ${String(error)}`, { cause: error });
        await sleep(backoff(failures++));
        continue;
      }
      if (response.status >= 400) throw await apiErrorFromResponse(response);
      if (!response.body) throw new CrowNestConnectionError(`GET ${path}: no response body`);
      const decoder = new SSEDecoder();
      try {
        for await (const line of lines(response.body)) {
          const sse = decoder.feed(line);
          if (!sse) continue;
          const event = toRunEvent(sse.data, response.status);
          if (!event || event.seq <= last) continue;
          failures = 0;
          if (event.seq > last + 1) {
            for await (const missing of this.runEventsBetween(path, last, event.seq)) {
              last = missing.seq;
              yield missing;
            }
          }
          last = event.seq;
          yield event;
          if (event.type === "terminal") return;
        }
      } catch (error) {
        // An API error (or a hole the server cannot fill) is final; a
        // failed read is a dropped connection.
        if (error instanceof CrowNestError) throw error;
        if (failures >= this.maxRetries) throw new CrowNestConnectionError(`GET ${path}: ${String(error)}`, { cause: error });
        await sleep(backoff(failures++));
        continue;
      }
      // The stream ended before the terminal event: reconnect after `last`.
      if (failures >= this.maxRetries) throw new CrowNestConnectionError(`GET ${path}: the event stream ended before the terminal event`);
      await sleep(backoff(failures++));
    }
  }

  /** The events numbered `after + 1 … before - 1`, from the JSON pages. */
  private async *runEventsBetween(path: string, after: number, before: number): AsyncGenerator<WorkspaceRunEvent> {
    while (after + 1 < before) {
      const page = await this.request<WorkspaceRunEventPage>("GET", path, {
        query: { afterSeq: after, limit: Math.min(1000, before - after - 1) },
      });
      const events = page.data.filter((e) => e.seq > after && e.seq < before);
      if (events.length === 0) throw new CrowNestError(`GET ${path}: the event log has no event ${after + 1}`);
      for (const event of events) {
        if (event.seq !== after + 1) throw new CrowNestError(`GET ${path}: the event log has no event ${after + 1}`);
        after = event.seq;
        yield event;
      }
    }
  }

  /** @internal POSTs a streamed Code Run, passes its events to the
   * callbacks and returns the RunCodeResult of its `complete` event. After a
   * dropped connection it asks again with the same Idempotency-Key: the
   * server then waits for the run and replays its `complete` event. */
  async codeStream(path: string, json: unknown, idempotencyKey: string, callbacks: CodeCallbacks & CallOptions): Promise<RunCodeResult> {
    const budget = callbacks.requestTimeoutMs ?? this.timeoutMs;
    const deadline = Date.now() + budget;
    for (let attempt = 0; ; attempt++) {
      // `send` retries a failed connection and a key still in use; the
      // whole run, reconnections included, stays within one deadline.
      const remaining = deadline - Date.now();
      if (remaining <= 0) throw new CrowNestTimeoutError(`POST ${path}: no result within ${budget} ms`);
      const response = await this.send("POST", path, {
        json,
        idempotencyKey,
        headers: { accept: "text/event-stream" },
        timeoutMs: remaining,
      });
      if (!response.body) throw new CrowNestConnectionError(`POST ${path}: no response body`);
      const decoder = new SSEDecoder();
      try {
        for await (const line of lines(response.body)) {
          const sse = decoder.feed(line);
          if (!sse) continue;
          let payload: unknown;
          try {
            payload = sse.data ? JSON.parse(sse.data) : {};
          } catch {
            continue;
          }
          const data = payload as Record<string, unknown>;
          if (sse.event === "stdout") await callbacks.onStdout?.(String(data.text ?? ""));
          else if (sse.event === "stderr") await callbacks.onStderr?.(String(data.text ?? ""));
          else if (sse.event === "output") await callbacks.onOutput?.(payload as CodeOutput);
          else if (sse.event === "error" && typeof data.error === "object" && data.error !== null) {
            // The run failed on the server after the stream began: the
            // error envelope (an interpreter error has `name` instead).
            const envelope = data.error as Record<string, unknown>;
            throw new CrowNestApiError(
              response.status >= 400 ? response.status : 500,
              String(envelope.code ?? "internal"),
              String(envelope.message ?? ""),
              (envelope.details as Record<string, unknown>) ?? {},
            );
          } else if (sse.event === "complete") return payload as RunCodeResult;
        }
      } catch (error) {
        if (error instanceof CrowNestApiError || error instanceof CrowNestTimeoutError) throw error;
        const wait = backoff(attempt);
        if (attempt >= this.maxRetries || Date.now() + wait >= deadline) {
          throw new CrowNestConnectionError(`POST ${path}: ${String(error)}`, { cause: error });
        }
        await sleep(wait);
        continue;
      }
      const wait = backoff(attempt);
      if (attempt >= this.maxRetries || Date.now() + wait >= deadline) {
        throw new CrowNestConnectionError(`POST ${path}: the run stream ended before its complete event`);
      }
      await sleep(wait);
    }
  }
}

/** An SSE `error` event's envelope as the error it reports. */
function streamError(data: string, status: number): CrowNestApiError {
  let envelope: Record<string, unknown> = {};
  try {
    const payload = JSON.parse(data) as { error?: Record<string, unknown> };
    envelope = payload.error ?? {};
  } catch {
    envelope = { message: data };
  }
  return new CrowNestApiError(
    status >= 400 ? status : 500,
    String(envelope.code ?? "internal"),
    String(envelope.message ?? ""),
    (envelope.details as Record<string, unknown>) ?? {},
  );
}

/** An SSE event of `GET …/events` as a run event (its data is the event
 * object); an error envelope in the stream is thrown as `CrowNestApiError`. */
function toRunEvent(data: string, status: number): WorkspaceRunEvent | null {
  let payload: unknown;
  try {
    payload = data ? JSON.parse(data) : null;
  } catch {
    return null;
  }
  if (typeof payload !== "object" || payload === null) return null;
  const p = payload as Record<string, unknown>;
  if (!("seq" in p) && typeof p.error === "object" && p.error !== null) {
    const envelope = p.error as Record<string, unknown>;
    throw new CrowNestApiError(
      status >= 400 ? status : 500,
      String(envelope.code ?? "internal"),
      String(envelope.message ?? ""),
      (envelope.details as Record<string, unknown>) ?? {},
    );
  }
  if (typeof p.seq !== "number" || typeof p.type !== "string") return null;
  return { seq: p.seq, type: p.type, at: String(p.at ?? ""), data: (p.data ?? {}) as never } as WorkspaceRunEvent;
}

function toLogEvent(event: string, data: string, id: string | null): LogEvent | null {
  let payload: Record<string, unknown>;
  try {
    payload = data ? (JSON.parse(data) as Record<string, unknown>) : {};
  } catch {
    return null;
  }
  const eventId = id && /^\d+$/.test(id) ? Number(id) : null;
  if (event === "stdout" || event === "stderr") {
    return { type: event, data: String(payload.data ?? ""), id: eventId, exit: null };
  }
  if (event === "exit") {
    const exit: ExitInfo = {
      status: String(payload.status ?? "") as ExitInfo["status"],
      exitCode: (payload.exitCode as number | null) ?? null,
      signal: (payload.signal as number | null) ?? null,
      error: (payload.error as string | null) ?? null,
    };
    return { type: "exit", data: "", id: eventId, exit };
  }
  return null;
}

/** Creates a client. Options default to `CROWNEST_API_KEY` and
 * `CROWNEST_BASE_URL` (else `http://127.0.0.1:7420`). */
export function createCrowNestClient(options: ClientOptions = {}): CrowNestClient {
  return new CrowNestClient(options);
}

// ------------------------------------------------------------------ sandboxes

export interface CreateSandboxOptions extends CallOptions {
  template: string;
  /** Time to live in milliseconds (E2B's `timeoutMs`). */
  ttlMs?: number;
  /** Kept verbatim; `list({ metadata })` filters on it. */
  metadata?: Record<string, unknown>;
  /** A narrower egress policy than the template's. */
  network?: NetworkPolicyRequest;
  /** Variables of every command and code context of the sandbox, over the
   * template's `[env]`; the values are never returned. */
  env?: Record<string, string>;
  /** Default: a new random key (reused across the SDK's own retries). */
  idempotencyKey?: string;
}

export interface ListSandboxesOptions extends CallOptions {
  status?: SandboxStatus;
  template?: string;
  /** `metadata[KEY]=VALUE` filters, every one must match; a value is
   * compared as text (numbers and booleans by their JSON text). */
  metadata?: Record<string, string | number | boolean>;
  /** Created after this time (exclusive). */
  createdAfter?: Date | string;
  /** Created before this time (exclusive). */
  createdBefore?: Date | string;
  /** Page size, 1 … 200. */
  limit?: number;
  /** Start from this page (`nextCursor` of an earlier one). */
  cursor?: string;
}

/** The query of `GET /v1/sandboxes` for the filters of `options`. */
function sandboxQuery(options: ListSandboxesOptions): Record<string, QueryValue> {
  const query: Record<string, QueryValue> = {
    status: options.status,
    template: options.template,
    createdAfter: rfc3339(options.createdAfter),
    createdBefore: rfc3339(options.createdBefore),
    limit: options.limit,
    cursor: options.cursor,
  };
  for (const [key, value] of Object.entries(options.metadata ?? {})) query[`metadata[${key}]`] = String(value);
  return query;
}

/** A sandbox: its fields (`id`, `status`, `expiresAt`, …) plus the
 * sub-clients bound to it. Disposable: `await using sandbox = await
 * client.sandboxes.create(…)` kills it when the scope ends. */
export interface Sandbox extends SandboxData {}
export class Sandbox {
  readonly commands: Commands;
  readonly code: Code;
  readonly files: Files;
  readonly artifacts: SandboxArtifacts;
  readonly previews: Previews;

  constructor(
    private readonly client: CrowNestClient,
    data: SandboxData,
  ) {
    Object.assign(this, data);
    this.commands = new Commands(client, data.id);
    this.code = new Code(client, data.id);
    this.files = new Files(client, data.id);
    this.artifacts = new SandboxArtifacts(client, data.id);
    this.previews = new Previews(client, data.id);
  }

  /** Re-reads the sandbox into this object. */
  async refresh(options: CallOptions = {}): Promise<this> {
    Object.assign(this, await this.client.sandboxes.getData(this.id, options));
    return this;
  }

  /** Destroys the sandbox; this object then holds its `destroyed` tombstone. */
  async kill(options: CallOptions = {}): Promise<this> {
    Object.assign(this, await this.client.sandboxes.killData(this.id, options));
    return this;
  }

  /** Sets the sandbox to expire `ttlMs` milliseconds from now (longer or
   * shorter than it had; within the server's TTL bounds, else
   * `invalid_request`). Milliseconds, as E2B's JS `setTimeout`. */
  async setTimeout(ttlMs: number, options: CallOptions = {}): Promise<this> {
    Object.assign(this, await this.client.sandboxes.setTimeoutData(this.id, ttlMs, options));
    return this;
  }

  /** Its resource use now: CPU seconds and percent, memory, pids, disk, network. */
  metrics(options: CallOptions = {}): Promise<SandboxMetrics> {
    return this.client.sandboxes.metrics(this.id, options);
  }

  /** Its metrics about every second as they are measured, until the
   * sandbox ends (or the loop stops): `for await (const m of sandbox.metricsStream())`. */
  metricsStream(options: MetricsStreamOptions = {}): AsyncGenerator<SandboxMetrics> {
    return this.client.sandboxes.metricsStream(this.id, options);
  }

  /** Narrows the sandbox's egress policy within its template's (`PATCH
   * /v1/sandboxes/{id}/network`, scope `sandboxes:network`); new
   * connections follow it at once. */
  async setNetwork(policy: NetworkPolicyRequest, options: CallOptions = {}): Promise<this> {
    Object.assign(
      this,
      await this.client.request<SandboxData>("PATCH", `/v1/sandboxes/${this.id}/network`, {
        json: policy,
        timeoutMs: options.requestTimeoutMs,
      }),
    );
    return this;
  }

  /** `await using`: kills the sandbox when the scope ends; one that is
   * already destroyed (410 `sandbox_destroyed`) is fine. */
  async [Symbol.asyncDispose](): Promise<void> {
    try {
      await this.kill();
    } catch (error) {
      if (!(error instanceof CrowNestApiError && error.status === 410)) throw error;
    }
  }

  toJSON(): SandboxData {
    const { commands: _c, code: _co, files: _f, artifacts: _a, previews: _p, client: _cl, ...data } = this as unknown as Record<string, unknown>;
    return data as unknown as SandboxData;
  }
}

export interface MetricsStreamOptions extends CallOptions {
  /** Ends the stream (the loop then finishes). */
  signal?: AbortSignal;
}

export class Sandboxes {
  constructor(private readonly client: CrowNestClient) {}

  async create(options: CreateSandboxOptions): Promise<Sandbox> {
    const body: Record<string, unknown> = { template: options.template };
    if (options.ttlMs !== undefined) body.ttlMs = options.ttlMs;
    if (options.metadata !== undefined) body.metadata = options.metadata;
    if (options.network !== undefined) body.network = options.network;
    if (options.env !== undefined) body.env = options.env;
    const data = await this.client.request<SandboxData>("POST", "/v1/sandboxes", {
      json: body,
      idempotencyKey: options.idempotencyKey,
      timeoutMs: options.requestTimeoutMs,
    });
    return new Sandbox(this.client, data);
  }

  async get(id: string, options: CallOptions = {}): Promise<Sandbox> {
    return new Sandbox(this.client, await this.getData(id, options));
  }

  /** @internal */
  getData(id: string, options: CallOptions): Promise<SandboxData> {
    return this.client.request<SandboxData>("GET", `/v1/sandboxes/${id}`, { timeoutMs: options.requestTimeoutMs });
  }

  /** Destroys a sandbox by id in one request (no `get` first); resolves to its tombstone. */
  async kill(id: string, options: CallOptions = {}): Promise<Sandbox> {
    return new Sandbox(this.client, await this.killData(id, options));
  }

  /** @internal Keyed (as every mutating call), so that a retry after a
   * lost answer gets the tombstone instead of a 410. */
  killData(id: string, options: CallOptions): Promise<SandboxData> {
    return this.client.request<SandboxData>("DELETE", `/v1/sandboxes/${id}`, { timeoutMs: options.requestTimeoutMs });
  }

  /** Sets a sandbox to expire `ttlMs` milliseconds from now; see `Sandbox.setTimeout`. */
  async setTimeout(id: string, ttlMs: number, options: CallOptions = {}): Promise<Sandbox> {
    return new Sandbox(this.client, await this.setTimeoutData(id, ttlMs, options));
  }

  /** @internal */
  setTimeoutData(id: string, ttlMs: number, options: CallOptions): Promise<SandboxData> {
    return this.client.request<SandboxData>("POST", `/v1/sandboxes/${id}/timeout`, {
      json: { ttlMs },
      timeoutMs: options.requestTimeoutMs,
    });
  }

  /** A sandbox's resource use now (`GET /v1/sandboxes/{id}/metrics`). */
  metrics(id: string, options: CallOptions = {}): Promise<SandboxMetrics> {
    return this.client.request<SandboxMetrics>("GET", `/v1/sandboxes/${id}/metrics`, {
      timeoutMs: options.requestTimeoutMs,
    });
  }

  /** A sandbox's metrics as the server measures them (about every
   * second), until the sandbox ends (the stream's `end` event), `signal`
   * aborts it or the loop stops. */
  async *metricsStream(id: string, options: MetricsStreamOptions = {}): AsyncGenerator<SandboxMetrics> {
    const events = this.client.events(`/v1/sandboxes/${id}/metrics`, { stream: true }, {
      signal: options.signal,
      timeoutMs: options.requestTimeoutMs,
    });
    try {
      for await (const sse of events) {
        if (sse.event === "end") return;
        if (sse.event === "metrics") yield JSON.parse(sse.data) as SandboxMetrics;
      }
    } catch (error) {
      // Stopping is how this stream is meant to end.
      if (options.signal?.aborted) return;
      throw error;
    }
  }

  /** Every sandbox of the org matching the filters, newest first, pages
   * fetched lazily: `for await (const s of client.sandboxes.list({ status: "running" }))`. */
  list(options: ListSandboxesOptions = {}): PageIterator<Sandbox> {
    return this.client.page<SandboxData, Sandbox>(
      "/v1/sandboxes",
      sandboxQuery(options),
      (d) => new Sandbox(this.client, d),
      options,
    );
  }
}

// ------------------------------------------------------------------ commands

export interface CommandOptions extends CallOptions {
  cwd?: string;
  env?: Record<string, string>;
  /** The command's own time limit on the server (it then ends `timed_out`). */
  timeoutMs?: number;
  /** Files to promote to artifacts when the command ends; see `result.artifacts`. */
  collect?: CollectSpec[];
  idempotencyKey?: string;
}

export interface RunOptions extends CommandOptions {
  /** Called with each stdout chunk as it arrives (the command then runs in
   * the background and its log is streamed). */
  onStdout?: (chunk: string) => unknown;
  onStderr?: (chunk: string) => unknown;
}

export interface StartOptions extends CommandOptions {
  /** Keep stdin open for `sendStdin`. */
  stdin?: boolean;
}

/** A command record plus what can be done to the command. */
export interface Command extends CommandData {}
export class Command {
  constructor(
    private readonly client: CrowNestClient,
    data: CommandData,
  ) {
    Object.assign(this, data);
  }

  private get path(): string {
    return `/v1/sandboxes/${this.sandboxId}/commands/${this.id}`;
  }

  async refresh(options: CallOptions = {}): Promise<this> {
    Object.assign(this, await this.client.request<CommandData>("GET", this.path, { timeoutMs: options.requestTimeoutMs }));
    return this;
  }

  /** The log, from the start or after event number `after`: stdout/stderr
   * events, then `exit`. A finished command's log is replayed. */
  logs(options: { after?: number } = {}): AsyncGenerator<LogEvent> {
    return this.client.logStream(`${this.path}/logs`, options.after);
  }

  /** Waits for the command to end and returns its final record. */
  async wait(options: Pick<RunOptions, "onStdout" | "onStderr"> = {}): Promise<CommandResult> {
    if (this.status === "running" || options.onStdout || options.onStderr) {
      for await (const event of this.logs()) {
        if (event.type === "stdout") await options.onStdout?.(event.data);
        else if (event.type === "stderr") await options.onStderr?.(event.data);
      }
    }
    await this.refresh();
    return this.toJSON();
  }

  /** Writes text or bytes to stdin (started with `stdin: true`); `close` closes it after. */
  async sendStdin(data?: string | Uint8Array, options: { close?: boolean } = {}): Promise<this> {
    const body: Record<string, unknown> = {};
    if (typeof data === "string") body.data = data;
    else if (data) body.dataBase64 = base64(data);
    if (options.close) body.close = true;
    Object.assign(this, await this.client.request<CommandData>("POST", `${this.path}/stdin`, { json: body }));
    return this;
  }

  /** Sends a signal (`"SIGTERM"`, `"INT"`, `9`, …). (`signal` is the record field: the signal that ended it.) */
  async sendSignal(signal: string | number): Promise<this> {
    const data = await this.client.request<CommandData>("POST", `${this.path}/signal`, {
      json: { signal: String(signal) },
    });
    Object.assign(this, data);
    return this;
  }

  /** Kills the command; it ends `canceled`. */
  async cancel(): Promise<this> {
    Object.assign(this, await this.client.request<CommandData>("POST", `${this.path}/cancel`));
    return this;
  }

  toJSON(): CommandData {
    const { client: _c, ...data } = this as unknown as Record<string, unknown>;
    return data as unknown as CommandData;
  }
}

function commandBody(command: string, options: StartOptions, background: boolean): Record<string, unknown> {
  const body: Record<string, unknown> = { command };
  if (options.cwd !== undefined) body.cwd = options.cwd;
  if (options.env !== undefined) body.env = options.env;
  if (options.timeoutMs !== undefined) body.timeoutMs = options.timeoutMs;
  if (options.collect !== undefined) body.collect = options.collect;
  if (background) body.background = true;
  if (options.stdin) body.stdin = true;
  return body;
}

export class Commands {
  constructor(
    private readonly client: CrowNestClient,
    private readonly sandboxId: string,
  ) {}

  /**
   * Runs a command to completion and returns its record (`exitCode`,
   * `stdout`, `stderr`, `status`, `artifacts` with `collect`). A non-zero
   * exit is a result, not an error. With `onStdout`/`onStderr` the command
   * starts in the background and its log streams to the callbacks.
   */
  async run(command: string, options: RunOptions = {}): Promise<CommandResult> {
    if (!options.onStdout && !options.onStderr) {
      return this.client.request<CommandResult>("POST", `/v1/sandboxes/${this.sandboxId}/commands`, {
        json: commandBody(command, options, false),
        idempotencyKey: options.idempotencyKey,
        timeoutMs: options.requestTimeoutMs,
      });
    }
    const handle = await this.start(command, options);
    return handle.wait({ onStdout: options.onStdout, onStderr: options.onStderr });
  }

  /** Starts a command in the background and returns a handle to it. */
  async start(command: string, options: StartOptions = {}): Promise<Command> {
    const data = await this.client.request<CommandData>("POST", `/v1/sandboxes/${this.sandboxId}/commands`, {
      json: commandBody(command, options, true),
      idempotencyKey: options.idempotencyKey,
      timeoutMs: options.requestTimeoutMs,
    });
    return new Command(this.client, data);
  }

  async get(commandId: string, options: CallOptions = {}): Promise<Command> {
    const data = await this.client.request<CommandData>("GET", `/v1/sandboxes/${this.sandboxId}/commands/${commandId}`, {
      timeoutMs: options.requestTimeoutMs,
    });
    return new Command(this.client, data);
  }

  list(options: { limit?: number } & CallOptions = {}): PageIterator<Command> {
    return this.client.page<CommandData, Command>(
      `/v1/sandboxes/${this.sandboxId}/commands`,
      { limit: options.limit },
      (d) => new Command(this.client, d),
      options,
    );
  }
}

// ------------------------------------------------------------------ code

export interface CodeCallbacks {
  /** Called with each stdout chunk as it is produced (the run is then streamed). */
  onStdout?: (chunk: string) => unknown;
  onStderr?: (chunk: string) => unknown;
  /** Called with each rich output as it is produced. */
  onOutput?: (output: CodeOutput) => unknown;
}

export interface CreateContextOptions extends CallOptions {
  /** Default `"python"`. */
  language?: CodeLanguage;
  cwd?: string;
  env?: Record<string, string>;
}

export interface RunCodeOptions extends CodeCallbacks, CallOptions {
  code: string;
  /** Default `"python"`. */
  language?: CodeLanguage;
  /** A context id or context; default: the sandbox's default context for the language. */
  contextId?: string | CodeContextData;
  /** `"promote"` turns eligible rich outputs into artifacts; default `"inline"`. */
  artifactPolicy?: ArtifactPolicy;
  /** The run's own time limit on the server. */
  timeoutMs?: number;
  /** Default: a new random key (reused across the SDK's own retries). */
  idempotencyKey?: string;
}

type ContextRef = string | { id: string };

function contextId(context: ContextRef): string {
  return typeof context === "string" ? context : context.id;
}

/** Code Contexts (persistent interpreters) and Code Runs (snippets run in them). */
export class Code {
  private readonly base: string;

  constructor(
    private readonly client: CrowNestClient,
    sandboxId: string,
  ) {
    this.base = `/v1/sandboxes/${sandboxId}/code`;
  }

  /** Starts a new interpreter for the language (default python). */
  createContext(options: CreateContextOptions = {}): Promise<CodeContextData> {
    const json: Record<string, unknown> = { language: options.language ?? "python" };
    if (options.cwd !== undefined) json.cwd = options.cwd;
    if (options.env !== undefined) json.env = options.env;
    return this.client.request<CodeContextData>("POST", `${this.base}/contexts`, { json, timeoutMs: options.requestTimeoutMs });
  }

  async listContexts(options: CallOptions = {}): Promise<CodeContextData[]> {
    return (await this.client.request<Page<CodeContextData>>("GET", `${this.base}/contexts`, { timeoutMs: options.requestTimeoutMs })).data;
  }

  getContext(id: string, options: CallOptions = {}): Promise<CodeContextData> {
    return this.client.request<CodeContextData>("GET", `${this.base}/contexts/${id}`, { timeoutMs: options.requestTimeoutMs });
  }

  /** Replaces the context's interpreter with a fresh one: same id, its
   * variables and imports gone (E2B's `restartCodeContext`). */
  restartContext(context: ContextRef, options: CallOptions = {}): Promise<CodeContextData> {
    return this.client.request<CodeContextData>("POST", `${this.base}/contexts/${contextId(context)}/restart`, {
      timeoutMs: options.requestTimeoutMs,
    });
  }

  /** Stops the context's interpreter (its state is gone). */
  async deleteContext(context: ContextRef, options: CallOptions = {}): Promise<void> {
    await this.client.send("DELETE", `${this.base}/contexts/${contextId(context)}`, { timeoutMs: options.requestTimeoutMs });
  }

  /**
   * Runs a snippet and returns the result (`stdout`/`stderr` chunks,
   * `outputs`, `error`, …). An exception in the code is `result.error`, not
   * a thrown error. With `onStdout`/`onStderr`/`onOutput` the run is
   * streamed and each chunk or output reaches them as it is produced.
   */
  async run(options: RunCodeOptions): Promise<RunCodeResult> {
    const json: Record<string, unknown> = { language: options.language ?? "python", code: options.code };
    if (options.contextId !== undefined) json.contextId = contextId(options.contextId);
    if (options.artifactPolicy !== undefined) json.artifactPolicy = options.artifactPolicy;
    if (options.timeoutMs !== undefined) json.timeoutMs = options.timeoutMs;
    const idempotencyKey = options.idempotencyKey ?? (await newIdempotencyKey());
    const path = `${this.base}/runs`;
    if (!options.onStdout && !options.onStderr && !options.onOutput) {
      return this.client.request<RunCodeResult>("POST", path, { json, idempotencyKey, timeoutMs: options.requestTimeoutMs });
    }
    return this.client.codeStream(path, json, idempotencyKey, options);
  }
}

// ------------------------------------------------------------------ files

/** What `files.write` takes: text, bytes, a `Blob` (a file from
 * `fs.openAsBlob` is read as it is sent), or a stream of bytes (a
 * `ReadableStream` or any async iterable, e.g. `fs.createReadStream`). */
export type WriteData = string | Uint8Array | Blob | ReadableStream<Uint8Array> | AsyncIterable<Uint8Array | string>;

export interface WriteOptions extends CallOptions {
  /** The byte count of a stream, when known: up to 32 MiB it is sent in
   * one `PUT …/files`, larger through a staged upload of that size.
   * Without it a stream goes through a staged upload (of at most the
   * workspace's size). Text, bytes and a Blob know their size. */
  size?: number;
}

/** One file of `files.writeFiles`. */
export interface WriteEntry {
  path: string;
  data: WriteData;
  /** See `WriteOptions.size`. */
  size?: number;
}

export interface WatchOptions extends CallOptions {
  /** Also watch the directories below it (the server's default: true). */
  recursive?: boolean;
  /** Called when the watch ends on an error after it was ready (the
   * connection dropped, `onEvent` threw, …); `closed` rejects with it too. */
  onError?: (error: unknown) => unknown;
}

/** A running `files.watch`. */
export interface WatchHandle {
  /** The watched directory, absolute (`/workspace/…`). */
  readonly path: string;
  /** Stops watching (closes the stream); resolves once it is closed. */
  stop(): Promise<void>;
  /** Settles when the watch ended: resolves with why (`stopped`,
   * `sandbox_destroyed`, `directory_removed`), rejects on an error (the
   * connection dropped, `onEvent` threw, …). */
  readonly closed: Promise<WatchEndReason>;
}

/** The request body of `data` and its size, when known. */
function writeBody(data: WriteData, size: number | undefined): { body: Uint8Array | Blob | ReadableStream<Uint8Array>; size: number | undefined } {
  if (typeof data === "string" || data instanceof Uint8Array) {
    const bytes = toBytes(data);
    return { body: bytes, size: bytes.byteLength };
  }
  if (data instanceof Blob) return { body: data, size: data.size };
  if (data instanceof ReadableStream) return { body: data, size };
  if (isAsyncIterable(data)) return { body: streamOf(data), size };
  throw new TypeError("files.write: data must be a string, Uint8Array, Blob, ReadableStream or async iterable");
}

/** Files of /workspace; paths are relative to /workspace or absolute under it. */
export class Files {
  private readonly base: string;

  constructor(
    private readonly client: CrowNestClient,
    sandboxId: string,
  ) {
    this.base = `/v1/sandboxes/${sandboxId}/files`;
  }

  /**
   * Writes a whole file; parents are created, and it appears whole or not
   * at all. Any size: up to 32 MiB in one `PUT`, larger ones (and streams
   * of unknown size) through a staged upload, streamed, never buffered
   * here.
   */
  async write(path: string, data: WriteData, options: WriteOptions = {}): Promise<FileData> {
    return this.writeWithin(path, data, options.size, this.client.deadline(options));
  }

  /** Writes each file in turn (see `write`); one timeout for them all. */
  async writeFiles(files: WriteEntry[], options: CallOptions = {}): Promise<FileData[]> {
    const deadline = this.client.deadline(options);
    const written: FileData[] = [];
    for (const file of files) written.push(await this.writeWithin(file.path, file.data, file.size, deadline));
    return written;
  }

  private async writeWithin(path: string, data: WriteData, size: number | undefined, deadline: number): Promise<FileData> {
    const { body, size: known } = writeBody(data, size);
    if (known !== undefined && known <= DIRECT_UPLOAD_MAX) {
      const response = await this.client.send("PUT", this.base, { query: { path }, body, headers: OCTET_STREAM, deadline });
      return (await response.json()) as FileData;
    }
    return this.stagedUpload(path, body, known, deadline);
  }

  private async stagedUpload(
    path: string,
    body: Uint8Array | Blob | ReadableStream<Uint8Array>,
    size: number | undefined,
    deadline: number,
  ): Promise<FileData> {
    const target = await this.uploadUrlWithin(path, size, deadline);
    const response = await this.client.send(target.method, target.url, { body, headers: OCTET_STREAM, signed: true, deadline });
    return (await response.json()) as FileData;
  }

  async read(path: string, options: CallOptions = {}): Promise<Uint8Array> {
    const response = await this.client.send("GET", this.base, { query: { path }, timeoutMs: options.requestTimeoutMs });
    return new Uint8Array(await response.arrayBuffer());
  }

  async readText(path: string, options: CallOptions = {}): Promise<string> {
    return new TextDecoder().decode(await this.read(path, options));
  }

  /**
   * The file's bytes as a stream, read as they arrive (never buffered
   * whole): `for await`-able on Node, or `.getReader()`. Files over 32 MiB
   * come through a staged download. The timeout covers the answer, not the
   * reading; cancel the stream to stop early.
   */
  async readStream(path: string, options: CallOptions = {}): Promise<ReadableStream<Uint8Array>> {
    const deadline = this.client.deadline(options);
    const info = await this.client.request<FileData>("GET", `${this.base}/stat`, { query: { path }, deadline });
    let response: Response;
    if (info.size > DIRECT_UPLOAD_MAX) {
      const target = await this.client.request<TransferData>("POST", `${this.base}/downloads`, { json: { path }, deadline });
      response = await this.client.send(target.method, target.url, { signed: true, stream: true, deadline });
    } else {
      response = await this.client.send("GET", this.base, { query: { path }, stream: true, deadline });
    }
    return response.body ?? new ReadableStream<Uint8Array>({ start: (c) => c.close() });
  }

  /** Whether `path` exists (a file, directory or symlink). */
  async exists(path: string, options: CallOptions = {}): Promise<boolean> {
    const answer = await this.client.request<{ exists: boolean }>("GET", `${this.base}/exists`, {
      query: { path },
      timeoutMs: options.requestTimeoutMs,
    });
    return answer.exists;
  }

  /**
   * Watches a directory (default /workspace; with the directories below
   * it unless `recursive: false`) and passes each change to `onEvent`
   * (awaited, in order): `create`, `modify`, `delete`, `rename` (with
   * `oldPath`), `overflow` when changes were lost and `limited` when a
   * recursive watch reached its most directories. Resolves once the
   * watches are in place (the stream's `ready` event), so a change made
   * after it is seen; `stop()` ends it, and so does the sandbox's end.
   */
  async watch(path: string | undefined, onEvent: (event: WatchEvent) => unknown, options: WatchOptions = {}): Promise<WatchHandle> {
    const controller = new AbortController();
    const budget = options.requestTimeoutMs ?? this.client.timeoutMs;
    const events = this.client.events(
      `${this.base}/watch`,
      { path, recursive: options.recursive },
      { signal: controller.signal, timeoutMs: budget },
    );
    // The answer's headers are under the call's timeout; so is `ready`.
    const notReady = new CrowNestTimeoutError(`watch ${path ?? "/workspace"}: not ready within ${budget} ms`);
    const timer = setTimeout(() => controller.abort(notReady), budget);
    let watched: string;
    try {
      for (;;) {
        const next = await events.next();
        if (next.done) throw new CrowNestConnectionError(`watch ${path ?? "/workspace"}: the stream ended before it was ready`);
        if (next.value.event === "ready") {
          watched = String((JSON.parse(next.value.data) as { path?: unknown }).path ?? path ?? "/workspace");
          break;
        }
      }
    } catch (error) {
      controller.abort();
      await events.return(undefined);
      throw controller.signal.reason === notReady ? notReady : error;
    } finally {
      clearTimeout(timer);
    }
    const where = watched;
    const closed = (async (): Promise<WatchEndReason> => {
      try {
        for await (const sse of events) {
          const data = JSON.parse(sse.data || "{}") as Record<string, unknown>;
          if (sse.event === "change") await onEvent(data as WatchEvent);
          else if (sse.event === "overflow") await onEvent({ type: "overflow", message: String(data.message ?? "") });
          else if (sse.event === "limited") await onEvent({ type: "limited", maxDirs: Number(data.maxDirs ?? 0) });
          else if (sse.event === "end") return data.reason === "directory_removed" ? "directory_removed" : "sandbox_destroyed";
        }
        throw new CrowNestConnectionError(`watch ${where}: the stream ended without its end event`);
      } catch (error) {
        if (controller.signal.aborted) return "stopped"; // stop()
        controller.abort();
        await options.onError?.(error);
        throw error;
      }
    })();
    // Whoever does not look at `closed` is told through `onError`.
    closed.catch(() => undefined);
    return {
      path: watched,
      closed,
      async stop(): Promise<void> {
        controller.abort();
        await closed.catch(() => undefined);
      },
    };
  }

  /** Removes a file, symlink or directory (non-empty ones with `recursive`). */
  async delete(path: string, options: { recursive?: boolean } & CallOptions = {}): Promise<void> {
    await this.client.send("DELETE", this.base, {
      query: { path, recursive: options.recursive || undefined },
      timeoutMs: options.requestTimeoutMs,
    });
  }

  /** A directory's entries (default /workspace), sorted by name. */
  list(path?: string, options: CallOptions = {}): Promise<FileListing> {
    return this.client.request<FileListing>("GET", `${this.base}/list`, { query: { path }, timeoutMs: options.requestTimeoutMs });
  }

  stat(path: string, options: CallOptions = {}): Promise<FileData> {
    return this.client.request<FileData>("GET", `${this.base}/stat`, { query: { path }, timeoutMs: options.requestTimeoutMs });
  }

  mkdir(path: string, options: { parents?: boolean } & CallOptions = {}): Promise<FileData> {
    const json: Record<string, unknown> = { path };
    if (options.parents) json.parents = true;
    return this.client.request<FileData>("POST", `${this.base}/mkdir`, { json, timeoutMs: options.requestTimeoutMs });
  }

  /** Moves (renames) within /workspace. */
  move(from: string, to: string, options: { overwrite?: boolean } & CallOptions = {}): Promise<FileData> {
    const json: Record<string, unknown> = { from, to };
    if (options.overwrite) json.overwrite = true;
    return this.client.request<FileData>("POST", `${this.base}/move`, { json, timeoutMs: options.requestTimeoutMs });
  }

  /** Stages an upload: a signed URL for one PUT of the raw bytes, no API key needed. */
  uploadUrl(path: string, options: { sizeBytes?: number } & CallOptions = {}): Promise<TransferData> {
    return this.uploadUrlWithin(path, options.sizeBytes, this.client.deadline(options));
  }

  private uploadUrlWithin(path: string, sizeBytes: number | undefined, deadline: number): Promise<TransferData> {
    const json: Record<string, unknown> = { path };
    if (sizeBytes !== undefined) json.sizeBytes = sizeBytes;
    return this.client.request<TransferData>("POST", `${this.base}/uploads`, { json, deadline });
  }

  /** Stages a download: a signed URL for one GET, no API key needed. */
  downloadUrl(path: string, options: CallOptions = {}): Promise<TransferData> {
    return this.client.request<TransferData>("POST", `${this.base}/downloads`, { json: { path }, timeoutMs: options.requestTimeoutMs });
  }

  /** Writes a file through a staged upload whatever its size (`write` picks for you). */
  async upload(path: string, data: WriteData, options: WriteOptions = {}): Promise<FileData> {
    const { body, size } = writeBody(data, options.size);
    return this.stagedUpload(path, body, size, this.client.deadline(options));
  }

  /** Reads a whole file through a staged download (`readStream` streams it). */
  async download(path: string, options: CallOptions = {}): Promise<Uint8Array> {
    const deadline = this.client.deadline(options);
    const target = await this.client.request<TransferData>("POST", `${this.base}/downloads`, { json: { path }, deadline });
    const response = await this.client.send(target.method, target.url, { signed: true, deadline });
    return new Uint8Array(await response.arrayBuffer());
  }
}

// ------------------------------------------------------------------ artifacts

export class SandboxArtifacts {
  constructor(
    private readonly client: CrowNestClient,
    private readonly sandboxId: string,
  ) {}

  /** Promotes a file of /workspace into durable artifact storage. */
  async create(options: { path: string; name?: string; idempotencyKey?: string } & CallOptions): Promise<ArtifactData> {
    const json: Record<string, unknown> = { path: options.path };
    if (options.name !== undefined) json.name = options.name;
    return this.client.request<ArtifactData>("POST", `/v1/sandboxes/${this.sandboxId}/artifacts`, {
      json,
      idempotencyKey: options.idempotencyKey,
      timeoutMs: options.requestTimeoutMs,
    });
  }

  list(options: { limit?: number } & CallOptions = {}): PageIterator<ArtifactData> {
    return this.client.page<ArtifactData, ArtifactData>(
      `/v1/sandboxes/${this.sandboxId}/artifacts`,
      { limit: options.limit },
      (d) => d,
      options,
    );
  }
}

/** Ports of the sandbox exposed as authenticated URLs. A request to a
 * preview's `url` needs an API key with scope `previews:access` (as
 * `fetch` sends it), or the preview's `token` (a browser opens `browserUrl`). */
export class Previews {
  private readonly base: string;

  constructor(
    private readonly client: CrowNestClient,
    sandboxId: string,
  ) {
    this.base = `/v1/sandboxes/${sandboxId}/previews`;
  }

  /** Exposes `port` (a server in the sandbox listening on it). */
  async create(options: { port: number; idempotencyKey?: string } & CallOptions): Promise<PreviewData> {
    return this.client.request<PreviewData>("POST", this.base, {
      json: { port: options.port },
      idempotencyKey: options.idempotencyKey,
      timeoutMs: options.requestTimeoutMs,
    });
  }

  get(id: string, options: CallOptions = {}): Promise<PreviewData> {
    return this.client.request<PreviewData>("GET", `${this.base}/${id}`, { timeoutMs: options.requestTimeoutMs });
  }

  list(options: { limit?: number } & CallOptions = {}): PageIterator<PreviewData> {
    return this.client.page<PreviewData, PreviewData>(this.base, { limit: options.limit }, (d) => d, options);
  }

  /** Closes the preview; its URL stops working at once. */
  delete(preview: string | { id: string }, options: CallOptions = {}): Promise<PreviewData> {
    const id = typeof preview === "string" ? preview : preview.id;
    return this.client.request<PreviewData>("DELETE", `${this.base}/${id}`, { timeoutMs: options.requestTimeoutMs });
  }

  /** One request to the app behind `preview` (`path` relative to its URL),
   * with this client's API key; the app's response as it is (a `Response`).
   * A preview has its own origin; under `localhost` (the default,
   * `http://prv-….localhost:PORT/`) the request is sent to 127.0.0.1 with
   * that `Host`, since Node's resolver may not know the name. */
  fetch(preview: { url: string }, path = "", init: RequestInit = {}): Promise<Response> {
    return this.client.previewFetch(preview.url + path.replace(/^\/+/, ""), init);
  }
}

export class Artifacts {
  constructor(private readonly client: CrowNestClient) {}

  get(id: string, options: CallOptions = {}): Promise<ArtifactData> {
    return this.client.request<ArtifactData>("GET", `/v1/artifacts/${id}`, { timeoutMs: options.requestTimeoutMs });
  }

  list(options: { limit?: number } & CallOptions = {}): PageIterator<ArtifactData> {
    return this.client.page<ArtifactData, ArtifactData>("/v1/artifacts", { limit: options.limit }, (d) => d, options);
  }

  /** The artifact's content. */
  async download(id: string, options: CallOptions = {}): Promise<Uint8Array> {
    const response = await this.client.send("GET", `/v1/artifacts/${id}/content`, { timeoutMs: options.requestTimeoutMs });
    return new Uint8Array(await response.arrayBuffer());
  }
}

// ------------------------------------------------------------------ templates

export class Templates {
  constructor(private readonly client: CrowNestClient) {}

  async list(options: CallOptions = {}): Promise<TemplateData[]> {
    return (await this.client.request<Page<TemplateData>>("GET", "/v1/templates", { timeoutMs: options.requestTimeoutMs })).data;
  }
}

// ------------------------------------------------------------------ usage and audit

export interface UsageOptions extends CallOptions {
  /** Start of the window (default: 30 days before `to`). */
  from?: Date | string;
  /** End of the window, exclusive (default: now). */
  to?: Date | string;
  /** One line per sandbox (default), project or UTC day. */
  groupBy?: UsageGroupBy;
}

/** Compute usage, metered per second in `computeUnitSeconds` (vCPUs × seconds alive). */
export class Usage {
  constructor(private readonly client: CrowNestClient) {}

  /** `GET /v1/usage` (scope `usage:read`). */
  get(options: UsageOptions = {}): Promise<UsageReport> {
    return this.client.request<UsageReport>("GET", "/v1/usage", {
      query: { from: rfc3339(options.from), to: rfc3339(options.to), groupBy: options.groupBy },
      timeoutMs: options.requestTimeoutMs,
    });
  }
}

export interface ListAuditEventsOptions extends CallOptions {
  /** Only events about this resource (`sbx_…`, `cmd_…`, `key_…`). */
  resourceId?: string;
  /** Only this action, e.g. `sandbox.create`, `sandbox.kill`. */
  action?: AuditAction;
  /** Events at or after this time. */
  from?: Date | string;
  /** Events before this time. */
  to?: Date | string;
  /** Page size, 1 … 200. */
  limit?: number;
  /** Start from this page. */
  cursor?: string;
}

/** What happened in the org: every create, run, write, kill and revoke,
 * denied and failed attempts included. */
export class Audit {
  constructor(private readonly client: CrowNestClient) {}

  /** `GET /v1/audit-events`, newest first, pages fetched lazily (scope `audit:read`). */
  list(options: ListAuditEventsOptions = {}): PageIterator<AuditEvent> {
    const query: Record<string, QueryValue> = {
      resourceId: options.resourceId,
      action: options.action,
      from: rfc3339(options.from),
      to: rfc3339(options.to),
      limit: options.limit,
      cursor: options.cursor,
    };
    return this.client.page<AuditEvent, AuditEvent>("/v1/audit-events", query, (e) => e, options);
  }
}

// ------------------------------------------------------------------ workspace runs

const TERMINAL_RUN_STATUSES: ReadonlySet<WorkspaceRunStatus> = new Set(["succeeded", "failed", "canceled"]);

/** Whether a run has ended (`succeeded`, `failed` or `canceled`). */
export function isTerminalRun(run: { status: string }): boolean {
  return TERMINAL_RUN_STATUSES.has(run.status as WorkspaceRunStatus);
}

/** How long `wait` waits, after the end, for the evidence to be written. */
const EVIDENCE_GRACE_MS = 30_000;

/** Polling interval of `wait`: 200 ms growing to 2 s. */
function pollDelay(attempt: number): number {
  return Math.min(2000, 200 * 1.5 ** attempt);
}

type RunRef = string | { id: string };

function runId(run: RunRef): string {
  return typeof run === "string" ? run : run.id;
}

export interface CreateWorkspaceRunOptions {
  /** Size and SHA-256 of the `.tar.gz` that will be uploaded. */
  archive: ArchiveSpec;
  /** Default (on the server) `python-node`. */
  template?: string;
  /** Files of /workspace to keep as artifacts when the command ends (at most 32). */
  artifacts?: WorkspaceRunArtifactSpec[];
  /** 1 000 … 86 400 000; default 600 000. */
  timeoutMs?: number;
  env?: Record<string, string>;
  /** Keep the sandbox after the run (default false: destroyed). */
  keepSandbox?: boolean;
  /** Kept verbatim, filterable in `list` (at most 16 KiB). */
  metadata?: Record<string, unknown>;
  /** Default: a new random key (reused across the SDK's own retries). */
  idempotencyKey?: string;
}

export interface ListWorkspaceRunsOptions {
  status?: WorkspaceRunStatus;
  /** `metadata.<key>=<value>` filters; every one must match. */
  metadata?: Record<string, string | number | boolean>;
  /** Page size. */
  limit?: number;
  /** Start from this page. */
  cursor?: string;
}

export interface UploadArchiveOptions {
  /** `true`: a staged upload whatever the size; `false`: one direct PUT;
   * default: direct up to 32 MiB, staged above. */
  staged?: boolean;
}

export interface RunDirectoryOptions extends Omit<CreateWorkspaceRunOptions, "archive" | "idempotencyKey"> {
  /** Pack `.git` too (default: skipped). */
  includeGit?: boolean;
  /** Called with each event as it arrives (awaited). */
  onEvent?: (event: WorkspaceRunEvent) => unknown;
  /** See `UploadArchiveOptions.staged`. */
  staged?: boolean;
}

/** What `runDirectory` returns: the terminal run and its Evidence Bundle. */
export interface WorkspaceRunResult {
  run: WorkspaceRun;
  evidence: EvidenceBundle;
}

/** Workspace Runs: upload a `.tar.gz` of a checkout, run one command on it
 * in a fresh sandbox, follow its event log, keep the files named as
 * artifacts, and get a signed Evidence Bundle. `runDirectory` does all of
 * it for a local directory (Node). */
export class WorkspaceRuns {
  constructor(private readonly client: CrowNestClient) {}

  private path(run: RunRef, suffix = ""): string {
    return `/v1/workspace-runs/${runId(run)}${suffix}`;
  }

  /** Creates a run (`awaiting_archive`) for an archive of `archive.sizeBytes` / `archive.sha256`. */
  async create(command: string, options: CreateWorkspaceRunOptions): Promise<WorkspaceRun> {
    const json: Record<string, unknown> = {
      command,
      archive: { sizeBytes: options.archive.sizeBytes, sha256: options.archive.sha256 },
    };
    if (options.template !== undefined) json.template = options.template;
    if (options.artifacts !== undefined) json.artifacts = options.artifacts;
    if (options.timeoutMs !== undefined) json.timeoutMs = options.timeoutMs;
    if (options.env !== undefined) json.env = options.env;
    if (options.keepSandbox !== undefined) json.keepSandbox = options.keepSandbox;
    if (options.metadata !== undefined) json.metadata = options.metadata;
    return this.client.request<WorkspaceRun>("POST", "/v1/workspace-runs", {
      json,
      idempotencyKey: options.idempotencyKey,
    });
  }

  get(run: RunRef): Promise<WorkspaceRun> {
    return this.client.request<WorkspaceRun>("GET", this.path(run));
  }

  /** One page of runs, newest first: `{ data, nextCursor }`. */
  listPage(options: ListWorkspaceRunsOptions = {}): Promise<Page<WorkspaceRun>> {
    const query: Record<string, string | number | undefined> = {
      status: options.status,
      limit: options.limit,
      cursor: options.cursor,
    };
    for (const [key, value] of Object.entries(options.metadata ?? {})) query[`metadata.${key}`] = String(value);
    return this.client.request<Page<WorkspaceRun>>("GET", "/v1/workspace-runs", { query });
  }

  /** Every matching run, newest first, pages fetched lazily:
   * `for await (const run of client.workspaceRuns.list({ status: "running" }))`. */
  list(options: ListWorkspaceRunsOptions = {}): PageIterator<WorkspaceRun> {
    return new PageIterator(async (cursor) => {
      const page = await this.listPage({ ...options, cursor: cursor ?? options.cursor });
      return { items: page.data, next: page.nextCursor ?? null };
    });
  }

  /** Stages an archive upload: a signed URL for one PUT of the raw bytes, no API key needed. */
  archiveUploadUrl(run: RunRef): Promise<TransferData> {
    return this.client.request<TransferData>("POST", this.path(run, "/archive/uploads"));
  }

  /**
   * Uploads the run's `.tar.gz`: bytes, a `Blob`, or a path to the file
   * (Node). Up to 32 MiB in one `PUT …/archive`; larger ones (or with
   * `staged: true`) through a staged upload, a file sent as it is read
   * (Node >= 19.8; read whole on older Node). The server checks size and
   * SHA-256 (`archive_size_mismatch`, `archive_digest_mismatch`: the run
   * still awaits an archive and may be uploaded again).
   */
  async uploadArchive(run: RunRef, archive: Uint8Array | Blob | string, options: UploadArchiveOptions = {}): Promise<WorkspaceRun> {
    const size =
      typeof archive === "string"
        ? (await (await nodeFs()).stat(archive)).size
        : archive instanceof Uint8Array
          ? archive.byteLength
          : archive.size;
    const staged = options.staged ?? size > DIRECT_UPLOAD_MAX;
    if (!staged) {
      const body = typeof archive === "string" ? await (await nodeFs()).readFile(archive) : archive;
      const response = await this.client.send("PUT", this.path(run, "/archive"), { body, headers: OCTET_STREAM });
      return (await response.json()) as WorkspaceRun;
    }
    const target = await this.archiveUploadUrl(run);
    let body: Uint8Array | Blob;
    if (typeof archive === "string") body = (await openAsBlob(archive)) ?? (await (await nodeFs()).readFile(archive));
    else body = archive;
    const response = await this.client.send(target.method, target.url, { body, headers: OCTET_STREAM, signed: true });
    return (await response.json()) as WorkspaceRun;
  }

  /** Queues the run (its archive must have been uploaded). */
  start(run: RunRef): Promise<WorkspaceRun> {
    return this.client.request<WorkspaceRun>("POST", this.path(run, "/start"));
  }

  /** Stops the command and ends the run `canceled` (with evidence). */
  cancel(run: RunRef): Promise<WorkspaceRun> {
    return this.client.request<WorkspaceRun>("POST", this.path(run, "/cancel"));
  }

  /** One page of the run's event log after `afterSeq` (`limit` 1 … 1000). */
  listEvents(run: RunRef, options: { afterSeq?: number; limit?: number } = {}): Promise<WorkspaceRunEventPage> {
    return this.client.request<WorkspaceRunEventPage>("GET", this.path(run, "/events"), {
      query: { afterSeq: options.afterSeq, limit: options.limit },
    });
  }

  /** The run's events after `afterSeq` as they happen (SSE), to the
   * `terminal` event; a finished run's log is replayed. A dropped
   * connection is resumed: no event is repeated or missed. */
  events(run: RunRef, options: { afterSeq?: number } = {}): AsyncGenerator<WorkspaceRunEvent> {
    return this.client.runEvents(runId(run), options.afterSeq ?? 0);
  }

  /** Polls the run until it is terminal and its evidence written
   * (`evidenceReady`; that follows the end by a moment, and is given up to
   * 30 s) and returns it; after `timeoutMs` throws `CrowNestTimeoutError`. */
  async wait(run: RunRef, options: { timeoutMs?: number } = {}): Promise<WorkspaceRun> {
    const deadline = options.timeoutMs === undefined ? null : Date.now() + options.timeoutMs;
    let grace: number | null = null;
    for (let attempt = 0; ; attempt++) {
      const current = await this.get(run);
      if (isTerminalRun(current)) {
        grace ??= Date.now() + EVIDENCE_GRACE_MS;
        if (current.evidenceReady !== false || Date.now() >= grace) return current;
      }
      let delay = pollDelay(attempt);
      if (deadline !== null) {
        const left = deadline - Date.now();
        if (left <= 0) {
          throw new CrowNestTimeoutError(`workspace run ${current.id} is still ${current.status} after ${options.timeoutMs} ms`);
        }
        delay = Math.min(delay, left);
      }
      await sleep(delay);
    }
  }

  /** The run's signed Evidence Bundle; before it is written: `evidence_not_ready`. */
  evidence(run: RunRef): Promise<EvidenceBundle> {
    return this.client.request<EvidenceBundle>("GET", this.path(run, "/evidence"));
  }

  /** The server's evidence signing keys (`GET /v1/evidence-keys`). */
  async evidenceKeys(): Promise<EvidenceKey[]> {
    return (await this.client.request<Page<EvidenceKey>>("GET", "/v1/evidence-keys")).data;
  }

  private async evidenceWhenReady(run: RunRef, timeoutMs = 60_000): Promise<EvidenceBundle> {
    const deadline = Date.now() + timeoutMs;
    for (let attempt = 0; ; attempt++) {
      try {
        return await this.evidence(run);
      } catch (error) {
        if (!(error instanceof CrowNestApiError) || error.code !== "evidence_not_ready" || Date.now() >= deadline) throw error;
      }
      await sleep(pollDelay(attempt));
    }
  }

  /**
   * Packs `dir` (`.gitignore` respected, `.git` skipped unless
   * `includeGit`) into a temporary `.tar.gz`, creates a run for it, uploads
   * it (direct up to 32 MiB, staged above), starts it, passes every event to
   * `onEvent` as it arrives, and returns `{ run, evidence }` once the run is
   * terminal. A failed command is a result (`run.status === "failed"`,
   * `run.exitCode`), not a thrown error. Node only.
   */
  async runDirectory(dir: string, command: string, options: RunDirectoryOptions = {}): Promise<WorkspaceRunResult> {
    const { includeGit, onEvent, staged, ...create } = options;
    const packed = await packDirectory(dir, { includeGit });
    let created: WorkspaceRun;
    try {
      created = await this.create(command, { ...create, archive: packed.archive });
      try {
        await this.uploadArchive(created, packed.path, { staged });
        await this.start(created);
      } catch (error) {
        // It never ran: do not leave it awaiting an archive.
        await this.cancel(created).catch(() => undefined);
        throw error;
      }
    } finally {
      await packed.remove();
    }
    for await (const event of this.events(created)) await onEvent?.(event);
    // The run's record turns terminal, and its evidence is written, a
    // moment after the `terminal` event.
    const run = await this.wait(created);
    return { run, evidence: await this.evidenceWhenReady(created) };
  }
}
