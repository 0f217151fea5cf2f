/** The README's @grpc/grpc-js recipe (no generated code) runs as written. */

import assert from "node:assert/strict";
import { execFileSync } from "node:child_process";
import { readFileSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { test } from "node:test";

import { ROOT, startServer } from "./server.js";

test("the README's @grpc/grpc-js recipe runs as written", async () => {
  const readme = readFileSync(join(ROOT, "README.md"), "utf8");
  const section = readme.split("### Node.js with @grpc/grpc-js")[1] ?? "";
  const recipe = /```js\n([\s\S]*?)```/.exec(section)?.[1];
  assert.ok(recipe !== undefined, "no ```js block under the grpc-js heading");
  const served = await startServer();
  try {
    // Beside the tests, so its imports resolve to the workspace's packages.
    const script = join(ROOT, "clients/typescript/dist/grpcjs-recipe.mjs");
    writeFileSync(
      script,
      recipe.replaceAll("/path/to/agentlog", ROOT).replaceAll("127.0.0.1:50051", served.target),
    );
    const lines = execFileSync("node", [script], { encoding: "utf8", timeout: 60_000 })
      .trim()
      .split("\n");
    assert.deepEqual(lines, [
      "2 model_output",
      '1 tool_call_requested {"path":"src/main.rs","offset":9007199254740993}',
      "2 model_output ",
      "FAILED_PRECONDITION WRONG_EXPECTED_SEQUENCE",
    ]);
  } finally {
    await served.stop();
  }
});
