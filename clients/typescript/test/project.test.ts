/** clients/typescript/README.md's steps for a new project, run as written in an empty
 * directory (npm from its cache where it can: `--prefer-offline`). */

import assert from "node:assert/strict";
import { execSync } from "node:child_process";
import { readFileSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { test } from "node:test";

import { ROOT, startServer, temporaryDirectory } from "./server.js";

test("the package's README steps work as written in an empty project", async () => {
  const readme = readFileSync(join(ROOT, "clients/typescript/README.md"), "utf8");
  const blocks = [...readme.matchAll(/```(sh|ts)\n([\s\S]*?)```/g)].map((m) => m[2] ?? "");
  assert.equal(blocks.length, 4, "a build step, the setup, example.ts, compile and run");
  const [, setup = "", example = "", run = ""] = blocks;
  const project = temporaryDirectory("agentlog-ts-project-");
  const served = await startServer();
  try {
    const shell = (line: string): string =>
      execSync(
        line
          .replaceAll("/path/to/agentlog", ROOT)
          .replace(/^npm install /, "npm install --no-audit --no-fund --prefer-offline "),
        { cwd: project, encoding: "utf8", timeout: 180_000, stdio: ["ignore", "pipe", "pipe"] },
      );
    for (const line of setup.trim().split("\n")) shell(line);
    writeFileSync(
      join(project, "example.ts"),
      example.replaceAll("127.0.0.1:50051", served.target),
    );
    const outputs = run.trim().split("\n").map(shell);
    assert.deepEqual(outputs.at(-1)?.trim().split("\n"), ["stored 1n", "1n text_delta"]);
  } finally {
    await served.stop();
  }
});
