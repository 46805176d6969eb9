// A promotion policy written in JavaScript: images over 64 KiB become
// Artifacts (when the run allows promotion), smaller images and text are
// returned inline. Built with `jco componentize` into a WASM component for
// the `crownest:plugin/promotion-policy@0.1.0` world (see README.md).

import { log } from "crownest:plugin/host@0.1.0";

/** Images at most this large are returned inline (base64 in the result). */
const INLINE_IMAGE_BYTES = 64n * 1024n;

const IMAGES = new Set(["png", "jpeg", "svg"]);

/**
 * @param {{format: string, size: bigint}} output
 * @param {"inline" | "promote"} policy
 * @param {{maxInlineBytes: bigint, maxArtifactBytes: bigint}} limits
 */
export function decide(output, policy, limits) {
  if (output.size > limits.maxArtifactBytes) {
    return { tag: "reject", val: "output-too-large" };
  }
  const bigImage = IMAGES.has(output.format) && output.size > INLINE_IMAGE_BYTES;
  if (bigImage || output.size > limits.maxInlineBytes) {
    if (policy === "promote") {
      log("debug", `promoting a ${output.format} output of ${output.size} bytes`);
      return { tag: "promote" };
    }
    return {
      tag: "reject",
      val: bigImage ? "requires-artifact-promotion" : "output-too-large",
    };
  }
  if (output.format === "unknown") {
    return { tag: "reject", val: "unsupported-format" };
  }
  return { tag: "inline" };
}
