// Builds app.js into a WASM component with componentize-js (the compiler
// behind `jco componentize`). `crownest plugin build` runs it.
import { componentize } from "@bytecodealliance/componentize-js";
import { writeFile } from "node:fs/promises";

const [world, out] = process.argv.slice(2);
const { component } = await componentize({
  sourcePath: "app.js",
  witPath: "wit/crownest-plugin.wit",
  worldName: world,
  disableFeatures: ["http", "fetch-event"],
});
await writeFile(out, component);
console.log(`built ${out} (${component.length} bytes)`);
