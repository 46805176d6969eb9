// A CrowNest promotion policy in JavaScript: one output + the run's
// artifact policy -> inline, promote or reject.

export function decide(output, policy, limits, config) {
  if (output.size > limits.maxArtifactBytes) return { tag: "reject", val: "output-too-large" };
  if (output.format === "unknown") return { tag: "reject", val: "unsupported-format" };
  if (output.size <= limits.maxInlineBytes) return { tag: "inline" };
  if (policy === "promote") return { tag: "promote" };
  return { tag: "reject", val: "requires-artifact-promotion" };
}
