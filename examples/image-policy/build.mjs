// Builds policy.js into a WASM component with componentize-js (the
// compiler behind `jco componentize`):
//   npm ci && node build.mjs [OUT.wasm]
// Default output: image_policy.wasm here. Run from this directory: the
// WIT path is relative to it.
import { componentize } from "@bytecodealliance/componentize-js";
import { writeFile } from "node:fs/promises";

const out = process.argv[2] ?? "image_policy.wasm";
const { component } = await componentize({
  sourcePath: "policy.js",
  witPath: "../../wit/crownest-plugin.wit",
  worldName: "promotion-policy",
  // A policy needs no HTTP: without these the component imports no wasi:http.
  disableFeatures: ["http", "fetch-event"],
});
await writeFile(out, component);
console.log(`built ${out} (${component.length} bytes)`);
