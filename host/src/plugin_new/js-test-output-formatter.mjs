import { test } from "node:test";
import assert from "node:assert/strict";
import { cut } from "./app.js";

test("cut keeps whole characters", () => {
  assert.deepEqual(cut("héllo", 2), ["h", true]);
  assert.deepEqual(cut("hi", 8), ["hi", false]);
});
