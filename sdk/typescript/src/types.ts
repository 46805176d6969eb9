/** JSON shapes of the CrowNest REST API (camelCase, as on the wire). */

export interface SandboxData {
  /** `sbx_…` */
  id: string;
  /** `starting`, `running` or `destroyed`. */
  status: string;
  template: string;
  createdAt: string;
  expiresAt: string;
  endedAt?: string | null;
  /** `killed`, `expired`, `failed`, `host_restart`, `host_shutdown`. */
  endReason?: string | null;
  metadata: Record<string, unknown>;
  vcpus: number;
  memoryMiB: number;
}

export interface CollectSpec {
  /** Relative to /workspace or absolute under it. */
  path: string;
  /** Artifact name (default: the file name). */
  name?: string;
}

export interface CollectedArtifact {
  path: string;
  name: string;
  /** Set when the file became an artifact. */
  artifactId?: string | null;
  /** Why it did not (e.g. the file was missing). */
  error?: string | null;
}

export interface CommandData {
  /** `cmd_…` */
  id: string;
  sandboxId: string;
  command: string;
  cwd: string;
  background: boolean;
  /** `running`, `completed` (any exit code), `failed`, `timed_out`, `canceled`. */
  status: string;
  exitCode: number | null;
  signal: number | null;
  stdout: string;
  stderr: string;
  stdoutTruncated: boolean;
  stderrTruncated: boolean;
  stdoutDroppedBytes: number;
  stderrDroppedBytes: number;
  timeoutMs?: number | null;
  createdAt: string;
  startedAt?: string | null;
  endedAt?: string | null;
  cancelRequestedAt?: string | null;
  error?: string | null;
  /** Results of `collect`, once the command ended (absent without it). */
  artifacts?: CollectedArtifact[] | null;
}

export interface ExitInfo {
  status: string;
  exitCode: number | null;
  signal: number | null;
  error: string | null;
}

/** One event of a command's log: a stdout/stderr chunk, or the final exit. */
export interface LogEvent {
  type: "stdout" | "stderr" | "exit";
  /** The text, for stdout/stderr. */
  data: string;
  /** Event number, to resume after. */
  id: number | null;
  exit: ExitInfo | null;
}

export interface FileData {
  name: string;
  /** Absolute path inside the sandbox. */
  path: string;
  /** `file`, `dir`, `symlink` or `other`. */
  type: string;
  size: number;
  mode: number;
  mtime: string;
}

export interface FileListing {
  data: FileData[];
  /** True when the directory has more entries than one listing returns. */
  truncated: boolean;
}

export interface TransferData {
  /** Signed URL on the server; needs no API key; good for one request. */
  url: string;
  /** `PUT` (upload the raw bytes) or `GET`. */
  method: string;
  expiresAt: string;
  maxBytes?: number | null;
  sizeBytes?: number | null;
}

export interface ArtifactData {
  /** `art_…` */
  id: string;
  name: string;
  sha256: string;
  size: number;
  mime: string;
  sandboxId: string;
  sourcePath: string;
  createdAt: string;
}

export interface PreviewData {
  /** `prv_…` */
  id: string;
  sandboxId: string;
  port: number;
  status: "active" | "closed";
  /** The preview's own origin, `http://prv-….localhost:PORT/` by default
   * (`https://prv-….{domain}/` with a configured preview domain). Needs an
   * API key with scope `previews:access`, or the preview's token. */
  url: string;
  createdAt: string;
  closedAt: string | null;
  closeReason: "deleted" | "sandbox_destroyed" | null;
  /** `cn_prv_…`: only in the create response. */
  token?: string;
  /** `url` with the token, for a browser: only in the create response. */
  browserUrl?: string;
}

export interface TemplateData {
  name: string;
  description: string;
  recipeHash: string;
  built: boolean;
  runtime: string;
  resources: { vcpus: number; memoryMiB: number; pids: number; diskMiB: number };
  network: string;
}

export interface Page<T> {
  data: T[];
  nextCursor?: string | null;
}

/** Languages of Code Contexts and Code Runs. */
export type CodeLanguage = "python" | "javascript" | "typescript";

export interface CodeContextData {
  /** `cctx_…` */
  id: string;
  sandboxId: string;
  language: CodeLanguage;
  cwd: string;
  /** The interpreter behind it (e.g. IPython, a Node `vm` context). */
  implementation: string;
  /** The sandbox's default context for its language (runs without `contextId`). */
  isDefault: boolean;
  createdAt: string;
}

/** A rich output of a Code Run. */
export type CodeOutput =
  | { type: "inline"; format: string; content: unknown; mime?: string | null }
  | { type: "artifact"; format: string; artifactId: string; mime?: string | null; size?: number | null }
  | { type: "rejected"; format: string; reason: string };

/** An exception raised by the code (a result, not an SDK error). */
export interface CodeError {
  name?: string | null;
  message: string;
  traceback?: string | null;
}

export interface RunCodeResult {
  /** The context the code ran in (the default one when none was given). */
  contextId: string;
  /** Ordered stdout chunks. */
  stdout: string[];
  /** Ordered stderr chunks. */
  stderr: string[];
  outputs: CodeOutput[];
  executionCount: number | null;
  error: CodeError | null;
  durationMs: number;
  /** The interpreter had died and was replaced before this run. */
  interpreterRestarted: boolean;
  /** ... and the context's earlier state is gone. */
  stateLost: boolean;
  notes: string[];
}
