// Starts a crownest server on 127.0.0.1 with a temp data dir for the tests
// and stops it with SIGTERM after them.
import { execFileSync, spawn, type ChildProcess } from "node:child_process";
import { existsSync, mkdtempSync, openSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";

/** /work/main (this file is compiled to sdk/typescript/build-test/sdk/typescript/test/). */
export const REPO = resolve(dirname(fileURLToPath(import.meta.url)), "../../../../../..");

export interface TestServer {
  baseUrl: string;
  dataDir: string;
  binary: string;
  mintKey(org: string, scopes?: string): string;
  stop(): Promise<void>;
}

export async function startServer(): Promise<TestServer> {
  const binary = process.env.CROWNEST_BIN ?? join(REPO, "target", "debug", "crownest");
  if (!existsSync(binary)) throw new Error(`crownest binary not found at ${binary} (cargo build -p crownest, or set CROWNEST_BIN)`);
  const dataDir = mkdtempSync(join(tmpdir(), "crownest-sdk-ts-"));
  const log = openSync(join(dataDir, "server.log"), "w");
  const child: ChildProcess = spawn(binary, ["serve", "--listen", "127.0.0.1:0", "--data-dir", dataDir], {
    stdio: ["ignore", "pipe", log],
  });
  const baseUrl = await new Promise<string>((resolveUrl, reject) => {
    let out = "";
    const timer = setTimeout(() => reject(new Error(`crownest did not start; see ${dataDir}/server.log`)), 60_000);
    child.stdout!.on("data", (chunk: Buffer) => {
      out += chunk.toString();
      const m = /listening on (http:\/\/\S+)/.exec(out);
      if (m) {
        clearTimeout(timer);
        resolveUrl(m[1]!);
      }
    });
    child.on("exit", (code) => {
      clearTimeout(timer);
      reject(new Error(`crownest exited with ${code}; see ${dataDir}/server.log`));
    });
  });
  child.removeAllListeners("exit");
  return {
    baseUrl,
    dataDir,
    binary,
    mintKey(org: string, scopes = "all"): string {
      const out = execFileSync(binary, ["keys", "create", "--org", org, "--scopes", scopes, "--data-dir", dataDir], {
        encoding: "utf8",
        stdio: ["ignore", "pipe", "ignore"],
      });
      const key = out.trim().split("\n").pop()!;
      if (!key.startsWith("cn_live_")) throw new Error(`unexpected key output: ${out}`);
      return key;
    },
    async stop(): Promise<void> {
      const exited = new Promise<number | null>((r) => child.once("exit", (code) => r(code)));
      child.kill("SIGTERM");
      const timeout = setTimeout(() => child.kill("SIGKILL"), 30_000);
      const code = await exited;
      clearTimeout(timeout);
      if (code === 0) rmSync(dataDir, { recursive: true, force: true });
    },
  };
}
