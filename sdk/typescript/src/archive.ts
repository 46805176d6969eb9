/**
 * Packing a directory into the `.tar.gz` of a Workspace Run (Node only): a
 * walk that respects `.gitignore` files and skips `.git`, a small tar
 * writer (ustar entries, PAX records for long names), and `node:zlib` gzip
 * into a temporary file, hashed as it is written.
 *
 * The SDK does not depend on Node's type declarations: the few Node APIs
 * used are declared below and the modules loaded when a directory is packed.
 */

/** Archives up to this size go in one `PUT …/archive`; larger ones staged. */
export const DIRECT_UPLOAD_MAX = 32 * 1024 * 1024;

// ------------------------------------------------------------------ the Node APIs used

interface NodeStats {
  isDirectory(): boolean;
  isFile(): boolean;
  isSymbolicLink(): boolean;
  mode: number;
  size: number;
  mtimeMs: number;
}

interface NodeFileHandle {
  read(buffer: Uint8Array, offset: number, length: number, position: number | null): Promise<{ bytesRead: number }>;
  write(data: Uint8Array): Promise<unknown>;
  stat(): Promise<NodeStats>;
  close(): Promise<void>;
}

/** @internal */
export interface NodeFsPromises {
  readdir(path: string): Promise<string[]>;
  lstat(path: string): Promise<NodeStats>;
  stat(path: string): Promise<NodeStats>;
  readFile(path: string): Promise<Uint8Array>;
  readlink(path: string): Promise<string>;
  open(path: string, flags: string): Promise<NodeFileHandle>;
  mkdtemp(prefix: string): Promise<string>;
  rm(path: string, options: { recursive: boolean; force: boolean }): Promise<void>;
}

interface NodeGzip {
  write(chunk: Uint8Array): boolean;
  end(): unknown;
  pause(): unknown;
  resume(): unknown;
  on(event: "data", listener: (chunk: Uint8Array) => void): unknown;
  on(event: "end", listener: () => void): unknown;
  on(event: "error", listener: (error: Error) => void): unknown;
  once(event: "drain", listener: () => void): unknown;
}

interface NodeHash {
  update(data: Uint8Array): unknown;
  digest(encoding: "hex"): string;
}

async function load<T>(specifier: string): Promise<T> {
  return (await import(/* webpackIgnore: true */ /* @vite-ignore */ specifier)) as T;
}

/** @internal `node:fs/promises`, loaded on first use. */
export function nodeFs(): Promise<NodeFsPromises> {
  return load<NodeFsPromises>("node:fs/promises");
}

/** @internal `fs.openAsBlob` (Node >= 19.8): a file as a `Blob` read as it is sent. */
export async function openAsBlob(path: string): Promise<Blob | null> {
  const fs = await load<{ openAsBlob?: (path: string) => Promise<Blob> }>("node:fs");
  return fs.openAsBlob ? fs.openAsBlob(path) : null;
}

// ------------------------------------------------------------------ .gitignore

/** One pattern of a `.gitignore`; `base` is that file's directory relative
 * to the packed root (`""` for the root). */
export interface IgnoreRule {
  base: string;
  pattern: string;
  regex: RegExp;
  negate: boolean;
  dirOnly: boolean;
}

function escapeRegex(c: string): string {
  return /[\\^$.*+?()[\]{}|/-]/.test(c) ? `\\${c}` : c;
}

function translateSegment(seg: string): string {
  let out = "";
  for (let i = 0; i < seg.length; i++) {
    const c = seg[i]!;
    if (c === "*") out += "[^/]*";
    else if (c === "?") out += "[^/]";
    else if (c === "\\" && i + 1 < seg.length) out += escapeRegex(seg[++i]!);
    else if (c === "[") {
      let j = i + 1;
      if (j < seg.length && (seg[j] === "!" || seg[j] === "^")) j++;
      if (j < seg.length && seg[j] === "]") j++;
      while (j < seg.length && seg[j] !== "]") j++;
      if (j >= seg.length) {
        out += "\\["; // no closing bracket: a literal "["
        continue;
      }
      let body = seg.slice(i + 1, j);
      const negated = body.startsWith("!") || body.startsWith("^");
      if (negated) body = body.slice(1);
      body = body.replace(/\\/g, "\\\\").replace(/\[/g, "\\[").replace(/]/g, "\\]");
      out += negated ? `[^/${body}]` : `(?!/)[${body}]`;
      i = j;
    } else out += escapeRegex(c);
  }
  return out;
}

function globRegex(pattern: string, anchored: boolean): RegExp {
  const parts = pattern.split("/");
  let regex = anchored ? "" : "(?:.*/)?";
  parts.forEach((seg, i) => {
    const last = i === parts.length - 1;
    if (seg === "**") {
      // `**/x` and `a/**/x`: zero or more directories; `a/**`: all inside.
      regex += last ? ".*" : "(?:.*/)?";
      return;
    }
    regex += translateSegment(seg);
    if (!last) regex += "/";
  });
  return new RegExp(`^${regex}$`, "s");
}

/** The rules of one `.gitignore` (git's syntax: `#` comments, `!` negation,
 * a trailing `/` for directories only, a leading or inner `/` anchoring to
 * the file's directory, `*`, `?`, `[…]`, `**`, `\` escapes). */
export function parseGitignore(text: string, base = ""): IgnoreRule[] {
  const rules: IgnoreRule[] = [];
  for (const raw of text.split(/\r?\n/)) {
    let line = raw;
    if (!line || line.startsWith("#")) continue;
    while (line.endsWith(" ") && !line.endsWith("\\ ")) line = line.slice(0, -1);
    if (!line) continue;
    const negate = line.startsWith("!");
    if (negate) line = line.slice(1);
    else if (line.startsWith("\\!") || line.startsWith("\\#")) line = line.slice(1);
    const dirOnly = line.endsWith("/");
    line = line.replace(/\/+$/, "");
    if (!line) continue;
    const anchored = line.includes("/");
    line = line.replace(/^\/+/, "");
    if (!line) continue;
    rules.push({ base, pattern: raw, regex: globRegex(line, anchored), negate, dirOnly });
  }
  return rules;
}

/** Whether `path` (relative to the root, `/`-separated) is ignored: the
 * last matching rule decides (rules in file order, shallower files first). */
export function isIgnored(path: string, isDir: boolean, rules: IgnoreRule[]): boolean {
  let ignored = false;
  for (const rule of rules) {
    if (rule.dirOnly && !isDir) continue;
    let sub = path;
    if (rule.base) {
      if (!path.startsWith(rule.base + "/")) continue;
      sub = path.slice(rule.base.length + 1);
    }
    if (rule.regex.test(sub)) ignored = !rule.negate;
  }
  return ignored;
}

// ------------------------------------------------------------------ walk

export interface WalkEntry {
  /** Relative to the root, `/`-separated, no leading `/`. */
  path: string;
  fullPath: string;
  type: "dir" | "file" | "symlink";
}

function joinPath(dir: string, name: string): string {
  return dir.endsWith("/") ? dir + name : `${dir}/${name}`;
}

/** Every directory, regular file and symlink under `root` that is packed,
 * parents first, in name order: `.gitignore` files are honoured as git does
 * (an ignored directory is not entered), `.git` is skipped unless
 * `includeGit` (then packed whole); sockets, fifos and devices are left out. */
export async function* walkDirectory(root: string, options: { includeGit?: boolean } = {}): AsyncGenerator<WalkEntry> {
  const fs = await nodeFs();
  if (!(await fs.stat(root)).isDirectory()) throw new Error(`not a directory: ${root}`);

  async function* entries(full: string, rel: string, rules: IgnoreRule[], inGit: boolean): AsyncGenerator<WalkEntry> {
    if (!inGit) {
      const gitignore = joinPath(full, ".gitignore");
      const st = await fs.lstat(gitignore).catch(() => null);
      if (st?.isFile()) {
        const text = new TextDecoder().decode(await fs.readFile(gitignore));
        rules = [...rules, ...parseGitignore(text, rel)];
      }
    }
    const names = (await fs.readdir(full)).sort();
    for (const name of names) {
      const childFull = joinPath(full, name);
      const childRel = rel ? `${rel}/${name}` : name;
      const st = await fs.lstat(childFull);
      const isDir = st.isDirectory();
      const git = inGit || name === ".git";
      if (name === ".git" && !inGit && !options.includeGit) continue;
      if (!git && isIgnored(childRel, isDir, rules)) continue;
      if (isDir) {
        yield { path: childRel, fullPath: childFull, type: "dir" };
        yield* entries(childFull, childRel, rules, git);
      } else if (st.isSymbolicLink()) {
        yield { path: childRel, fullPath: childFull, type: "symlink" };
      } else if (st.isFile()) {
        yield { path: childRel, fullPath: childFull, type: "file" };
      }
    }
  }

  yield* entries(root, "", [], false);
}

// ------------------------------------------------------------------ tar

const BLOCK = 512;
const encoder = new TextEncoder();

function octal(value: number, width: number): string {
  // width - 1 digits and a NUL
  return value.toString(8).padStart(width - 1, "0") + "\0";
}

function putString(header: Uint8Array, offset: number, width: number, value: string | Uint8Array): void {
  const bytes = typeof value === "string" ? encoder.encode(value) : value;
  header.set(bytes.subarray(0, width), offset);
}

/** Bytes of `value`, cut at `max` bytes on a UTF-8 boundary. */
function truncateUtf8(value: string, max: number): Uint8Array {
  const bytes = encoder.encode(value);
  if (bytes.length <= max) return bytes;
  let end = max;
  while (end > 0 && (bytes[end]! & 0xc0) === 0x80) end--;
  return bytes.subarray(0, end);
}

interface TarEntry {
  name: string;
  type: "0" | "2" | "5" | "x";
  mode: number;
  size: number;
  mtime: number;
  linkname?: string;
}

function ustarHeader(entry: TarEntry): Uint8Array {
  const header = new Uint8Array(BLOCK);
  putString(header, 0, 100, truncateUtf8(entry.name, 100));
  putString(header, 100, 8, octal(entry.mode & 0o7777, 8));
  putString(header, 108, 8, octal(0, 8));
  putString(header, 116, 8, octal(0, 8));
  putString(header, 124, 12, octal(entry.size, 12));
  putString(header, 136, 12, octal(Math.max(0, Math.floor(entry.mtime)), 12));
  putString(header, 148, 8, "        ");
  putString(header, 156, 1, entry.type);
  if (entry.linkname) putString(header, 157, 100, truncateUtf8(entry.linkname, 100));
  putString(header, 257, 6, "ustar\0");
  putString(header, 263, 2, "00");
  let sum = 0;
  for (const b of header) sum += b;
  putString(header, 148, 8, sum.toString(8).padStart(6, "0") + "\0 ");
  return header;
}

function paxRecord(key: string, value: string): string {
  const body = ` ${key}=${value}\n`;
  const bodyLength = encoder.encode(body).length;
  let length = bodyLength + String(bodyLength).length;
  if (String(length).length !== String(bodyLength).length) length = bodyLength + String(length).length;
  return `${length}${body}`;
}

/** The headers of one entry: a PAX extended header first when the name or
 * link does not fit ustar's 100 bytes, is not ASCII, or the size needs
 * more than 11 octal digits; then the ustar header. */
function entryHeaders(entry: TarEntry): Uint8Array[] {
  const records: string[] = [];
  // eslint-disable-next-line no-control-regex
  const fits = (s: string) => encoder.encode(s).length <= 100 && /^[\x01-\x7f]*$/.test(s);
  if (!fits(entry.name)) records.push(paxRecord("path", entry.name));
  if (entry.linkname !== undefined && !fits(entry.linkname)) records.push(paxRecord("linkpath", entry.linkname));
  if (entry.size >= 8 ** 11) records.push(paxRecord("size", String(entry.size)));
  const out: Uint8Array[] = [];
  if (records.length) {
    const body = encoder.encode(records.join(""));
    const base = entry.name.replace(/\/$/, "").split("/").pop() ?? "entry";
    out.push(ustarHeader({ name: `PaxHeader/${base}`, type: "x", mode: 0o644, size: body.length, mtime: entry.mtime }));
    out.push(body, new Uint8Array((BLOCK - (body.length % BLOCK)) % BLOCK));
  }
  out.push(ustarHeader({ ...entry, size: entry.size >= 8 ** 11 ? 0 : entry.size }));
  return out;
}

// ------------------------------------------------------------------ gzip into a hashed file

/** Writes bytes through gzip into a file, hashing and counting the
 * compressed bytes; backpressure from both the gzip stream and the file. */
class GzipFileSink {
  size = 0;
  private pending: Promise<void> = Promise.resolve();
  private failure: unknown = null;
  private readonly ended: Promise<void>;

  constructor(
    private readonly gzip: NodeGzip,
    file: NodeFileHandle,
    private readonly hash: NodeHash,
  ) {
    this.ended = new Promise<void>((resolve, reject) => {
      gzip.on("end", resolve);
      gzip.on("error", (error) => {
        this.failure = error;
        reject(error);
      });
    });
    this.ended.catch(() => undefined);
    gzip.on("data", (chunk) => {
      if (this.failure) return; // drained and dropped: the archive has failed
      gzip.pause();
      this.pending = this.pending
        .then(async () => {
          await file.write(chunk);
          hash.update(chunk);
          this.size += chunk.byteLength;
        })
        .catch((error: unknown) => {
          this.failure = error;
        })
        .then(() => void gzip.resume());
    });
  }

  async write(chunk: Uint8Array): Promise<void> {
    if (this.failure) throw this.failure;
    if (chunk.byteLength === 0) return;
    if (!this.gzip.write(chunk)) {
      await new Promise<void>((resolve) => this.gzip.once("drain", resolve));
    }
  }

  async end(): Promise<string> {
    this.gzip.end();
    await this.ended;
    await this.pending;
    if (this.failure) throw this.failure;
    return this.hash.digest("hex");
  }
}

/** A packed `.tar.gz` in a temporary file. */
export interface PackedArchive {
  /** The temporary `.tar.gz`; `remove()` deletes it. */
  path: string;
  sizeBytes: number;
  /** Lower-case hex. */
  sha256: string;
  /** The relative paths packed, in order. */
  entries: string[];
  /** The `archive` of a create: `{ sizeBytes, sha256 }`. */
  archive: { sizeBytes: number; sha256: string };
  remove(): Promise<void>;
}

/**
 * Packs `dir` into a gzipped tar of relative paths (no leading `/`):
 * directories, regular files, and symlinks as symlinks, owned by 0:0 with
 * their modes and mtimes; `.gitignore` respected, `.git` skipped unless
 * `includeGit`. The archive is a temporary file (call `remove()`).
 */
export async function packDirectory(dir: string, options: { includeGit?: boolean } = {}): Promise<PackedArchive> {
  const fs = await nodeFs();
  const os = await load<{ tmpdir(): string }>("node:os");
  const zlib = await load<{ createGzip(): NodeGzip }>("node:zlib");
  const crypto = await load<{ createHash(algorithm: string): NodeHash }>("node:crypto");
  const tmp = await fs.mkdtemp(joinPath(os.tmpdir(), "crownest-archive-"));
  const path = joinPath(tmp, "workspace.tar.gz");
  const remove = () => fs.rm(tmp, { recursive: true, force: true });
  try {
    const file = await fs.open(path, "w");
    const entries: string[] = [];
    let sink: GzipFileSink | undefined;
    let sha256: string;
    try {
      sink = new GzipFileSink(zlib.createGzip(), file, crypto.createHash("sha256"));
      const buffer = new Uint8Array(1024 * 1024);
      for await (const entry of walkDirectory(dir, options)) {
        const st = await fs.lstat(entry.fullPath);
        const mtime = st.mtimeMs / 1000;
        const mode = st.mode & 0o7777;
        if (entry.type === "dir") {
          for (const h of entryHeaders({ name: `${entry.path}/`, type: "5", mode, size: 0, mtime })) await sink.write(h);
        } else if (entry.type === "symlink") {
          const linkname = await fs.readlink(entry.fullPath);
          for (const h of entryHeaders({ name: entry.path, type: "2", mode, size: 0, mtime, linkname })) await sink.write(h);
        } else {
          const source = await fs.open(entry.fullPath, "r");
          try {
            const size = (await source.stat()).size;
            for (const h of entryHeaders({ name: entry.path, type: "0", mode, size, mtime })) await sink.write(h);
            let left = size;
            while (left > 0) {
              const { bytesRead } = await source.read(buffer, 0, Math.min(buffer.length, left), null);
              if (bytesRead === 0) throw new Error(`${entry.fullPath} shrank while it was packed`);
              // A copy: the buffer is reused while gzip may still hold the chunk.
              await sink.write(buffer.slice(0, bytesRead));
              left -= bytesRead;
            }
            const pad = (BLOCK - (size % BLOCK)) % BLOCK;
            if (pad) await sink.write(new Uint8Array(pad));
          } finally {
            await source.close();
          }
        }
        entries.push(entry.path);
      }
      await sink.write(new Uint8Array(2 * BLOCK)); // end of archive
      sha256 = await sink.end();
    } finally {
      await file.close();
    }
    const sizeBytes = sink.size;
    return { path, sizeBytes, sha256, entries, archive: { sizeBytes, sha256 }, remove };
  } catch (error) {
    await remove();
    throw error;
  }
}
