export {
  Artifacts,
  Command,
  Commands,
  CrowNestClient,
  DEFAULT_BASE_URL,
  Files,
  PageIterator,
  Sandbox,
  SandboxArtifacts,
  Sandboxes,
  Templates,
  VERSION,
  createCrowNestClient,
} from "./client.js";
export type {
  ClientOptions,
  CommandOptions,
  CreateSandboxOptions,
  RunOptions,
  StartOptions,
} from "./client.js";
export { CrowNestApiError, CrowNestConnectionError, CrowNestError } from "./errors.js";
export type * from "./types.js";
