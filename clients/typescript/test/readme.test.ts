/** The README's TypeScript quick start runs as written (against a server of its own). */

import assert from "node:assert/strict";
import { execFileSync } from "node:child_process";
import { readFileSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { test } from "node:test";

import { ROOT, startServer } from "./server.js";

test("the README's TypeScript quick start runs as written", async () => {
  const readme = readFileSync(join(ROOT, "README.md"), "utf8");
  const section = readme.split("### TypeScript")[1] ?? "";
  const example = /```ts\n([\s\S]*?)```/.exec(section)?.[1];
  assert.ok(example !== undefined, "no ```ts block under ### TypeScript");
  assert.match(example, /from "@agentlog\/client"/);
  const served = await startServer();
  try {
    // Plain JavaScript is TypeScript too: the example has no annotations, so Node
    // runs it as is, importing the package as an installed one (the npm workspace).
    const script = join(ROOT, "clients/typescript/dist/readme-example.mjs");
    writeFileSync(script, example.replaceAll("127.0.0.1:50051", served.target));
    const output = execFileSync("node", [script], { encoding: "utf8", timeout: 60_000 });
    const lines = output.trim().split("\n");
    assert.equal(lines[0], "1n tool_call_requested");
    assert.match(lines[1] ?? "", /^1n [0-9a-f-]{36} \d{4}-\d\d-\d\dT[\d:.]+Z \d+$/);
    const stored = readFileSync(join(served.dataDir, "ts-demo.jsonl"), "utf8");
    assert.match(stored, /"offset":9007199254740993\}/); // the big integer, exact
  } finally {
    await served.stop();
  }
});
