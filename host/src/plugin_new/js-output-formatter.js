// A CrowNest output formatter in JavaScript: one rich output (a MIME
// bundle) -> one normalised output. This one keeps the `text/plain`
// representation, with the template's `formatter_config` string before it.

/** `text` cut to at most `limit` bytes of UTF-8 on a character boundary. */
export function cut(text, limit) {
  const bytes = new TextEncoder().encode(text);
  if (bytes.length <= limit) return [text, false];
  let end = limit;
  while (end > 0 && (bytes[end] & 0xc0) === 0x80) end--;
  return [new TextDecoder().decode(bytes.slice(0, end)), true];
}

export function format(output, limits, config) {
  const item = output.bundle.find((i) => i.mime === "text/plain" && i.data.tag === "text");
  if (!item) throw "no text/plain representation";
  const [text, truncated] = cut(config + item.data.val, Number(limits.maxTextBytes));
  return {
    kind: output.kind,
    format: "text",
    mime: "text/plain",
    text,
    bytes: undefined,
    size: BigInt(new TextEncoder().encode(text).length),
    truncated,
    executionCount: output.executionCount,
  };
}
