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
  createCrowNestClient,
} from "./client.js";
export type {
  ClientOptions,
  CodeCallbacks,
  CreateContextOptions,
  RunCodeOptions,
  CommandOptions,
  CreateSandboxOptions,
  RunOptions,
  StartOptions,
} from "./client.js";
export { CrowNestApiError, CrowNestConnectionError, CrowNestError } from "./errors.js";
export type * from "./types.js";
