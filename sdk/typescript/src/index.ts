/**
 * @crownest/sdk: the TypeScript client of the CrowNest REST API.
 * `createCrowNestClient()` is the entry point; see README.md.
 */
export {
  Artifacts,
  Audit,
  Code,
  Command,
  Commands,
  CrowNestClient,
  DEFAULT_BASE_URL,
  Files,
  PageIterator,
  Previews,
  Sandbox,
  SandboxArtifacts,
  Sandboxes,
  Templates,
  Usage,
  VERSION,
  WorkspaceRuns,
  createCrowNestClient,
  isTerminalRun,
} from "./client.js";
export { DIRECT_UPLOAD_MAX, isIgnored, packDirectory, parseGitignore, walkDirectory } from "./archive.js";
export type { IgnoreRule, PackedArchive, WalkEntry } from "./archive.js";
export type {
  CallOptions,
  ClientOptions,
  CodeCallbacks,
  CreateContextOptions,
  RunCodeOptions,
  CommandOptions,
  CreateSandboxOptions,
  CreateWorkspaceRunOptions,
  ListAuditEventsOptions,
  ListSandboxesOptions,
  ListWorkspaceRunsOptions,
  MetricsStreamOptions,
  RunDirectoryOptions,
  RunOptions,
  StartOptions,
  UploadArchiveOptions,
  UsageOptions,
  WatchHandle,
  WatchOptions,
  WorkspaceRunResult,
  WriteData,
  WriteEntry,
  WriteOptions,
} from "./client.js";
export { parseRetryAfter } from "./retry.js";
export { CrowNestApiError, CrowNestConnectionError, CrowNestError, CrowNestTimeoutError } from "./errors.js";
export type * from "./types.js";
export type { components, operations, paths } from "./generated/openapi.js";
