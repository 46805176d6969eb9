// Generates src/generated/openapi.ts from docs/openapi.json with
// openapi-typescript (a devDependency). `npm run gen:types` writes it;
// `node scripts/gen-types.mjs --check` exits 1 when the checked-in file
// differs from what docs/openapi.json gives (test/types.test.ts does the
// same in memory, as part of `npm test`).
import { readFileSync, writeFileSync } from "node:fs";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath, pathToFileURL } from "node:url";
import openapiTS, { COMMENT_HEADER, astToString } from "openapi-typescript";

const SDK = resolve(dirname(fileURLToPath(import.meta.url)), "..");
export const SPEC = join(SDK, "..", "..", "docs", "openapi.json");
export const OUTPUT = join(SDK, "src", "generated", "openapi.ts");

/** The generated module's text for the OpenAPI document at `specPath`. */
export async function generate(specPath = SPEC) {
  // The schema is read here (not by URL) so that a spec given as a path
  // in a temp dir behaves the same as the checked-in one.
  const spec = JSON.parse(readFileSync(specPath, "utf8"));
  // `emptyObjectsUnknown`: a free-form object (`metadata`, `details`) is
  // `Record<string, unknown>`, not `Record<string, never>`.
  const ast = await openapiTS(spec, { emptyObjectsUnknown: true, silent: true });
  return COMMENT_HEADER + astToString(ast);
}

if (process.argv[1] && pathToFileURL(process.argv[1]).href === import.meta.url) {
  const text = await generate();
  if (process.argv.includes("--check")) {
    const current = readFileSync(OUTPUT, "utf8");
    if (current !== text) {
      console.error(`${OUTPUT} is out of date with docs/openapi.json: run \`npm run gen:types\``);
      process.exit(1);
    }
  } else {
    writeFileSync(OUTPUT, text);
    console.error(`wrote ${OUTPUT}`);
  }
}
