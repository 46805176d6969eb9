// CrowNest JavaScript/TypeScript code-context runner: one persistent
// `vm` context per Code Context, started by crownest-agent inside the
// sandbox as `node node_runner.js javascript|typescript`.
//
// Protocol (same as python_runner.py): run requests ({"id","code"} or
// {"setup":{"cwd","env"}} -> setup_done|setup_error) as JSON lines on fd 3,
// Jupyter-shaped events as JSON lines on fd 4:
//   {"type":"ready","implementation":"node 18.19.0"}
//   {"id":1,"type":"stream","name":"stdout","text":"..."}
//   {"id":1,"type":"display_data","data":{mime: value},"metadata":{}}
//   {"id":1,"type":"execute_result","execution_count":1,"data":{...}}
//   {"id":1,"type":"error","ename":"...","evalue":"...","traceback":[...]}
//   {"id":1,"type":"done","execution_count":1,"status":"ok"|"error","nonce":"…"}
//
// Top-level `let`/`const`/`class` persist across runs (one global lexical
// scope per context, as in Node's REPL). Code with top-level `await` runs in
// an async wrapper whose top-level declarations are hoisted onto the context
// global, so they persist too. SIGINT interrupts the running code and the
// context stays usable.
"use strict";

const fs = require("fs");
const readline = require("readline");
const util = require("util");
const vm = require("vm");

const language =
  (process.env.CROWNEST_LANGUAGE || process.argv[2]) === "typescript" ? "typescript" : "javascript";
let ts = null;
if (language === "typescript") {
  ts = require("typescript");
}

// The request and event pipes come in as fds 3 and 4. Node opens files
// close-on-exec, so reopening them through /proc and closing the
// originals keeps every process the code starts from inheriting them (a
// subprocess could otherwise spoof events or end a later run).
const EVENTS = fs.openSync("/proc/self/fd/4", "w");
const REQUESTS = fs.openSync("/proc/self/fd/3", "r");
fs.closeSync(4);
fs.closeSync(3);

let currentId = null;
let executionCount = 0;

function emit(event) {
  if (currentId !== null && event.id === undefined) {
    event.id = currentId;
  }
  fs.writeSync(EVENTS, JSON.stringify(event) + "\n");
}

function stream(name, args) {
  const text = util.format(...args) + "\n";
  emit({ type: "stream", name, text });
}

function bundleOf(value) {
  if (value !== null && typeof value === "object" && value[RAW_BUNDLE]) {
    return value.data;
  }
  const data = { "text/plain": util.inspect(value, { depth: 4, breakLength: 100 }) };
  if (value !== null && typeof value === "object") {
    try {
      const json = JSON.parse(JSON.stringify(value));
      if (json !== undefined) {
        data["application/json"] = json;
      }
    } catch (_) {
      // Not JSON-serializable (cycles, BigInt): text only.
    }
  }
  return data;
}

const RAW_BUNDLE = Symbol("crownest.bundle");

// display(value) shows a value as rich output; display(text, mime) shows a
// string as that MIME type (e.g. "text/html", "text/markdown", "image/svg+xml").
function display(value, mime) {
  if (typeof mime === "string") {
    emit({ type: "display_data", data: { [mime]: value, "text/plain": String(mime) }, metadata: {} });
    return;
  }
  emit({ type: "display_data", data: bundleOf(value), metadata: {} });
}
display.bundle = (data) => ({ [RAW_BUNDLE]: true, data });

const sandboxConsole = {
  log: (...args) => stream("stdout", args),
  info: (...args) => stream("stdout", args),
  debug: (...args) => stream("stdout", args),
  warn: (...args) => stream("stderr", args),
  error: (...args) => stream("stderr", args),
  dir: (value) => stream("stdout", [util.inspect(value)]),
  table: (value) => display(value),
};

const context = vm.createContext({
  console: sandboxConsole,
  display,
  require,
  process,
  Buffer,
  URL,
  URLSearchParams,
  TextEncoder,
  TextDecoder,
  setTimeout,
  clearTimeout,
  setInterval,
  clearInterval,
  setImmediate,
  clearImmediate,
  queueMicrotask,
  structuredClone: globalThis.structuredClone,
  fetch: globalThis.fetch,
  module: { exports: {} },
});

function transpile(code) {
  if (!ts) {
    return code;
  }
  const out = ts.transpileModule(code, {
    reportDiagnostics: true,
    compilerOptions: {
      target: ts.ScriptTarget.ES2022,
      module: ts.ModuleKind.None,
      alwaysStrict: false,
      noImplicitUseStrict: true,
      removeComments: false,
    },
  });
  const errors = (out.diagnostics || []).filter((d) => d.category === ts.DiagnosticCategory.Error);
  if (errors.length > 0) {
    const message = errors.map((d) => ts.flattenDiagnosticMessageText(d.messageText, "\n")).join("\n");
    const error = new SyntaxError(message);
    error.name = "TypeScriptError";
    throw error;
  }
  return out.outputText.replace(/^"use strict";\s*/, "").replace(/export \{\};\s*$/, "");
}

// Rewrites code with top-level await into an async function whose top-level
// declarations become globals of the context (so they persist) and whose
// last expression is returned.
function asyncWrapper(code) {
  const lines = code.split("\n");
  const hoisted = lines.map((line) => {
    const declaration = /^(let|const|var)\s+([A-Za-z_$][\w$]*)\s*=/.exec(line);
    if (declaration) {
      return line.replace(declaration[0], `globalThis.${declaration[2]} =`);
    }
    const fn = /^(async\s+)?function\s*\*?\s*([A-Za-z_$][\w$]*)/.exec(line);
    if (fn) {
      return `globalThis.${fn[2]} = ${line}`;
    }
    const cls = /^class\s+([A-Za-z_$][\w$]*)/.exec(line);
    if (cls) {
      return `globalThis.${cls[1]} = ${line}`;
    }
    return line;
  });
  let last = hoisted.length - 1;
  while (last >= 0 && hoisted[last].trim() === "") {
    last -= 1;
  }
  if (last >= 0) {
    const text = hoisted[last].trim().replace(/;$/, "");
    const statement = /^(return|if|for|while|do|switch|try|throw|let|const|var|function|class|globalThis\.|\}|\/\/)/;
    if (text && !statement.test(text) && !text.endsWith("{")) {
      hoisted[last] = `return (${text});`;
    }
  }
  return `(async () => {\n${hoisted.join("\n")}\n})()`;
}

let interruptRun = null;
process.on("SIGINT", () => {
  if (interruptRun) {
    interruptRun();
  }
});

async function run(code) {
  executionCount += 1;
  const count = executionCount;
  let value;
  try {
    const source = transpile(code);
    let script;
    let wrapped = false;
    try {
      script = new vm.Script(source, { filename: `cell-${count}` });
    } catch (error) {
      if (error instanceof SyntaxError && /await/.test(error.message)) {
        script = new vm.Script(asyncWrapper(source), { filename: `cell-${count}` });
        wrapped = true;
      } else {
        throw error;
      }
    }
    value = script.runInContext(context, { breakOnSigint: true, displayErrors: false });
    if ((wrapped || value instanceof Promise) && value && typeof value.then === "function") {
      value = await new Promise((resolve, reject) => {
        interruptRun = () => {
          const error = new Error("the run was interrupted");
          error.name = "Interrupted";
          reject(error);
        };
        value.then(resolve, reject);
      });
    }
  } catch (error) {
    interruptRun = null;
    const isError = error instanceof Error || (error && error.stack);
    emit({
      type: "error",
      ename: isError ? error.name : "Error",
      evalue: isError ? error.message : String(error),
      traceback: isError && error.stack ? String(error.stack).split("\n") : [],
    });
    return { count, ok: false };
  }
  interruptRun = null;
  if (value !== undefined) {
    emit({ type: "execute_result", execution_count: count, data: bundleOf(value), metadata: {} });
  }
  return { count, ok: true };
}

async function main() {
  emit({ type: "ready", implementation: `node ${process.versions.node}${ts ? ` + typescript ${ts.version}` : ""}` });
  const input = readline.createInterface({ input: fs.createReadStream(null, { fd: REQUESTS }), crlfDelay: Infinity });
  for await (const line of input) {
    let request;
    try {
      request = JSON.parse(line);
    } catch (_) {
      continue;
    }
    if (request.setup) {
      try {
        process.chdir(request.setup.cwd || process.cwd());
        Object.assign(process.env, request.setup.env || {});
        emit({ type: "setup_done" });
      } catch (error) {
        emit({ type: "setup_error", message: String(error && error.message) });
      }
      continue;
    }
    currentId = request.id === undefined ? null : request.id;
    // The run's end is matched on this nonce, which the code never sees.
    let nonce = String(request.nonce || "");
    const code = String(request.code || "");
    request = null;
    const { count, ok } = await run(code);
    emit({ type: "done", execution_count: count, status: ok ? "ok" : "error", nonce });
    nonce = null;
    currentId = null;
  }
}

main().catch((error) => {
  process.stderr.write(`runner failed: ${error && error.stack}\n`);
  process.exit(1);
});
