import { DIRECT_UPLOAD_MAX, nodeFs, openAsBlob, packDirectory } from "./archive.js";
import {
  CrowNestApiError,
  CrowNestConnectionError,
  CrowNestError,
  CrowNestTimeoutError,
  apiErrorFromResponse,
} from "./errors.js";
import { SSEDecoder, lines } from "./sse.js";
import type {
  ArchiveSpec,
  ArtifactData,
  CodeContextData,
  CodeLanguage,
  CodeOutput,
  CollectSpec,
  CommandData,
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
  TemplateData,
  TransferData,
  WorkspaceRun,
  WorkspaceRunArtifactSpec,
  WorkspaceRunEvent,
  WorkspaceRunEventPage,
  WorkspaceRunStatus,
} from "./types.js";

export const VERSION = "0.1.0";
export const DEFAULT_BASE_URL = "http://127.0.0.1:7420";

export interface ClientOptions {
  /** Org-scoped API key; default `process.env.CROWNEST_API_KEY`. */
  apiKey?: string;
  /** Default `process.env.CROWNEST_BASE_URL`, else `http://127.0.0.1:7420`. */
  baseUrl?: string;
  /** Per-request timeout in milliseconds (default 660 000: a blocking run
   * waits for its command within one request). */
  timeoutMs?: number;
  /** Retries of a request that failed on the network (default 3). */
  maxRetries?: number;
}

interface RequestOptions {
  json?: unknown;
  body?: Uint8Array | Blob;
  query?: Record<string, string | number | boolean | undefined>;
  idempotencyKey?: string;
  headers?: Record<string, string>;
  /** `path` is a signed transfer URL: sent once, without the API key. */
  signed?: boolean;
}

function env(name: string): string | undefined {
  const p = (globalThis as { process?: { env?: Record<string, string | undefined> } }).process;
  return p?.env?.[name] || undefined;
}

function sleep(ms: number): Promise<void> {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

/** Exponential backoff with jitter: ~250 ms, 500 ms, 1 s, … capped at 8 s. */
function backoff(attempt: number): number {
  return Math.min(8000, 250 * 2 ** attempt) * (0.5 + Math.random() / 2);
}

function errorCode(error: unknown): string | undefined {
  let e: unknown = error;
  for (let i = 0; i < 4 && e; i++) {
    const code = (e as { code?: unknown }).code;
    if (typeof code === "string") return code;
    e = (e as { cause?: unknown }).cause;
  }
  return undefined;
}

/** Whether a network failure may be retried: a connection that could not be
 * made never reached the server; otherwise only idempotent requests (GET,
 * PUT of a whole file, and requests carrying an Idempotency-Key). */
function mayRetry(method: string, hasKey: boolean, error: unknown): boolean {
  const code = errorCode(error);
  if (code === "ECONNREFUSED" || code === "UND_ERR_CONNECT_TIMEOUT" || code === "ENOTFOUND") return true;
  return method === "GET" || method === "PUT" || hasKey;
}

function newIdempotencyKey(): string {
  return globalThis.crypto.randomUUID();
}

function toBytes(data: string | Uint8Array): Uint8Array {
  return typeof data === "string" ? new TextEncoder().encode(data) : data;
}

function base64(bytes: Uint8Array): string {
  let binary = "";
  for (const b of bytes) binary += String.fromCharCode(b);
  return btoa(binary);
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
  }

  /** `GET /v1/health`. */
  health(): Promise<{ status: string; version: string; runtime: string }> {
    return this.request("GET", "/v1/health");
  }

  private url(path: string, query?: RequestOptions["query"]): string {
    const url = new URL(/^https?:\/\//.test(path) ? path : this.baseUrl + path);
    for (const [k, v] of Object.entries(query ?? {})) if (v !== undefined) url.searchParams.set(k, String(v));
    return url.toString();
  }

  /** @internal One API call, with retries; throws `CrowNestApiError` on an error status. */
  async send(method: string, path: string, options: RequestOptions = {}): Promise<Response> {
    const headers: Record<string, string> = {
      accept: "application/json",
      "user-agent": `crownest-typescript/${VERSION}`,
      ...options.headers,
    };
    if (!options.signed) headers["x-api-key"] = this.apiKey;
    if (options.idempotencyKey) headers["idempotency-key"] = options.idempotencyKey;
    let body: string | Uint8Array | Blob | undefined = options.body;
    if (options.json !== undefined) {
      headers["content-type"] = "application/json";
      body = JSON.stringify(options.json);
    }
    const url = this.url(path, options.query);
    for (let attempt = 0; ; attempt++) {
      let response: Response;
      try {
        response = await fetch(url, {
          method,
          headers,
          body: body as BodyInit | undefined,
          signal: AbortSignal.timeout(this.timeoutMs),
        });
      } catch (error) {
        const retryable = !options.signed && mayRetry(method, !!options.idempotencyKey, error);
        if (attempt >= this.maxRetries || !retryable) {
          throw new CrowNestConnectionError(`${method} ${new URL(url).pathname}: ${String(error)}`, { cause: error });
        }
        await sleep(backoff(attempt));
        continue;
      }
      if (response.status >= 400) {
        const error: CrowNestApiError = await apiErrorFromResponse(response);
        // Our own earlier attempt with this key is still being processed.
        if (options.idempotencyKey && error.code === "idempotency_key_in_use" && attempt < this.maxRetries) {
          await sleep(backoff(attempt));
          continue;
        }
        throw error;
      }
      return response;
    }
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

  /** @internal */
  page<T, U>(path: string, limit: number | undefined, wrap: (data: T) => U): PageIterator<U> {
    return new PageIterator(async (cursor) => {
      const body = await this.request<Page<T>>("GET", path, { query: { limit, cursor: cursor ?? undefined } });
      return { items: body.data.map(wrap), next: body.nextCursor ?? null };
    });
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
  async codeStream(path: string, json: unknown, idempotencyKey: string, callbacks: CodeCallbacks): Promise<RunCodeResult> {
    for (let attempt = 0; ; attempt++) {
      // `send` retries a failed connection and a key still in use.
      const response = await this.send("POST", path, { json, idempotencyKey, headers: { accept: "text/event-stream" } });
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
        if (error instanceof CrowNestApiError) throw error;
        if (attempt >= this.maxRetries) throw new CrowNestConnectionError(`POST ${path}: ${String(error)}`, { cause: error });
        await sleep(backoff(attempt));
        continue;
      }
      if (attempt >= this.maxRetries) throw new CrowNestConnectionError(`POST ${path}: the run stream ended before its complete event`);
      await sleep(backoff(attempt));
    }
  }
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
      status: String(payload.status ?? ""),
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

export interface CreateSandboxOptions {
  template: string;
  ttlMs?: number;
  metadata?: Record<string, unknown>;
  /** A narrower egress policy than the template's. */
  network?: NetworkPolicyRequest;
  /** Variables of every command and code context of the sandbox, over the
   * template's `[env]`; the values are never returned. */
  env?: Record<string, string>;
  /** Default: a new random key (reused across the SDK's own retries). */
  idempotencyKey?: string;
}

/** A sandbox: its fields (`id`, `status`, `expiresAt`, …) plus the
 * sub-clients bound to it. */
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
  async refresh(): Promise<this> {
    Object.assign(this, await this.client.request<SandboxData>("GET", `/v1/sandboxes/${this.id}`));
    return this;
  }

  /** Destroys the sandbox; this object then holds its `destroyed` tombstone. */
  async kill(): Promise<this> {
    Object.assign(this, await this.client.request<SandboxData>("DELETE", `/v1/sandboxes/${this.id}`));
    return this;
  }

  /** Narrows the sandbox's egress policy within its template's (`PATCH
   * /v1/sandboxes/{id}/network`, scope `sandboxes:network`); new
   * connections follow it at once. */
  async setNetwork(policy: NetworkPolicyRequest): Promise<this> {
    Object.assign(
      this,
      await this.client.request<SandboxData>("PATCH", `/v1/sandboxes/${this.id}/network`, { json: policy }),
    );
    return this;
  }

  toJSON(): SandboxData {
    const { commands: _c, code: _co, files: _f, artifacts: _a, previews: _p, client: _cl, ...data } = this as unknown as Record<string, unknown>;
    return data as unknown as SandboxData;
  }
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
      idempotencyKey: options.idempotencyKey ?? newIdempotencyKey(),
    });
    return new Sandbox(this.client, data);
  }

  async get(id: string): Promise<Sandbox> {
    return new Sandbox(this.client, await this.client.request<SandboxData>("GET", `/v1/sandboxes/${id}`));
  }

  /** Every sandbox of the org, newest first: `for await (const s of client.sandboxes.list())`. */
  list(options: { limit?: number } = {}): PageIterator<Sandbox> {
    return this.client.page<SandboxData, Sandbox>("/v1/sandboxes", options.limit, (d) => new Sandbox(this.client, d));
  }
}

// ------------------------------------------------------------------ commands

export interface CommandOptions {
  cwd?: string;
  env?: Record<string, string>;
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

  async refresh(): Promise<this> {
    Object.assign(this, await this.client.request<CommandData>("GET", this.path));
    return this;
  }

  /** The log, from the start or after event number `after`: stdout/stderr
   * events, then `exit`. A finished command's log is replayed. */
  logs(options: { after?: number } = {}): AsyncGenerator<LogEvent> {
    return this.client.logStream(`${this.path}/logs`, options.after);
  }

  /** Waits for the command to end and returns its final record. */
  async wait(options: Pick<RunOptions, "onStdout" | "onStderr"> = {}): Promise<CommandData> {
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
  async run(command: string, options: RunOptions = {}): Promise<CommandData> {
    const idempotencyKey = options.idempotencyKey ?? newIdempotencyKey();
    if (!options.onStdout && !options.onStderr) {
      return this.client.request<CommandData>("POST", `/v1/sandboxes/${this.sandboxId}/commands`, {
        json: commandBody(command, options, false),
        idempotencyKey,
      });
    }
    const handle = await this.start(command, { ...options, idempotencyKey });
    return handle.wait({ onStdout: options.onStdout, onStderr: options.onStderr });
  }

  /** Starts a command in the background and returns a handle to it. */
  async start(command: string, options: StartOptions = {}): Promise<Command> {
    const data = await this.client.request<CommandData>("POST", `/v1/sandboxes/${this.sandboxId}/commands`, {
      json: commandBody(command, options, true),
      idempotencyKey: options.idempotencyKey ?? newIdempotencyKey(),
    });
    return new Command(this.client, data);
  }

  async get(commandId: string): Promise<Command> {
    const data = await this.client.request<CommandData>("GET", `/v1/sandboxes/${this.sandboxId}/commands/${commandId}`);
    return new Command(this.client, data);
  }

  list(options: { limit?: number } = {}): PageIterator<Command> {
    return this.client.page<CommandData, Command>(
      `/v1/sandboxes/${this.sandboxId}/commands`,
      options.limit,
      (d) => new Command(this.client, d),
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

export interface CreateContextOptions {
  /** Default `"python"`. */
  language?: CodeLanguage;
  cwd?: string;
  env?: Record<string, string>;
}

export interface RunCodeOptions extends CodeCallbacks {
  code: string;
  /** Default `"python"`. */
  language?: CodeLanguage;
  /** A context id or context; default: the sandbox's default context for the language. */
  contextId?: string | CodeContextData;
  /** `"promote"` turns eligible rich outputs into artifacts; default `"inline"`. */
  artifactPolicy?: "inline" | "promote";
  timeoutMs?: number;
  /** Default: a new random key (reused across the SDK's own retries). */
  idempotencyKey?: string;
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
    return this.client.request<CodeContextData>("POST", `${this.base}/contexts`, { json });
  }

  async listContexts(): Promise<CodeContextData[]> {
    return (await this.client.request<Page<CodeContextData>>("GET", `${this.base}/contexts`)).data;
  }

  getContext(id: string): Promise<CodeContextData> {
    return this.client.request<CodeContextData>("GET", `${this.base}/contexts/${id}`);
  }

  /** Stops the context's interpreter (its state is gone). */
  async deleteContext(context: string | CodeContextData): Promise<void> {
    const id = typeof context === "string" ? context : context.id;
    await this.client.send("DELETE", `${this.base}/contexts/${id}`);
  }

  /**
   * Runs a snippet and returns the result (`stdout`/`stderr` chunks,
   * `outputs`, `error`, …). An exception in the code is `result.error`, not
   * a thrown error. With `onStdout`/`onStderr`/`onOutput` the run is
   * streamed and each chunk or output reaches them as it is produced.
   */
  run(options: RunCodeOptions): Promise<RunCodeResult> {
    const json: Record<string, unknown> = { language: options.language ?? "python", code: options.code };
    if (options.contextId !== undefined) {
      json.contextId = typeof options.contextId === "string" ? options.contextId : options.contextId.id;
    }
    if (options.artifactPolicy !== undefined) json.artifactPolicy = options.artifactPolicy;
    if (options.timeoutMs !== undefined) json.timeoutMs = options.timeoutMs;
    const idempotencyKey = options.idempotencyKey ?? newIdempotencyKey();
    const path = `${this.base}/runs`;
    if (!options.onStdout && !options.onStderr && !options.onOutput) {
      return this.client.request<RunCodeResult>("POST", path, { json, idempotencyKey });
    }
    return this.client.codeStream(path, json, idempotencyKey, options);
  }
}

// ------------------------------------------------------------------ files

/** Files of /workspace; paths are relative to /workspace or absolute under it. */
export class Files {
  private readonly base: string;

  constructor(
    private readonly client: CrowNestClient,
    sandboxId: string,
  ) {
    this.base = `/v1/sandboxes/${sandboxId}/files`;
  }

  /** Writes a whole file (at most 32 MiB; larger: `upload`). Parents are created. */
  async write(path: string, data: string | Uint8Array): Promise<FileData> {
    const response = await this.client.send("PUT", this.base, {
      query: { path },
      body: toBytes(data),
      headers: OCTET_STREAM,
    });
    return (await response.json()) as FileData;
  }

  async read(path: string): Promise<Uint8Array> {
    const response = await this.client.send("GET", this.base, { query: { path } });
    return new Uint8Array(await response.arrayBuffer());
  }

  async readText(path: string): Promise<string> {
    return new TextDecoder().decode(await this.read(path));
  }

  /** Removes a file, symlink or directory (non-empty ones with `recursive`). */
  async delete(path: string, options: { recursive?: boolean } = {}): Promise<void> {
    await this.client.send("DELETE", this.base, { query: { path, recursive: options.recursive || undefined } });
  }

  /** A directory's entries (default /workspace), sorted by name. */
  list(path?: string): Promise<FileListing> {
    return this.client.request<FileListing>("GET", `${this.base}/list`, { query: { path } });
  }

  stat(path: string): Promise<FileData> {
    return this.client.request<FileData>("GET", `${this.base}/stat`, { query: { path } });
  }

  mkdir(path: string, options: { parents?: boolean } = {}): Promise<FileData> {
    const json: Record<string, unknown> = { path };
    if (options.parents) json.parents = true;
    return this.client.request<FileData>("POST", `${this.base}/mkdir`, { json });
  }

  /** Moves (renames) within /workspace. */
  move(from: string, to: string, options: { overwrite?: boolean } = {}): Promise<FileData> {
    const json: Record<string, unknown> = { from, to };
    if (options.overwrite) json.overwrite = true;
    return this.client.request<FileData>("POST", `${this.base}/move`, { json });
  }

  /** Stages an upload: a signed URL for one PUT of the raw bytes, no API key needed. */
  uploadUrl(path: string, options: { sizeBytes?: number } = {}): Promise<TransferData> {
    const json: Record<string, unknown> = { path };
    if (options.sizeBytes !== undefined) json.sizeBytes = options.sizeBytes;
    return this.client.request<TransferData>("POST", `${this.base}/uploads`, { json });
  }

  /** Stages a download: a signed URL for one GET, no API key needed. */
  downloadUrl(path: string): Promise<TransferData> {
    return this.client.request<TransferData>("POST", `${this.base}/downloads`, { json: { path } });
  }

  /** Writes a file of any size through a staged upload. */
  async upload(path: string, data: string | Uint8Array): Promise<FileData> {
    const bytes = toBytes(data);
    const target = await this.uploadUrl(path, { sizeBytes: bytes.byteLength });
    const response = await this.client.send(target.method, target.url, {
      body: bytes,
      headers: OCTET_STREAM,
      signed: true,
    });
    return (await response.json()) as FileData;
  }

  /** Reads a file of any size through a staged download. */
  async download(path: string): Promise<Uint8Array> {
    const target = await this.downloadUrl(path);
    const response = await this.client.send(target.method, target.url, { signed: true });
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
  create(options: { path: string; name?: string; idempotencyKey?: string }): Promise<ArtifactData> {
    const json: Record<string, unknown> = { path: options.path };
    if (options.name !== undefined) json.name = options.name;
    return this.client.request<ArtifactData>("POST", `/v1/sandboxes/${this.sandboxId}/artifacts`, {
      json,
      idempotencyKey: options.idempotencyKey ?? newIdempotencyKey(),
    });
  }

  list(options: { limit?: number } = {}): PageIterator<ArtifactData> {
    return this.client.page<ArtifactData, ArtifactData>(
      `/v1/sandboxes/${this.sandboxId}/artifacts`,
      options.limit,
      (d) => d,
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
  create(options: { port: number; idempotencyKey?: string }): Promise<PreviewData> {
    return this.client.request<PreviewData>("POST", this.base, {
      json: { port: options.port },
      idempotencyKey: options.idempotencyKey ?? newIdempotencyKey(),
    });
  }

  get(id: string): Promise<PreviewData> {
    return this.client.request<PreviewData>("GET", `${this.base}/${id}`);
  }

  list(options: { limit?: number } = {}): PageIterator<PreviewData> {
    return this.client.page<PreviewData, PreviewData>(this.base, options.limit, (d) => d);
  }

  /** Closes the preview; its URL stops working at once. */
  delete(preview: string | { id: string }): Promise<PreviewData> {
    const id = typeof preview === "string" ? preview : preview.id;
    return this.client.request<PreviewData>("DELETE", `${this.base}/${id}`);
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

  get(id: string): Promise<ArtifactData> {
    return this.client.request<ArtifactData>("GET", `/v1/artifacts/${id}`);
  }

  list(options: { limit?: number } = {}): PageIterator<ArtifactData> {
    return this.client.page<ArtifactData, ArtifactData>("/v1/artifacts", options.limit, (d) => d);
  }

  /** The artifact's content. */
  async download(id: string): Promise<Uint8Array> {
    const response = await this.client.send("GET", `/v1/artifacts/${id}/content`);
    return new Uint8Array(await response.arrayBuffer());
  }
}

// ------------------------------------------------------------------ templates

export class Templates {
  constructor(private readonly client: CrowNestClient) {}

  async list(): Promise<TemplateData[]> {
    return (await this.client.request<Page<TemplateData>>("GET", "/v1/templates")).data;
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
  create(command: string, options: CreateWorkspaceRunOptions): Promise<WorkspaceRun> {
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
      idempotencyKey: options.idempotencyKey ?? newIdempotencyKey(),
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
