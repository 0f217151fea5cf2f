/**
 * The console's figures for `make bench` (bench/http.py runs this):
 * `node dist/bench/console.js HTTP_TARGET GRPC_TARGET BIG_SESSION LIVE_SESSION` opens
 * BIG_SESSION in headless chromium and prints, as JSON, the time to first paint and to a
 * fully rendered first screen (its last record shown, its count known), then appends
 * 200 records to LIVE_SESSION and prints the delay from each append's answer to its
 * element on the page (p50, p99).
 */

/// <reference lib="dom" />

import { chromium } from "playwright-core";

import { AgentlogClient } from "../src/index.js";

const CHROMIUM = process.env.AGENTLOG_CHROMIUM ?? "/usr/bin/chromium";
const FLAGS = [
  "--no-sandbox",
  "--disable-gpu",
  "--disable-background-networking",
  "--no-first-run",
];

function percentile(values: number[], fraction: number): number {
  const sorted = [...values].sort((a, b) => a - b);
  return sorted[Math.min(sorted.length - 1, Math.floor(fraction * sorted.length))] ?? NaN;
}

async function main(): Promise<void> {
  const [httpTarget, grpcTarget, big, live] = process.argv.slice(2) as [
    string,
    string,
    string,
    string,
  ];
  const browser = await chromium.launch({ executablePath: CHROMIUM, args: FLAGS });
  const client = new AgentlogClient(grpcTarget);
  try {
    const page = await browser.newPage({ viewport: { width: 1280, height: 900 } });
    const started = Date.now();
    await page.goto(`http://${httpTarget}/#/s/${big}`);
    await page.waitForSelector("[data-testid=count]");
    await page.waitForFunction(() => document.querySelectorAll(".block").length > 0);
    const rendered = Date.now() - started;
    const paint = await page.evaluate(
      () => performance.getEntriesByName("first-contentful-paint")[0]?.startTime ?? NaN,
    );
    await page.goto(`http://${httpTarget}/#/s/${live}`);
    await page.waitForSelector("[data-kind=text]");
    const delays: number[] = [];
    for (let n = 0; n < 200; n++) {
      await client.append({
        sessionId: live,
        event: { part_type: "run_errored", run_id: "r", session_id: live, error: `live ${n}` },
      });
      const answered = Date.now();
      await page.waitForFunction(
        (text) => document.querySelector(".block.error:last-child")?.textContent?.includes(text),
        `live ${n}{ }`,
        { polling: "raf" },
      );
      delays.push(Date.now() - answered);
    }
    console.log(
      JSON.stringify({
        first_paint_ms: paint,
        first_screen_ms: rendered,
        live_p50_ms: percentile(delays, 0.5),
        live_p99_ms: percentile(delays, 0.99),
      }),
    );
  } finally {
    client.close();
    await browser.close();
  }
}

await main();
