/**
 * JSON shapes of the CrowNest REST API (camelCase, as on the wire), built
 * on the types generated from docs/openapi.json (`src/generated/openapi.ts`,
 * `npm run gen:types`; a test fails when it drifts from the spec). Where
 * the spec says only `string` but the server promises a closed set
 * (languages, file types, transfer methods) the SDK narrows the field; a
 * few shapes the spec leaves open (SSE events, the Evidence Bundle) are
 * written out here.
 */
import type { components } from "./generated/openapi.js";

/** The generated schemas of docs/openapi.json, by name. */
export type Schemas = components["schemas"];

/** `T` with the fields of `U` replaced by `U`'s (narrower) types. */
type Narrow<T, U> = Omit<T, keyof U> & U;

// ------------------------------------------------------------------ string-literal unions

/** Where a sandbox is in its life. */
export type SandboxStatus = Schemas["SandboxStatus"];
/** Why a sandbox was destroyed. */
export type EndReason = Schemas["EndReason"];
/** Where a command is: `completed` is any exit code (a non-zero exit is a result). */
export type CommandStatus = Schemas["CommandStatus"];
/** Languages of Code Contexts and Code Runs. */
export type CodeLanguage = "python" | "javascript" | "typescript";
/** What a Code Run does with a rich output: keep it inline in the result,
 * or promote eligible ones to artifacts. */
export type ArtifactPolicy = "inline" | "promote";
/** A directory entry's type. */
export type FileType = "file" | "dir" | "symlink" | "other";
export type PreviewStatus = Schemas["PreviewStatus"];
export type PreviewCloseReason = Schemas["PreviewCloseReason"];
/** `sandbox` (default), `project` or `day` (UTC). */
export type UsageGroupBy = "sandbox" | "project" | "day";
export type AuditAction = Schemas["AuditAction"];
export type AuditActor = Schemas["AuditActor"];
export type AuditOutcome = Schemas["AuditOutcome"];
export type ResourceKind = Schemas["ResourceKind"];

// ------------------------------------------------------------------ sandboxes

/** A sandbox (`SandboxView`). */
export type SandboxData = Schemas["SandboxView"];

/** A sandbox's egress policy (within its template's) and meters. */
export type SandboxNetwork = Schemas["SandboxNetworkView"];

/** A narrower egress policy than the template's: each part omitted keeps
 * the template's (`deny` is added to it). Wider is
 * `network_policy_too_wide`. */
export interface NetworkPolicyRequest {
  mode?: "none" | "allow" | "open";
  /** `pypi.org`, `*.pythonhosted.org`, `github.com:443`, `203.0.113.0/24:*`. */
  allow?: string[];
  deny?: string[];
}

/** A sandbox's resource use now (`GET /v1/sandboxes/{id}/metrics`):
 * `cpuUsageSeconds` since it started, `cpuPercent` over the last interval
 * (100 = one CPU busy), memory, pids, /workspace and egress bytes. */
export type SandboxMetrics = Schemas["SandboxMetricsView"];

// ------------------------------------------------------------------ commands

export type CollectSpec = Narrow<Schemas["CollectBody"], { name?: string }>;
export type CollectedArtifact = Schemas["CollectedView"];
/** A command record (`CommandView`). */
export type CommandData = Schemas["CommandView"];
/** What `commands.run` returns: the command's final record. A non-zero
 * `exitCode` is a result (`status: "completed"`), not a thrown error. */
export type CommandResult = CommandData;

export interface ExitInfo {
  status: CommandStatus;
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

// ------------------------------------------------------------------ files

export type FileData = Narrow<Schemas["FileView"], { type: FileType }>;

export interface FileListing {
  data: FileData[];
  /** True when the directory has more entries than one listing returns. */
  truncated: boolean;
}

/** A signed transfer URL: needs no API key; good for one request. */
export type TransferData = Narrow<Schemas["TransferView"], { method: "PUT" | "GET" }>;

/** One change `files.watch` reports (paths absolute, under /workspace). */
export type WatchEvent =
  | { type: "create" | "modify" | "delete"; path: string; isDir: boolean }
  /** `path` is where the entry is now, `oldPath` where it was. */
  | { type: "rename"; path: string; isDir: boolean; oldPath: string }
  /** The sandbox's change queue overflowed: changes were lost (list the directory again to resync). */
  | { type: "overflow"; message: string }
  /** A recursive watch reached its most directories (`maxDirs`): deeper new ones are not watched. */
  | { type: "limited"; maxDirs: number };

/** Why a watch ended: `stop()`, the sandbox ended, or the watched directory was removed. */
export type WatchEndReason = "stopped" | "sandbox_destroyed" | "directory_removed";

// ------------------------------------------------------------------ artifacts, previews, templates

export type ArtifactData = Schemas["ArtifactView"];
export type PreviewData = Schemas["PreviewView"];

export type TemplatePlugin = Narrow<Schemas["TemplatePluginView"], { status: "ok" | "missing" | "invalid" }>;
export type TemplateLanguage = Narrow<
  Schemas["TemplateLanguageView"],
  { language: CodeLanguage; adapter: TemplatePlugin; formatter: TemplatePlugin; policy: TemplatePlugin }
>;
export type TemplateData = Narrow<Schemas["TemplateView"], { languages: TemplateLanguage[] }>;

export interface Page<T> {
  data: T[];
  nextCursor?: string | null;
}

// ------------------------------------------------------------------ code

export type CodeContextData = Narrow<Schemas["ContextView"], { language: CodeLanguage }>;
/** A rich output of a Code Run. */
export type CodeOutput = Schemas["RunOutputBody"];
/** An exception raised by the code (a result, not an SDK error). */
export type CodeError = Schemas["RunErrorBody"];
export type RunCodeResult = Schemas["RunCodeResultBody"];

// ------------------------------------------------------------------ usage and audit

export type UsageLine = Schemas["UsageLineView"];
export type UsageReport = Narrow<Schemas["UsageReport"], { groupBy: UsageGroupBy }>;
export type AuditEvent = Schemas["AuditEventView"];

// ------------------------------------------------------------------ workspace runs

/** Where a Workspace Run is: `awaiting_archive` → `queued` → `extracting` →
 * `running` → `succeeded` | `failed` | `canceled`. */
export type WorkspaceRunStatus = Schemas["RunStatus"];
/** Why a run ended `failed` (or `canceled`); `null` when it succeeded. */
export type WorkspaceRunReason = Schemas["RunReason"];
/** The archive a run expects: size and SHA-256 (64 lower-case hex) of the `.tar.gz`. */
export type ArchiveSpec = Schemas["ArchiveBody"];
/** A file of /workspace to keep as an artifact when the command ends. */
export type WorkspaceRunArtifactSpec = Narrow<Schemas["ArtifactBody"], { name?: string }>;
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
export type WorkspaceRun = Narrow<
  Schemas["WorkspaceRunView"],
  { metadata: Record<string, unknown>; collected: CollectedWorkspaceArtifact[] }
>;

/** The `data` of each type of run event. */
export type WorkspaceRunEventData = {
  [K in Schemas["RunEventBody"]["type"]]: Extract<Schemas["RunEventBody"], { type: K }>["data"];
};
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

/** The signed part of an Evidence Bundle (the spec leaves it an open object). */
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
export type EvidenceKey = Narrow<Schemas["EvidenceKeyView"], { algorithm: "ed25519" }>;
