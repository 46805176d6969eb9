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
  /** `oci` (runc), `gvisor` (runsc) or `microvm` (its own guest kernel). */
  runtime?: string;
  /** For `microvm`: `qemu` or `crosvm`; otherwise null. */
  vmm?: string | null;
  /** Its egress policy and meters (docs/network.md). */
  network?: SandboxNetwork;
}

/** A sandbox's egress policy (within its template's) and meters. */
export interface SandboxNetwork {
  /** `none`, `allow` or `open`. */
  mode: string;
  allow: string[];
  deny: string[];
  /** Bytes received through the egress proxy. */
  bytesIn: number;
  /** Bytes sent through it. */
  bytesOut: number;
}

/** A narrower egress policy than the template's: each part omitted keeps
 * the template's (`deny` is added to it). Wider is
 * `network_policy_too_wide`. */
export interface NetworkPolicyRequest {
  mode?: "none" | "allow" | "open";
  /** `pypi.org`, `*.pythonhosted.org`, `github.com:443`, `203.0.113.0/24:*`. */
  allow?: string[];
  deny?: string[];
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
  /** Changes with any edit of the template file (a reload keeps live
   * sandboxes on the version they started with). */
  version: string;
  /** What the rootfs starts from: `debian`, `oci` or `dir`. */
  source: string;
  /** Build layers in order: `pip`, `npm`, `files`, `run`. */
  layers: string[];
  /** Default cwd of commands and code contexts. */
  workdir: string;
  /** Names of the variables the template's `env` sets. */
  envKeys: string[];
  built: boolean;
  /** `oci`, `gvisor` or `microvm`. */
  runtime: string;
  /** For `gvisor`: `ptrace`, `kvm` or `systrap`. */
  platform?: string | null;
  /** For `microvm`: `qemu` or `crosvm`. */
  vmm?: string | null;
  /** For `microvm`: `auto`, `kvm` or `tcg`. */
  accel?: string | null;
  /** Whether this host can run it (else `reason` says why). */
  available?: boolean;
  reason?: string | null;
  resources: { vcpus: number; memoryMiB: number; pids: number; diskMiB: number };
  network: string;
  /** Code Run languages, each with the WASM plugins of its output pipeline. */
  languages: TemplateLanguage[];
}

export interface TemplateLanguage {
  language: CodeLanguage;
  adapter: TemplatePlugin;
  formatter: TemplatePlugin;
  policy: TemplatePlugin;
}

/** A plugin as the template names it, with the WASI 0.2 interfaces it imports. */
export interface TemplatePlugin {
  name: string;
  /** `null` when the component cannot be read (see `error`). */
  wasiImports: string[] | null;
  error: string | null;
  /** `ok`, `missing` (build the plugin) or `invalid` (see `error`). */
  status: "ok" | "missing" | "invalid";
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

// ------------------------------------------------------------------ workspace runs

/** Where a Workspace Run is: `awaiting_archive` → `queued` → `extracting` →
 * `running` → `succeeded` | `failed` | `canceled`. */
export type WorkspaceRunStatus =
  | "awaiting_archive"
  | "queued"
  | "extracting"
  | "running"
  | "succeeded"
  | "failed"
  | "canceled";

/** Why a run ended `failed` (or `canceled`); `null` when it succeeded. */
export type WorkspaceRunReason =
  | "exit_code"
  | "timeout"
  | "archive_too_large"
  | "archive_unsafe"
  | "archive_corrupt"
  | "sandbox_failed"
  | "host_restart"
  | "canceled";

/** The archive a run expects: size and SHA-256 (64 lower-case hex) of the `.tar.gz`. */
export interface ArchiveSpec {
  sizeBytes: number;
  sha256: string;
}

/** A file of /workspace to keep as an artifact when the command ends. */
export interface WorkspaceRunArtifactSpec {
  /** Relative to /workspace (no `..`, not absolute). */
  path: string;
  /** Default: the path's last component. */
  name?: string;
}

/** What became of one requested artifact. */
export interface CollectedWorkspaceArtifact {
  path: string;
  name: string;
  artifactId: string | null;
  sizeBytes: number | null;
  sha256: string | null;
  /** Why it was not collected (e.g. the file was missing). */
  error: string | null;
}

export interface WorkspaceRun {
  /** `wsr_…` */
  id: string;
  status: WorkspaceRunStatus;
  reason: WorkspaceRunReason | null;
  template: string;
  command: string;
  env: Record<string, string>;
  archive: ArchiveSpec & { uploaded: boolean };
  artifacts: { path: string; name: string }[];
  collected: CollectedWorkspaceArtifact[];
  timeoutMs: number;
  keepSandbox: boolean;
  metadata: Record<string, unknown>;
  sandboxId: string | null;
  exitCode: number | null;
  createdAt: string;
  startedAt: string | null;
  endedAt: string | null;
  /** The Evidence Bundle has been written (`evidence()` returns it). */
  evidenceReady: boolean;
}

/** The `data` of each type of run event. */
export interface WorkspaceRunEventData {
  status: { status: WorkspaceRunStatus; reason: WorkspaceRunReason | null };
  archive_progress: { entries: number; bytes: number; done?: boolean };
  stdout: { data: string };
  stderr: { data: string };
  artifact_collected: { path: string; name: string; artifactId: string; sizeBytes: number; sha256: string };
  artifact_error: { path: string; name: string; message: string };
  heartbeat: { status: WorkspaceRunStatus; elapsedMs: number };
  terminal: { status: WorkspaceRunStatus; reason: WorkspaceRunReason | null; exitCode: number | null; endedAt: string };
  error: { code: string; message: string };
}

export type WorkspaceRunEventType = keyof WorkspaceRunEventData;

/** One event of a run's log, numbered `seq` 1, 2, 3, … with no gaps;
 * `type` narrows `data` (`if (e.type === "stdout") e.data.data`). */
export type WorkspaceRunEvent = {
  [K in WorkspaceRunEventType]: { seq: number; type: K; at: string; data: WorkspaceRunEventData[K] };
}[WorkspaceRunEventType];

/** One page of `GET /v1/workspace-runs/{id}/events`. */
export interface WorkspaceRunEventPage {
  data: WorkspaceRunEvent[];
  /** The `afterSeq` of the next page. */
  nextAfterSeq: number;
  /** The log is complete (it holds the `terminal` event). */
  terminal: boolean;
}

/** The signed part of an Evidence Bundle. */
export interface EvidenceBundleBody {
  version: number;
  runId: string;
  status: WorkspaceRunStatus;
  reason: WorkspaceRunReason | null;
  exitCode: number | null;
  command: string;
  envNames: string[];
  template: { name: string; recipeHash: string; runtime: string };
  archive: ArchiveSpec;
  createdAt: string;
  startedAt: string | null;
  endedAt: string | null;
  metadata: Record<string, unknown>;
  artifacts: { path: string; name: string; artifactId: string; sha256: string; sizeBytes: number }[];
  artifactErrors: { path: string; name: string; message: string }[];
  terminalEvent: WorkspaceRunEvent;
  /** `sha256`: of the events in `seq` order, each as canonical JSON followed by `\n`. */
  events: { count: number; sha256: string };
  host: { version: string };
  usage: { pricingVersion: string; computeUnitSeconds: number };
}

export interface EvidenceSignature {
  algorithm: "ed25519";
  keyId: string;
  /** base64 of the signature over the canonical JSON (RFC 8785) of `bundle`. */
  value: string;
}

/** A Workspace Run's Evidence Bundle: verifiable offline with the server's key. */
export interface EvidenceBundle {
  bundle: EvidenceBundleBody;
  signature: EvidenceSignature;
}

/** A key of `GET /v1/evidence-keys`. */
export interface EvidenceKey {
  /** First 16 hex characters of the SHA-256 of the public key. */
  keyId: string;
  algorithm: "ed25519";
  /** base64 of the 32-byte public key. */
  publicKey: string;
}
