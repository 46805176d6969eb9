// Previews are isolated from each other, checked in a real headless
// Chromium (Debian's /usr/bin/chromium, driven by playwright-core; no
// browser is ever downloaded).
//
// Starts its own `crownest serve` on 127.0.0.1 (temp data dir), mints an
// all-scopes key, and runs the same small python app in two sandboxes, A
// and B, each previewed on port 8000 (pa, pb). The app logs every request
// it sees (one JSON line: method, path, headers) to /workspace/requests.log;
// `/` is an HTML page, `/setcookie` sets `app_<A|B>=1` and also tries to set
// `crownest_preview_token=forged`, `Service-Worker-Allowed: /` and
// `Clear-Site-Data: "*"`, and `/echo` answers the request headers as JSON.
//
// In one browser profile it opens pb.browserUrl (B's cookie session), B's
// /setcookie, then pa.browserUrl and A's /setcookie, and checks that:
//   - A's page cannot read B: a credentialed fetch of B's /echo fails
//     (CORS, TypeError), and B in an iframe is out of A's reach;
//   - A's document.cookie has no app_B; the preview cookie is HttpOnly
//     (not in document.cookie) on both pages;
//   - one preview's token opens no other (401, in the address or as the
//     cookie, both ways);
//   - each preview cookie is host-only on its own preview's host, holds its
//     real token (never `forged`), and B still loads from the cookie
//     session after its /setcookie;
//   - no response the browser got carried Service-Worker-Allowed,
//     Clear-Site-Data or a Set-Cookie of crownest_preview_token, while the
//     app's own Set-Cookie did get through;
//   - no request A's app saw (its requests.log, read back with the files
//     API) carried B's token, the app_B cookie, or any
//     crownest_preview_token at all (nor did B's app).
// Always cleans up (sandboxes killed, server SIGTERMed and waited for, temp
// dirs removed, browser closed), and exits 1 on any failed check.
//
// Run it with scripts/browser-test (installs Chromium and playwright-core
// first). Needs root (runc) and the built binaries target/debug/crownest
// and target/x86_64-unknown-linux-musl/debug/crownest-agent
// ($CARGO_TARGET_DIR is honoured).

import { spawn, execFileSync } from 'node:child_process';
import { existsSync, mkdtempSync, rmSync } from 'node:fs';
import http from 'node:http';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { chromium } from 'playwright-core';

const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..', '..');
const TARGET = process.env.CARGO_TARGET_DIR
  ? path.resolve(process.env.CARGO_TARGET_DIR)
  : path.join(ROOT, 'target');
const CROWNEST = path.join(TARGET, 'debug', 'crownest');
const AGENT = ['debug', 'release']
  .map((p) => path.join(TARGET, 'x86_64-unknown-linux-musl', p, 'crownest-agent'))
  .find((p) => existsSync(p));
const CHROMIUM = process.env.CHROMIUM || '/usr/bin/chromium';
const TOKEN_COOKIE = 'crownest_preview_token';
// The whole test, setup included, must finish well within this.
const DEADLINE_MS = 240_000;

/** The app of both sandboxes: `python3 app.py A` or `python3 app.py B`. */
const APP = String.raw`
import http.server, json, sys, threading

NAME = sys.argv[1]
LOG = "/workspace/requests.log"
lock = threading.Lock()

class Handler(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def answer(self, status, ctype, body, extra=()):
        body = body.encode()
        self.send_response(status)
        self.send_header("content-type", ctype)
        self.send_header("content-length", str(len(body)))
        self.send_header("cache-control", "no-store")
        for name, value in extra:
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def do_GET(self):
        with lock, open(LOG, "a") as log:
            log.write(json.dumps({
                "method": self.command,
                "path": self.path,
                "headers": [[k, v] for k, v in self.headers.items()],
            }) + "\n")
        route = self.path.split("?", 1)[0]
        if route == "/":
            self.answer(200, "text/html; charset=utf-8",
                "<!doctype html><title>app " + NAME + "</title><h1 id=app>" + NAME + "</h1>")
        elif route == "/setcookie":
            self.answer(200, "text/html; charset=utf-8",
                "<!doctype html><title>cookie " + NAME + "</title><p id=app>" + NAME + "</p>", [
                ("Set-Cookie", "app_" + NAME + "=1; Path=/"),
                ("Set-Cookie", "crownest_preview_token=forged; Path=/"),
                ("Service-Worker-Allowed", "/"),
                ("Clear-Site-Data", '"*"'),
            ])
        elif route == "/echo":
            self.answer(200, "application/json",
                json.dumps({"app": NAME, "headers": {k.lower(): v for k, v in self.headers.items()}}))
        else:
            self.answer(404, "text/plain", "not found")

    do_HEAD = do_GET

http.server.ThreadingHTTPServer(("127.0.0.1", 8000), Handler).serve_forever()
`;

// ---------------------------------------------------------------- checks

const results = { passed: 0, failed: [] };

/** A soft check: recorded, printed, and the test goes on. */
function check(name, ok, detail = '') {
  if (ok) {
    results.passed += 1;
    console.log(`ok   - ${name}`);
  } else {
    results.failed.push(name);
    console.log(`FAIL - ${name}${detail ? `\n       ${detail}` : ''}`);
  }
  return ok;
}

/** A hard requirement (setup): stops the test. */
function must(ok, message) {
  if (!ok) throw new Error(message);
}

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

// ---------------------------------------------------------------- server

const state = {
  dataDir: null,
  profileDir: null,
  server: null,
  serverExited: null,
  serverLog: [],
  base: null,
  key: null,
  sandboxes: [],
  context: null,
};

async function startServer() {
  must(existsSync(CROWNEST), `${CROWNEST} is missing: build it with \`cargo build -p crownest\``);
  must(
    AGENT,
    'crownest-agent is missing: build it with `cargo build -p crownest-agent --target x86_64-unknown-linux-musl`',
  );
  state.dataDir = mkdtempSync(path.join('/tmp', 'cn-browser-'));
  const child = spawn(
    CROWNEST,
    ['serve', '--listen', '127.0.0.1:0', '--data-dir', state.dataDir, '--agent-binary', AGENT],
    {
      env: { ...process.env, CROWNEST_LOG: process.env.CROWNEST_LOG || 'info,tower_http=warn' },
      stdio: ['ignore', 'pipe', 'pipe'],
    },
  );
  state.server = child;
  state.serverExited = new Promise((resolve) => child.once('exit', (code, signal) => resolve({ code, signal })));
  // Keep the server's log (printed on failure); keep draining both pipes.
  child.stderr.setEncoding('utf8');
  child.stderr.on('data', (chunk) => {
    state.serverLog.push(chunk);
    if (state.serverLog.length > 400) state.serverLog.splice(0, 100);
  });
  child.stdout.setEncoding('utf8');
  state.base = await new Promise((resolve, reject) => {
    let buffered = '';
    let found = false;
    const timer = setTimeout(() => reject(new Error('the server did not start listening within 60 s')), 60_000);
    child.stdout.on('data', (chunk) => {
      if (found) return;
      buffered += chunk;
      const m = buffered.match(/crownest listening on (http:\/\/\S+)/);
      if (m) {
        found = true;
        clearTimeout(timer);
        resolve(m[1]);
      }
    });
    child.once('exit', (code, signal) => {
      clearTimeout(timer);
      if (!found) reject(new Error(`the server exited before listening (code ${code}, signal ${signal})`));
    });
  });
  state.key = execFileSync(
    CROWNEST,
    ['keys', 'create', '--org', 'browser', '--scopes', 'all', '--data-dir', state.dataDir],
    { encoding: 'utf8', stdio: ['ignore', 'pipe', 'pipe'] },
  ).trim();
  must(state.key.startsWith('cn_'), `keys create printed no key: ${state.key}`);
}

async function stopServer() {
  const child = state.server;
  if (!child || child.exitCode !== null || child.signalCode !== null) return;
  child.kill('SIGTERM');
  const stopped = await Promise.race([state.serverExited, sleep(30_000).then(() => null)]);
  if (!stopped) {
    console.error('preview isolation: the server did not stop within 30 s of SIGTERM; killing it');
    child.kill('SIGKILL');
    await state.serverExited;
  }
}

/** A JSON API call with the key: { status, body } (body raw text when not JSON). */
async function api(method, route, body, { raw = false } = {}) {
  const headers = { 'x-api-key': state.key };
  let payload;
  if (raw) {
    payload = body;
    headers['content-type'] = 'application/octet-stream';
  } else if (body !== undefined) {
    payload = JSON.stringify(body);
    headers['content-type'] = 'application/json';
  }
  const response = await fetch(state.base + route, {
    method,
    headers,
    body: payload,
    signal: AbortSignal.timeout(30_000),
  });
  const text = await response.text();
  let parsed = text;
  try {
    parsed = JSON.parse(text);
  } catch {
    // not JSON: keep the text
  }
  return { status: response.status, body: parsed, text };
}

/** GET of a preview URL from Node (its `*.localhost` host sent to the
 * server's loopback address, as Chromium resolves it), with the key. */
function previewStatus(url, credential = { 'x-api-key': state.key }) {
  const target = new URL(url);
  const server = new URL(state.base);
  return new Promise((resolve, reject) => {
    const request = http.request(
      {
        host: server.hostname,
        port: server.port,
        path: target.pathname + target.search,
        method: 'GET',
        headers: { host: target.host, ...credential },
        timeout: 10_000,
      },
      (response) => {
        response.resume();
        response.on('end', () => resolve(response.statusCode));
      },
    );
    request.on('timeout', () => request.destroy(new Error('timeout')));
    request.on('error', reject);
    request.end();
  });
}

/** A python sandbox running APP as `name` on port 8000, and its preview,
 * once the app answers. */
async function sandboxWithApp(name) {
  const created = await api('POST', '/v1/sandboxes', { template: 'python' });
  must(created.status === 201, `create sandbox ${name}: ${created.status} ${created.text}`);
  const id = created.body.id;
  state.sandboxes.push(id);
  const written = await api('PUT', `/v1/sandboxes/${id}/files?path=app.py`, APP, { raw: true });
  must(written.status >= 200 && written.status < 300, `write app.py in ${name}: ${written.status} ${written.text}`);
  const started = await api('POST', `/v1/sandboxes/${id}/commands`, {
    command: `python3 app.py ${name}`,
    background: true,
  });
  must(started.status === 200 || started.status === 201, `start app ${name}: ${started.status} ${started.text}`);
  const preview = await api('POST', `/v1/sandboxes/${id}/previews`, { port: 8000 });
  must(preview.status === 201, `create preview of ${name}: ${preview.status} ${preview.text}`);
  const p = preview.body;
  must(
    typeof p.url === 'string' && typeof p.token === 'string' && typeof p.browserUrl === 'string',
    `preview of ${name} lacks url/token/browserUrl: ${preview.text}`,
  );
  must(
    p.browserUrl === `${p.url}?${TOKEN_COOKIE}=${p.token}`,
    `preview of ${name}: browserUrl ${p.browserUrl} is not url + ?${TOKEN_COOKIE}=token`,
  );
  // 502 until the app listens.
  let status = 0;
  for (let i = 0; i < 150; i += 1) {
    status = await previewStatus(p.url);
    if (status !== 502) break;
    await sleep(100);
  }
  must(status === 200, `app ${name} never answered through its preview (last status ${status})`);
  return { name, sandbox: id, ...p, host: new URL(p.url).host, hostname: new URL(p.url).hostname };
}

/** The app's request log, one parsed JSON line per request. */
async function requestLog(app) {
  const got = await api('GET', `/v1/sandboxes/${app.sandbox}/files?path=requests.log`);
  must(got.status === 200, `read requests.log of ${app.name}: ${got.status} ${got.text}`);
  return got.text
    .split('\n')
    .filter((line) => line.trim())
    .map((line) => JSON.parse(line));
}

// ---------------------------------------------------------------- browser

/** What a page sees of itself: its document.cookie, and the app's name. */
async function pageView(page) {
  return page.evaluate(() => ({
    cookie: document.cookie,
    app: document.getElementById('app')?.textContent ?? null,
    origin: location.origin,
  }));
}

async function run() {
  await startServer();
  console.log(`preview isolation: server at ${state.base}`);
  const a = await sandboxWithApp('A');
  const b = await sandboxWithApp('B');
  console.log(`preview isolation: A = ${a.url} (${a.sandbox}), B = ${b.url} (${b.sandbox})`);
  must(a.host !== b.host, `both previews got the same host ${a.host}`);

  must(existsSync(CHROMIUM), `${CHROMIUM} is missing: install Debian's chromium (scripts/browser-test does)`);
  state.profileDir = mkdtempSync(path.join(tmpdir(), 'cn-chromium-'));
  state.context = await chromium.launchPersistentContext(state.profileDir, {
    executablePath: CHROMIUM,
    headless: true,
    args: [
      '--no-sandbox',
      '--disable-gpu',
      '--disable-quic',
      '--no-first-run',
      '--disable-background-networking',
      '--disable-component-update',
      '--disable-sync',
    ],
  });
  const context = state.context;
  context.setDefaultTimeout(20_000);

  // Every response the browser gets from a preview host, with all its headers.
  const seen = [];
  context.on('response', (response) => {
    const host = new URL(response.url()).host;
    if (host !== a.host && host !== b.host) return;
    seen.push(
      response
        .allHeaders()
        .then((headers) => ({ url: response.url(), status: response.status(), headers }))
        .catch((e) => ({ url: response.url(), status: response.status(), headers: null, error: String(e) })),
    );
  });

  // --- B: the token in the address becomes B's cookie session.
  const pageB = context.pages()[0] ?? (await context.newPage());
  let response = await pageB.goto(b.browserUrl);
  check('B: opening browserUrl lands on B\'s page without the token in the address',
    response?.status() === 200 && pageB.url() === b.url && (await pageView(pageB)).app === 'B',
    `status ${response?.status()}, url ${pageB.url()}`);
  response = await pageB.goto(`${b.url}setcookie`);
  check('B: /setcookie answers 200 through the preview', response?.status() === 200, `status ${response?.status()}`);
  // The forged cookie and Clear-Site-Data must not have touched the session.
  response = await pageB.goto(b.url);
  const viewB = await pageView(pageB);
  check('B: still served from the cookie session after its /setcookie', response?.status() === 200 && viewB.app === 'B',
    `status ${response?.status()}, page ${JSON.stringify(viewB)}`);
  check('B: document.cookie has the app\'s own app_B=1', /(^|; )app_B=1(;|$)/.test(viewB.cookie), `document.cookie = ${JSON.stringify(viewB.cookie)}`);
  check(`B: ${TOKEN_COOKIE} is HttpOnly (not in document.cookie)`, !viewB.cookie.includes(TOKEN_COOKIE) && !viewB.cookie.includes(b.token),
    `document.cookie = ${JSON.stringify(viewB.cookie)}`);

  // --- A: its own session and cookie.
  const pageA = await context.newPage();
  response = await pageA.goto(a.browserUrl);
  check('A: opening browserUrl lands on A\'s page without the token in the address',
    response?.status() === 200 && pageA.url() === a.url && (await pageView(pageA)).app === 'A',
    `status ${response?.status()}, url ${pageA.url()}`);
  response = await pageA.goto(`${a.url}setcookie`);
  check('A: /setcookie answers 200 through the preview', response?.status() === 200, `status ${response?.status()}`);
  response = await pageA.goto(a.url);
  const viewA = await pageView(pageA);
  check('A: still served from the cookie session after its /setcookie', response?.status() === 200 && viewA.app === 'A',
    `status ${response?.status()}, page ${JSON.stringify(viewA)}`);
  check('A: document.cookie has app_A=1 and no app_B',
    /(^|; )app_A=1(;|$)/.test(viewA.cookie) && !viewA.cookie.includes('app_B'),
    `document.cookie = ${JSON.stringify(viewA.cookie)}`);
  check(`A: ${TOKEN_COOKIE} is HttpOnly (not in document.cookie)`,
    !viewA.cookie.includes(TOKEN_COOKIE) && !viewA.cookie.includes(a.token) && !viewA.cookie.includes(b.token),
    `document.cookie = ${JSON.stringify(viewA.cookie)}`);

  // --- A tries to read B.
  const attempts = await pageA.evaluate(async (bUrl) => {
    const attempt = async (init) => {
      try {
        const r = await fetch(`${bUrl}echo`, init);
        const body = await r.text();
        return { read: true, status: r.status, type: r.type, body };
      } catch (e) {
        return { read: false, name: e?.name, message: String(e?.message ?? e) };
      }
    };
    const credentialed = await attempt({ credentials: 'include' });
    const plain = await attempt({});
    // no-cors: an opaque response, whose body must be empty to A.
    const opaque = await attempt({ mode: 'no-cors', credentials: 'include' });
    // B in an iframe: its document must be out of A's reach.
    const frame = await new Promise((resolve) => {
      const iframe = document.createElement('iframe');
      const timer = setTimeout(() => resolve({ loaded: false }), 10_000);
      iframe.onload = () => {
        clearTimeout(timer);
        try {
          const doc = iframe.contentDocument;
          const text = doc ? doc.body?.innerText ?? '' : null;
          resolve({ loaded: true, readable: doc !== null, text });
        } catch (e) {
          resolve({ loaded: true, readable: false, name: e?.name, message: String(e?.message ?? e) });
        }
      };
      iframe.src = bUrl;
      document.body.appendChild(iframe);
    });
    return { credentialed, plain, opaque, frame };
  }, b.url);
  check('A cannot read B: credentialed fetch of B\'s /echo fails with a TypeError (CORS)',
    !attempts.credentialed.read && attempts.credentialed.name === 'TypeError',
    JSON.stringify(attempts.credentialed));
  check('A cannot read B: plain fetch of B\'s /echo fails with a TypeError (CORS)',
    !attempts.plain.read && attempts.plain.name === 'TypeError',
    JSON.stringify(attempts.plain));
  check('A cannot read B: a no-cors fetch of B is opaque and empty',
    !attempts.opaque.read || (attempts.opaque.type === 'opaque' && attempts.opaque.body === '' && attempts.opaque.status === 0),
    JSON.stringify(attempts.opaque));
  check('A cannot read B: B\'s document in an iframe is out of A\'s reach',
    attempts.frame.loaded === false || attempts.frame.readable === false,
    JSON.stringify(attempts.frame));

  // --- A's token is no key to B (nor B's to A), in the address or as the cookie.
  const crossed = {
    aTokenOnB: await previewStatus(`${b.url}?${TOKEN_COOKIE}=${a.token}`, {}),
    aCookieOnB: await previewStatus(`${b.url}echo`, { cookie: `${TOKEN_COOKIE}=${a.token}` }),
    bTokenOnA: await previewStatus(`${a.url}?${TOKEN_COOKIE}=${b.token}`, {}),
    bCookieOnA: await previewStatus(`${a.url}echo`, { cookie: `${TOKEN_COOKIE}=${b.token}` }),
  };
  check('one preview\'s token opens no other preview (401, query and cookie, both ways)',
    Object.values(crossed).every((status) => status === 401), JSON.stringify(crossed));

  // --- The cookie jar.
  const jar = await context.cookies();
  const tokenCookies = jar.filter((c) => c.name === TOKEN_COOKIE);
  const jarText = JSON.stringify(jar.map(({ name, value, domain, path: p, httpOnly, sameSite }) =>
    ({ name, value: value.slice(0, 14), domain, path: p, httpOnly, sameSite })));
  const bToken = tokenCookies.filter((c) => c.domain === b.hostname);
  const aToken = tokenCookies.filter((c) => c.domain === a.hostname);
  check(`jar: exactly one ${TOKEN_COOKIE} per preview, each on its own host only (no Domain)`,
    tokenCookies.length === 2 && bToken.length === 1 && aToken.length === 1, jarText);
  check(`jar: B's ${TOKEN_COOKIE} holds B's real token (never "forged"), HttpOnly, SameSite=Lax, Path=/`,
    bToken.length === 1 && bToken[0].value === b.token && bToken[0].httpOnly && bToken[0].sameSite === 'Lax' && bToken[0].path === '/',
    jarText);
  check(`jar: A's ${TOKEN_COOKIE} holds A's real token (never "forged")`,
    aToken.length === 1 && aToken[0].value === a.token && aToken[0].httpOnly, jarText);
  check('jar: no cookie anywhere has the value "forged"', !jar.some((c) => c.value === 'forged'), jarText);
  check('jar: no cookie is shared across hosts (all host-only: no leading-dot domain)',
    !jar.some((c) => c.domain.startsWith('.') || c.domain === 'localhost'), jarText);
  check('jar: app_B lives on B\'s host only, app_A on A\'s host only',
    jar.filter((c) => c.name === 'app_B').every((c) => c.domain === b.hostname)
      && jar.filter((c) => c.name === 'app_A').every((c) => c.domain === a.hostname)
      && jar.some((c) => c.name === 'app_B') && jar.some((c) => c.name === 'app_A'),
    jarText);

  // --- The responses the browser got.
  const responses = await Promise.all(seen);
  const withHeaders = responses.filter((r) => r.headers);
  const bad = withHeaders.filter((r) => 'service-worker-allowed' in r.headers || 'clear-site-data' in r.headers);
  const setCookies = withHeaders.flatMap((r) => (r.headers['set-cookie'] ?? '').split('\n').filter(Boolean).map((c) => ({ url: r.url, c })));
  const forgedSet = setCookies.filter(({ c }) => c.trim().startsWith(`${TOKEN_COOKIE}=`) && !c.includes(a.token) && !c.includes(b.token));
  check('responses: some were seen, each with its headers',
    responses.length >= 6 && withHeaders.length === responses.length,
    JSON.stringify(responses.map((r) => [r.url, r.status, r.error ?? 'ok'])));
  check('responses: none carried Service-Worker-Allowed or Clear-Site-Data', bad.length === 0,
    JSON.stringify(bad.map((r) => ({ url: r.url, swa: r.headers['service-worker-allowed'], csd: r.headers['clear-site-data'] }))));
  check(`responses: none carried a Set-Cookie of ${TOKEN_COOKIE} but the server's own`, forgedSet.length === 0,
    JSON.stringify(forgedSet));
  check('responses: the apps\' own Set-Cookie (app_A, app_B) did get through',
    setCookies.some(({ url, c }) => url === `${a.url}setcookie` && c.startsWith('app_A=1'))
      && setCookies.some(({ url, c }) => url === `${b.url}setcookie` && c.startsWith('app_B=1')),
    JSON.stringify(setCookies));

  await state.context.close();
  state.context = null;

  // --- What the apps saw.
  const logA = await requestLog(a);
  const logB = await requestLog(b);
  const headerOf = (entry, name) => entry.headers.filter(([k]) => k.toLowerCase() === name).map(([, v]) => v);
  const cookiesOf = (entry) => headerOf(entry, 'cookie').join('; ');
  const browserA = logA.filter((e) => headerOf(e, 'user-agent').some((ua) => ua.includes('Chrome')));
  check('A\'s log: has the browser\'s requests, with the app_A cookie',
    browserA.some((e) => e.path === '/setcookie') && browserA.some((e) => /(^|; )app_A=1(;|$)/.test(cookiesOf(e))),
    JSON.stringify(logA.map((e) => [e.path, cookiesOf(e)])));
  const leakB = logA.filter((e) => JSON.stringify(e).includes(b.token));
  check('A\'s log: no request carried B\'s preview token', leakB.length === 0, JSON.stringify(leakB));
  const appB = logA.filter((e) => cookiesOf(e).includes('app_B'));
  check('A\'s log: no request carried the app_B cookie', appB.length === 0, JSON.stringify(appB));
  const anyToken = logA.filter((e) => JSON.stringify(e).includes(TOKEN_COOKIE) || JSON.stringify(e).includes(a.token));
  check(`A's log: no request carried any ${TOKEN_COOKIE} (cookie or query) nor A's token`, anyToken.length === 0, JSON.stringify(anyToken));
  const keyA = logA.filter((e) => JSON.stringify(e).includes(state.key));
  check('A\'s log: no request carried the API key', keyA.length === 0, `${keyA.length} requests`);
  const leakBLog = logB.filter((e) => JSON.stringify(e).includes(TOKEN_COOKIE) || JSON.stringify(e).includes(a.token) || JSON.stringify(e).includes(b.token) || cookiesOf(e).includes('app_A'));
  check(`B's log: no request carried a ${TOKEN_COOKIE}, either token, or app_A`, leakBLog.length === 0, JSON.stringify(leakBLog));

  // Not a check (what the browser does, not the server): whether A's
  // cross-origin requests reached B's app at all, and with which cookies.
  const fromA = logB.filter((e) => headerOf(e, 'origin').includes(new URL(a.url).origin)
    || headerOf(e, 'referer').some((r) => r.startsWith(a.url)));
  const bEcho = responses.filter((r) => r.url === `${b.url}echo`).map((r) => r.status);
  console.log(`note - the browser's answers to A's fetches of B's /echo: ${JSON.stringify(bEcho)}`
    + (bEcho.length && bEcho.every((s) => s === 401)
      ? ' (401: Chromium sent B\'s cookie on none of them, the *.localhost hosts being cross-site to each other)'
      : ''));
  console.log(`note - requests from A's page that reached B's app: ${fromA.length}`
    + (fromA.length ? ` (paths ${fromA.map((e) => e.path).join(', ')}; cookies seen: ${JSON.stringify(fromA.map(cookiesOf))})` : ''));
}

// ---------------------------------------------------------------- cleanup

async function cleanup() {
  if (state.context) {
    await state.context.close().catch((e) => console.error(`preview isolation: closing the browser: ${e}`));
    state.context = null;
  }
  for (const id of state.sandboxes.splice(0)) {
    try {
      const killed = await api('DELETE', `/v1/sandboxes/${id}`);
      if (killed.status >= 300) console.error(`preview isolation: kill ${id}: ${killed.status} ${killed.text}`);
    } catch (e) {
      console.error(`preview isolation: kill ${id}: ${e}`);
    }
  }
  await stopServer();
  for (const dir of [state.profileDir, state.dataDir]) {
    if (dir) rmSync(dir, { recursive: true, force: true });
  }
  state.profileDir = state.dataDir = null;
}

let cleaning = null;
const cleanOnce = () => (cleaning ??= cleanup());

// A hard stop (signal, watchdog) still cleans up; a crash of this process
// at least takes the server with it.
process.on('exit', () => {
  if (state.server && state.server.exitCode === null && state.server.signalCode === null) {
    state.server.kill('SIGKILL');
  }
});
for (const signal of ['SIGINT', 'SIGTERM']) {
  process.once(signal, async () => {
    console.error(`preview isolation: ${signal}: cleaning up`);
    await cleanOnce().catch(() => {});
    process.exit(130);
  });
}
const watchdog = setTimeout(async () => {
  console.error(`preview isolation: FAILED: did not finish within ${DEADLINE_MS / 1000} s`);
  await cleanOnce().catch(() => {});
  process.exit(1);
}, DEADLINE_MS);

const started = Date.now();
let error = null;
try {
  await run();
} catch (e) {
  error = e;
}
try {
  await cleanOnce();
} catch (e) {
  console.error(`preview isolation: cleanup failed: ${e?.stack ?? e}`);
  error ??= e;
}
clearTimeout(watchdog);

const seconds = ((Date.now() - started) / 1000).toFixed(1);
if (error) {
  results.failed.push('setup');
  console.error(`preview isolation: FAILED: ${error?.message ?? error}`);
  if (error?.stack) console.error(error.stack.split('\n').slice(1, 6).join('\n'));
}
if (results.failed.length) {
  const log = state.serverLog.join('').replace(/\x1b\[[0-9;]*m/g, '').trim().split('\n').slice(-40).join('\n');
  if (log) console.error(`preview isolation: the server's last log lines:\n${log}`);
  console.error(`preview isolation: FAILED (${seconds} s): ${results.failed.join('; ')}`);
} else {
  console.log(`preview isolation: all checks passed (${seconds} s)`);
}
console.log(`${results.passed} passed, ${results.failed.length} failed`);
process.exit(results.failed.length ? 1 : 0);
