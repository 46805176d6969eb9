// The SDK's types come from docs/openapi.json: the checked-in
// src/generated/openapi.ts must be what openapi-typescript makes of the
// spec today (else `npm run gen:types`), and the exported types are built
// on it.
import assert from "node:assert/strict";
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { pathToFileURL } from "node:url";
import { describe, test } from "node:test";

import type {
  ArtifactPolicy,
  CodeLanguage,
  CommandResult,
  RunCodeOptions,
  SandboxData,
  SandboxStatus,
  components,
} from "@crownest/sdk";
import { REPO } from "./server.js";

interface GenTypes {
  generate(specPath?: string): Promise<string>;
  SPEC: string;
  OUTPUT: string;
}

const genTypes = (): Promise<GenTypes> =>
  import(pathToFileURL(join(REPO, "sdk", "typescript", "scripts", "gen-types.mjs")).href) as Promise<GenTypes>;

describe("generated types", () => {
  test("src/generated/openapi.ts is up to date with docs/openapi.json (else: npm run gen:types)", async () => {
    const { generate, SPEC, OUTPUT } = await genTypes();
    assert.equal(SPEC, join(REPO, "docs", "openapi.json"));
    const fresh = await generate(SPEC);
    const checkedIn = readFileSync(OUTPUT, "utf8");
    assert.ok(fresh === checkedIn, `${OUTPUT} differs from what docs/openapi.json gives: run \`npm run gen:types\` in sdk/typescript`);
  });

  test("a change to the spec shows as drift", async () => {
    const { generate, SPEC, OUTPUT } = await genTypes();
    const spec = JSON.parse(readFileSync(SPEC, "utf8")) as {
      components: { schemas: Record<string, { properties: Record<string, unknown>; required?: string[] }> };
    };
    spec.components.schemas.SandboxView!.properties.driftProbe = { type: "string" };
    spec.components.schemas.SandboxView!.required?.push("driftProbe");
    const dir = mkdtempSync(join(tmpdir(), "crownest-gen-"));
    try {
      const changed = join(dir, "openapi.json");
      writeFileSync(changed, JSON.stringify(spec));
      const text = await generate(changed);
      assert.notEqual(text, readFileSync(OUTPUT, "utf8"));
      assert.match(text, /driftProbe: string;/);
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });

  test("the exported types are the generated schemas, narrowed where the server promises more", () => {
    // Compile-time checks (this file does not build if they fail), and
    // the values they admit.
    type Equal<A, B> = (<T>() => T extends A ? 1 : 2) extends <T>() => T extends B ? 1 : 2 ? true : false;
    const sameStatus: Equal<SandboxStatus, components["schemas"]["SandboxStatus"]> = true;
    const sameSandbox: Equal<SandboxData, components["schemas"]["SandboxView"]> = true;
    const resultIsCommand: Equal<CommandResult["status"], components["schemas"]["CommandStatus"]> = true;
    const policyInSignature: Equal<RunCodeOptions["artifactPolicy"], ArtifactPolicy | undefined> = true;
    const languages: CodeLanguage[] = ["python", "javascript", "typescript"];
    const statuses: SandboxStatus[] = ["starting", "running", "destroyed"];
    // @ts-expect-error: not a sandbox status
    const bogus: SandboxStatus = "paused";
    // @ts-expect-error: not an artifact policy
    const bogusPolicy: ArtifactPolicy = "discard";
    assert.deepEqual([sameStatus, sameSandbox, resultIsCommand, policyInSignature], [true, true, true, true]);
    assert.equal(languages.length + statuses.length, 6);
    assert.deepEqual([bogus, bogusPolicy], ["paused", "discard"]);
  });
});
