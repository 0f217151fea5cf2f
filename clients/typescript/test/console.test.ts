/// <reference lib="dom" />
/** The web console in a real browser (Debian's chromium, headless, driven by
 * playwright-core) against real servers with real data. Screenshots are kept in
 * build/screenshots as artefacts of the run. */

import assert from "node:assert/strict";
import { createHash, randomUUID } from "node:crypto";
import { existsSync, mkdirSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { after, before, describe, test } from "node:test";

import { type Browser, chromium, type Page } from "playwright-core";

import { AgentlogClient, type AgentEvent, LosslessNumber } from "../src/index.js";
import { delta, everyEvent } from "./samples.js";
import { postgres, ROOT, type Served, startServer, temporaryDirectory } from "./server.js";

const CHROMIUM = process.env.AGENTLOG_CHROMIUM ?? "/usr/bin/chromium";
const SHOTS = join(ROOT, "build", "screenshots");
// As the machine's probe starts it: no sandbox (root), no GPU, nothing in the background
// that would reach for the network.
const FLAGS = [
  "--no-sandbox",
  "--disable-gpu",
  "--disable-quic",
  "--no-first-run",
  "--disable-background-networking",
  "--disable-component-update",
  "--disable-sync",
];

let browser: Browser;

before(async () => {
  if (!existsSync(CHROMIUM)) {
    throw new Error(
      `the console's tests drive a real browser and ${CHROMIUM} is missing: install Debian's ` +
        "chromium (apt-get install chromium), or point AGENTLOG_CHROMIUM at a Chromium",
    );
  }
  mkdirSync(SHOTS, { recursive: true });
  browser = await chromium.launch({ executablePath: CHROMIUM, args: FLAGS, headless: true });
});

after(async () => {
  await browser.close();
});

/** A page of the console on `served`; every request it makes must stay on its origin. */
async function console_(served: Served, path = "#/"): Promise<Page> {
  const page = await browser.newPage({ viewport: { width: 1280, height: 900 } });
  const origin = `http://${served.httpTarget}`;
  page.on("request", (request) => {
    const url = request.url();
    if (!url.startsWith(origin) && !url.startsWith("data:")) {
      throw new Error(`the console asked for ${url}, outside its own origin`);
    }
  });
  await page.goto(`${origin}/${path}`);
  return page;
}

function shot(page: Page, name: string): Promise<Buffer> {
  return page.screenshot({ path: join(SHOTS, `${name}.png`), fullPage: false });
}

const run = (s: string): { run_id: string; session_id: string } => ({
  run_id: "r1",
  session_id: s,
});

describe("the web console", () => {
  let served: Served;
  let client: AgentlogClient;

  before(async () => {
    served = await startServer({ http: true });
    client = new AgentlogClient(served.target, { retries: 0 });
  });

  after(async () => {
    client.close();
    await served.stop();
  });

  test("lists sessions a page at a time and filters them by prefix and label", async () => {
    const prefix = `list-${randomUUID().slice(0, 6)}-`;
    for (let i = 0; i < 60; i++) {
      const id = `${prefix}${String(i).padStart(3, "0")}`;
      await client.append({
        sessionId: id,
        event: delta(id, "x"),
        labels: { team: i % 2 === 0 ? "a" : "b" },
      });
    }
    const page = await console_(served, `#/?prefix=${prefix}`);
    const rows = page.locator("[data-testid=sessions] tbody tr");
    await page.waitForFunction(
      () => document.querySelectorAll("[data-testid=sessions] tbody tr a").length === 50,
    );
    assert.equal(await rows.first().locator("a").textContent(), `${prefix}000`);
    await page.click("[data-testid=next]");
    await page.waitForFunction(
      () => document.querySelectorAll("[data-testid=sessions] tbody tr a").length === 10,
    );
    assert.equal(await rows.first().locator("a").textContent(), `${prefix}050`);
    await page.fill("#labels", "team=b");
    await page.press("#labels", "Enter");
    await page.waitForFunction(
      () => document.querySelectorAll("[data-testid=sessions] tbody tr a").length === 30,
    );
    assert.match(page.url(), /labels=team%3Db/); // the filtered list is a link to share
    await shot(page, "sessions");
    await page.close();
  });

  test("shows a session with every event kind as a person reads it", async () => {
    const id = `every-${randomUUID().slice(0, 8)}`;
    const events: AgentEvent[] = [
      { part_type: "run_started", ...run(id), provider: "anthropic", max_iterations: 8 },
      { part_type: "iteration_started", ...run(id), iteration: 1 },
      { part_type: "text_delta", ...run(id), iteration: 1, delta: "Let me " },
      { part_type: "text_delta", ...run(id), iteration: 1, delta: "read the file." },
      {
        part_type: "model_output",
        ...run(id),
        iteration: 1,
        stop_reason: "tool_use",
        directive_count: 1n,
        usage: {
          input_tokens: 1200n,
          output_tokens: 345n,
          cache_read_tokens: 7n,
          cache_creation_tokens: 0n,
        },
      },
      {
        part_type: "tool_call_requested",
        ...run(id),
        iteration: 1,
        call: { call_id: "c1", tool_name: "read_file", input: { path: "src/main.rs" } },
      },
      {
        part_type: "tool_call_completed",
        ...run(id),
        iteration: 1,
        result: {
          call_id: "c1",
          tool_name: "read_file",
          output: { size: new LosslessNumber("18446744073709551615") },
        },
      },
      {
        part_type: "tool_call_requested",
        ...run(id),
        iteration: 1,
        call: { call_id: "c2", tool_name: "delete_file", input: { path: "/" } },
      },
      {
        part_type: "approval_requested",
        ...run(id),
        approval_id: "a1",
        call_id: "c2",
        tool_name: "delete_file",
        arguments: { path: "/" },
        risk: "critical",
      },
      {
        part_type: "approval_resolved",
        ...run(id),
        approval_id: "a1",
        decision: "denied",
        reason: "too broad",
      },
      {
        part_type: "tool_call_failed",
        ...run(id),
        iteration: 1,
        call_id: "c2",
        tool_name: "delete_file",
        error: "denied by a person",
      },
      {
        part_type: "state_patched",
        ...run(id),
        iteration: 1,
        revision: 1n,
        patch: {
          format: "merge_patch",
          patch: { files: ["src/main.rs"], cursor: 3 },
          source: "tool",
        },
      },
      {
        part_type: "state_patched",
        ...run(id),
        iteration: 1,
        revision: 2n,
        patch: {
          format: "json_patch",
          patch: [{ op: "replace", path: "/cursor", value: 9 }],
          source: "model",
        },
      },
      {
        part_type: "context_compacted",
        ...run(id),
        iteration: 1,
        dropped_count: 12n,
        tokens_before: 9000n,
        tokens_after: 2000n,
      },
      { part_type: "run_errored", ...run(id), error: "the model timed out" },
      {
        part_type: "run_finished",
        ...run(id),
        reason: "completed",
        total_iterations: 1,
        final_answer: "Done.",
      },
      ...everyEvent(id, "r2"), // the client's own sample: every kind, with tricky values
    ];
    await client.appendBatch(
      id,
      events.map((event) => ({ event })),
    );
    const page = await console_(served, `#/s/${id}`);
    await page.waitForSelector("[data-kind=run-start]");
    const text = page.locator("[data-kind=text]").first();
    assert.equal(await text.locator(".text-body").textContent(), "Let me read the file."); // deltas joined
    const tool = page.locator("[data-kind=tool]").first();
    assert.match((await tool.textContent()) ?? "", /done\s*read_file · [\d.]+ ms/);
    assert.match((await tool.textContent()) ?? "", /18446744073709551615/);
    const failed = page.locator("[data-kind=tool]").nth(1);
    assert.match((await failed.textContent()) ?? "", /failed.*delete_file.*denied by a person/s);
    const approval = page.locator("[data-kind=approval]").first();
    assert.match((await approval.textContent()) ?? "", /denied.*critical risk.*too broad/s);
    assert.match(
      (await page.locator("[data-kind=model]").first().textContent()) ?? "",
      /tool_use.*tokens in 1200, out 345/s,
    );
    assert.match(
      (await page.locator("[data-kind=compacted]").first().textContent()) ?? "",
      /9000 → 2000/,
    );
    assert.equal(
      await page.locator(".block.error").first().locator("strong").textContent(),
      "Run error: ",
    );
    // the state a patch produced, from the session's start
    const second = page.locator("[data-kind=state]").nth(1);
    await second.locator("button.link").click();
    await page.waitForFunction(() =>
      /"cursor": 9/.test(document.querySelectorAll(".state-after")[1]?.textContent ?? ""),
    );
    assert.match(
      (await second.locator(".state-after").textContent()) ?? "",
      /"files": \[\s*"src\/main.rs"\s*\]/,
    );
    // the raw record, exactly as stored: an integer past 2^53 keeps every digit
    await tool.locator("button.raw").click();
    const raw = (await page.locator("[data-testid=raw]").nth(1).textContent()) ?? "";
    assert.match(raw, /"size": 18446744073709551615/);
    assert.match(raw, /"part_type": "tool_call_completed"/);
    assert.ok((await page.locator("[data-kind=tool]").count()) >= 4);
    await shot(page, "session");
    await page.close();
  });

  test("a tool call's children in another session open from the parent's record", async () => {
    const parent = `parent-${randomUUID().slice(0, 8)}`;
    const child = `child-${randomUUID().slice(0, 8)}`;
    const asked = await client.append({
      sessionId: parent,
      event: {
        part_type: "tool_call_requested",
        ...run(parent),
        iteration: 1,
        call: { call_id: "sub", tool_name: "sub_agent", input: null },
      },
    });
    await client.append({
      sessionId: child,
      event: delta(child, "sub-agent at work"),
      parentId: asked.id,
    });
    const page = await console_(served, `#/s/${parent}`);
    await page.locator("[data-kind=tool] button.raw").click();
    await page.locator("[data-testid=detail] button.link").click();
    await page.locator(`[data-testid=detail] a`, { hasText: child }).click();
    await page.waitForSelector(`[data-testid=session-id]:text("${child}")`);
    await page.close();
  });

  test("a live append appears within a second", async () => {
    const id = `live-${randomUUID().slice(0, 8)}`;
    await client.append({ sessionId: id, event: delta(id, "first") });
    const page = await console_(served, `#/s/${id}`);
    await page.waitForSelector("[data-kind=text]");
    const delays: number[] = [];
    for (let i = 0; i < 5; i++) {
      const started = Date.now();
      await client.append({
        sessionId: id,
        event: { part_type: "run_errored", ...run(id), error: `live ${i}` },
      });
      await page.waitForSelector(`.block.error:has-text("live ${i}")`, { timeout: 1000 });
      delays.push(Date.now() - started);
    }
    assert.ok(Math.max(...delays) < 1000, `delays ${delays.join(", ")} ms`);
    await page.close();
  });

  test("the feed shows every session's events live, filtered, and a pause loses nothing", async () => {
    const prefix = `feed-${randomUUID().slice(0, 6)}-`;
    const page = await console_(served, `#/feed?prefix=${prefix}&kinds=run_errored`);
    await page.waitForSelector("[data-testid=feed-state]:text('live')");
    const error = (s: string, n: number): AgentEvent => ({
      part_type: "run_errored",
      ...run(s),
      error: `e${n}`,
    });
    await client.append({ sessionId: `${prefix}a`, event: error(`${prefix}a`, 1) });
    await client.append({ sessionId: `${prefix}b`, event: delta(`${prefix}b`, "not this kind") });
    await client.append({ sessionId: `other-${prefix}`, event: error("other", 2) });
    await page.waitForSelector("[data-testid=feed] tbody tr:has-text('e1')");
    await page.click("[data-testid=pause]");
    await page.waitForSelector("[data-testid=feed-state]:text('paused')");
    await client.append({ sessionId: `${prefix}b`, event: error(`${prefix}b`, 3) });
    await page.waitForTimeout(300);
    assert.equal(await page.locator("[data-testid=feed] tbody tr").count(), 1);
    await page.click("[data-testid=pause]"); // resume: from the position after the last seen
    await page.waitForSelector("[data-testid=feed] tbody tr:has-text('e3')");
    const rows = await page.locator("[data-testid=feed] tbody tr").allTextContents();
    assert.equal(rows.length, 2, rows.join(" | "));
    assert.match(rows[0] ?? "", new RegExp(`${prefix}b #2.*run_errored.*e3`));
    await shot(page, "feed");
    await page.close();
  });

  test("the event log is read with the keyboard", async () => {
    const id = `keys-${randomUUID().slice(0, 8)}`;
    await client.appendBatch(
      id,
      [1, 2, 3].map((n) => ({ event: delta(id, `k${n}`) })),
    );
    const page = await console_(served, `#/s/${id}`);
    await page.click("[role=tab]:text('Event log')");
    await page.waitForSelector(".log-row[data-sequence='3']");
    await page.focus("[data-testid=event-log]");
    await page.keyboard.press("j");
    await page.keyboard.press("j");
    await page.keyboard.press("Enter");
    await page.waitForSelector("[data-testid=raw]:has-text('\"sequence\": 2')");
    assert.match((await page.locator(".log-row.selected").textContent()) ?? "", /^2/);
    await page.close();
  });

  test("an unknown session says so", async () => {
    const page = await console_(served, "#/s/no-such-session");
    await page.waitForSelector("[data-testid=missing]");
    await page.close();
  });
});

test("the console survives a restart of the server without losing or doubling an event", async () => {
  const dataDir = temporaryDirectory();
  let served = await startServer({ dataDir, http: true });
  const id = "restart";
  let client = new AgentlogClient(served.target, { retries: 0 });
  await client.append({ sessionId: id, event: delta(id, "before") });
  const page = await console_(served, `#/s/${id}`);
  await page.waitForSelector("[data-kind=text]");
  const { port, httpPort } = served;
  await served.stop();
  client.close();
  await page.waitForSelector("[data-testid=live]:text('reconnecting…')", { timeout: 10_000 });
  served = await startServer({ dataDir, port, http: true, httpPort });
  client = new AgentlogClient(served.target, { retries: 0 });
  try {
    for (const n of [1, 2, 3]) {
      await client.append({
        sessionId: id,
        event: { part_type: "run_errored", ...run(id), error: `after ${n}` },
      });
    }
    await page.waitForSelector(".block.error:has-text('after 3')", { timeout: 15_000 });
    assert.equal(await page.locator(".block.error").count(), 3);
    assert.equal(await page.locator("[data-kind=text]").count(), 1);
    await page.close();
  } finally {
    client.close();
    await served.stop();
  }
});

test("a refused token shows the refusal, and the right one opens the sessions", async () => {
  const dataDir = temporaryDirectory();
  const access = join(dataDir, "..", `access-${randomUUID()}.json`);
  const token = "console-secret";
  writeFileSync(
    access,
    JSON.stringify({
      callers: [
        {
          name: "person",
          token_sha256: createHash("sha256").update(token).digest("hex"),
          permissions: ["read"],
          sessions: [""],
        },
      ],
    }),
  );
  const served = await startServer({ dataDir, http: true, args: ["--auth-file", access] });
  try {
    const page = await console_(served);
    await page.waitForSelector(".banner.trouble-token:has-text('This server needs a token')");
    await page.fill("#token", "wrong");
    await page.press("#token", "Enter");
    await page.waitForSelector(".banner.trouble-token:has-text('refused this token')");
    await shot(page, "refused-token");
    await page.fill("#token", token);
    await page.press("#token", "Enter");
    await page.waitForSelector("[data-testid=sessions] tbody tr");
    assert.equal(
      await page.locator(".banner").isVisible(),
      false,
      (await page.locator(".banner").textContent()) ?? "",
    );
    await page.close();
  } finally {
    await served.stop();
  }
});

test("a session of 100,000 records opens in under 2 seconds and its event log scrolls", async () => {
  const dataDir = temporaryDirectory();
  const id = "big";
  const lines: string[] = [];
  const start = Date.UTC(2026, 11, 1);
  for (let i = 0; i < 100_000; i++) {
    const stamp = new Date(start + i).toISOString().replace("Z", "000000Z"); // nanoseconds
    lines.push(
      JSON.stringify({
        id: randomUUID(),
        session_id: id,
        parent_id: null,
        timestamp: stamp,
        event: {
          part_type: "text_delta",
          run_id: "r",
          session_id: id,
          iteration: 1,
          delta: `line ${i + 1} `,
        },
      }),
    );
  }
  writeFileSync(join(dataDir, `${id}.jsonl`), lines.join("\n") + "\n");
  const served = await startServer({ dataDir, http: true });
  try {
    const page = await browser.newPage({ viewport: { width: 1280, height: 900 } });
    const started = Date.now();
    await page.goto(`http://${served.httpTarget}/#/s/${id}`);
    await page.waitForSelector("[data-testid=count]:text('100000 records')");
    await page.waitForFunction(() =>
      /line 100000 $/.test(document.querySelector(".text-body")?.textContent ?? ""),
    );
    const opened = Date.now() - started;
    assert.ok(opened < 2000, `opened in ${opened} ms`);
    await page.click("[role=tab]:text('Event log')");
    await page.waitForSelector(".log-row[data-sequence='1']");
    const scrolled = Date.now();
    await page.locator("[data-testid=event-log]").evaluate((log) => {
      log.scrollTop = log.scrollHeight / 2;
    });
    await page.waitForSelector(".log-row[data-sequence='50000']");
    await page.locator("[data-testid=event-log]").evaluate((log) => {
      log.scrollTop = log.scrollHeight;
    });
    await page.waitForSelector(".log-row[data-sequence='100000']");
    const rows = await page.locator(".log-row").count();
    assert.ok(rows < 200, `${rows} rows in the page: the log is windowed`);
    console.log(
      `# 100,000-record session: opened in ${opened} ms, scrolled to the middle and the end in ${Date.now() - scrolled} ms`,
    );
    await shot(page, "event-log");
    await page.close();
  } finally {
    await served.stop();
  }
});

test("the console serves a session stored in PostgreSQL, live", async () => {
  const served = await postgres(true);
  const client = new AgentlogClient(served.target, { retries: 0 });
  try {
    const id = `pg-${randomUUID().slice(0, 8)}`;
    await client.appendBatch(
      id,
      everyEvent(id).map((event) => ({ event })),
      { labels: { store: "postgresql" } },
    );
    const page = await console_(served, "#/?labels=store%3Dpostgresql");
    await page.locator(`[data-testid=sessions] a:text("${id}")`).click();
    await page.waitForSelector("[data-kind=tool]");
    assert.ok((await page.locator("[data-kind]").count()) > 5);
    await client.append({
      sessionId: id,
      event: { part_type: "run_errored", ...run(id), error: "pg live" },
    });
    await page.waitForSelector(".block.error:has-text('pg live')", { timeout: 1000 });
    await page.close();
  } finally {
    client.close();
    await served.stop();
  }
});
