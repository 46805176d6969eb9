import { test } from "node:test";
import assert from "node:assert/strict";
import { decide } from "./app.js";

test("big outputs are promoted only when the run allows it", () => {
  const limits = { maxInlineBytes: 10n, maxArtifactBytes: 100n };
  assert.deepEqual(decide({ format: "text", size: 5n }, "inline", limits, ""), { tag: "inline" });
  assert.deepEqual(decide({ format: "png", size: 50n }, "promote", limits, ""), { tag: "promote" });
  assert.deepEqual(decide({ format: "png", size: 50n }, "inline", limits, ""), {
    tag: "reject",
    val: "requires-artifact-promotion",
  });
});
