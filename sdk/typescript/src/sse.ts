/** A small `text/event-stream` decoder: `event`, `data` (joined by
 * newlines), `id`, comments, dispatch on a blank line. */

export interface ServerSentEvent {
  event: string;
  data: string;
  id: string | null;
}

export class SSEDecoder {
  private event = "";
  private data: string[] = [];
  private id: string | null = null;

  feed(line: string): ServerSentEvent | null {
    if (line === "") {
      if (this.data.length === 0 && this.event === "") return null;
      const ev = { event: this.event || "message", data: this.data.join("\n"), id: this.id };
      this.event = "";
      this.data = [];
      this.id = null;
      return ev;
    }
    if (line.startsWith(":")) return null;
    const colon = line.indexOf(":");
    const name = colon === -1 ? line : line.slice(0, colon);
    let value = colon === -1 ? "" : line.slice(colon + 1);
    if (value.startsWith(" ")) value = value.slice(1);
    if (name === "event") this.event = value;
    else if (name === "data") this.data.push(value);
    else if (name === "id" && !value.includes("\0")) this.id = value;
    return null;
  }
}

/** Splits a byte stream into lines (`\n`, `\r\n` or `\r`), decoding UTF-8
 * across chunk boundaries. */
export async function* lines(body: ReadableStream<Uint8Array>): AsyncGenerator<string> {
  const decoder = new TextDecoder();
  const reader = body.getReader();
  let buffer = "";
  let pendingCR = false;
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      if (pendingCR && buffer.startsWith("\n")) buffer = buffer.slice(1);
      pendingCR = false;
      for (;;) {
        const match = /\r\n|\n|\r/.exec(buffer);
        if (!match) break;
        if (match[0] === "\r" && match.index === buffer.length - 1) {
          pendingCR = true; // maybe the first half of a CRLF split across chunks
        }
        yield buffer.slice(0, match.index);
        buffer = buffer.slice(match.index + match[0].length);
      }
    }
    buffer += decoder.decode();
    if (buffer) yield buffer;
  } finally {
    // Also closes the connection when the consumer stopped early.
    await reader.cancel().catch(() => undefined);
  }
}
