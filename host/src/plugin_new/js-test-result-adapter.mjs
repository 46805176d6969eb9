import { test } from "node:test";
import assert from "node:assert/strict";
import { adapt } from "./app.js";

test("streams, outputs and the error are folded", () => {
  const adapted = adapt([
    { tag: "stream", val: { name: "stdout", text: "hi\n" } },
    { tag: "error", val: { ename: "E", evalue: "x", traceback: ["\x1b[31mE\x1b[0m: x"] } },
  ], "");
  assert.deepEqual(adapted.stdout, ["hi\n"]);
  assert.deepEqual(adapted.error.traceback, ["E: x"]);
});
