export {
  Artifacts,
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
  VERSION,
  WorkspaceRuns,
  createCrowNestClient,
  isTerminalRun,
} from "./client.js";
export { DIRECT_UPLOAD_MAX, isIgnored, packDirectory, parseGitignore, walkDirectory } from "./archive.js";
export type { IgnoreRule, PackedArchive, WalkEntry } from "./archive.js";
export type {
  ClientOptions,
  CodeCallbacks,
  CreateContextOptions,
  RunCodeOptions,
  CommandOptions,
  CreateSandboxOptions,
  CreateWorkspaceRunOptions,
  ListWorkspaceRunsOptions,
  RunDirectoryOptions,
  RunOptions,
  StartOptions,
  UploadArchiveOptions,
  WorkspaceRunResult,
} from "./client.js";
export { CrowNestApiError, CrowNestConnectionError, CrowNestError, CrowNestTimeoutError } from "./errors.js";
export type * from "./types.js";
