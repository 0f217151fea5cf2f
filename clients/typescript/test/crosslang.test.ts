/** Across languages: what TypeScript appends, Python reads back byte for byte, and the
 * reverse; files arcan wrote read through TypeScript match field by field. */

import assert from "node:assert/strict";
import { randomUUID } from "node:crypto";
import { readdirSync, readFileSync } from "node:fs";
import { join } from "node:path";
import { after, before, describe, test } from "node:test";

import {
  AgentlogClient,
  eventToJson,
  isLosslessNumber,
  type JsonValue,
  parseJson,
} from "../src/index.js";
import { everyEvent } from "./samples.js";
import { fixtureCopy, python, type Served, startServer } from "./server.js";

describe("with the Python client", () => {
  let served: Served;
  let client: AgentlogClient;
  before(async () => {
    served = await startServer();
    client = new AgentlogClient(served.target);
  });
  after(async () => {
    client.close();
    await served.stop();
  });

  test("events appended from TypeScript read back from Python as the same JSON bytes", async () => {
    const id = `ts-${randomUUID()}`;
    const events = everyEvent(id);
    for (const event of events) await client.append({ sessionId: id, event });
    const fromPython = python("bridge.py", "events", served.target, id).trimEnd().split("\n");
    assert.deepEqual(fromPython, events.map(eventToJson));
  });

  test("events appended from Python, read and appended again from TypeScript, are unchanged", async () => {
    const fromPython = `py-${randomUUID()}`;
    const again = `ts-${randomUUID()}`;
    python("bridge.py", "append-samples", served.target, fromPython);
    const records = await client.loadSession(fromPython);
    assert.ok(records.length >= 13);
    await client.appendBatch(
      again,
      records.map((r) => ({ event: r.event })),
    );
    const original = python("bridge.py", "events", served.target, fromPython);
    const copied = python("bridge.py", "events", served.target, again);
    assert.equal(copied, original);
    assert.match(original, /9007199254740993/); // the traps were there to lose
    assert.match(original, /18446744073709551615/);
    assert.match(original, /-0\.0/);
  });
});

for (const era of ["seed-era", "latest-variants"]) {
  test(`arcan's files (${era}) read through TypeScript match field by field`, async () => {
    const dataDir = fixtureCopy(era);
    const served = await startServer({ dataDir });
    const client = new AgentlogClient(served.target);
    try {
      const files = readdirSync(dataDir).filter((name) => name.endsWith(".jsonl"));
      assert.ok(files.length > 0);
      for (const file of files) {
        const lines = readFileSync(join(dataDir, file), "utf8")
          .split("\n")
          .filter((line) => line.trim() !== "")
          .map((line) => parseJson(line) as Record<string, unknown>);
        const records = await client.loadSession(file.slice(0, -".jsonl".length));
        assert.equal(records.length, lines.length, file);
        records.forEach((record, index) => {
          const line = lines[index]!;
          assert.equal(record.id, line.id);
          assert.equal(record.sessionId, line.session_id);
          assert.equal(record.parentId, line.parent_id);
          assert.equal(record.sequence, BigInt(index + 1));
          assert.equal(record.timestampNs, nanoseconds(String(line.timestamp)));
          assert.deepEqual(
            sameNumbers(parseJson(eventToJson(record.event))),
            sameNumbers(line.event as JsonValue),
            `${file}:${index + 1}`,
          );
        });
      }
    } finally {
      client.close();
      await served.stop();
    }
  });
}

/** Floats by value: the server writes arcan's `1.5e300` as `1.5e+300`, the same
 * number (arcan reads both). */
function sameNumbers(value: JsonValue): JsonValue {
  if (isLosslessNumber(value)) return Number(value.value);
  if (Array.isArray(value)) return value.map(sameNumbers);
  if (value !== null && typeof value === "object") {
    return Object.fromEntries(Object.entries(value).map(([k, v]) => [k, sameNumbers(v)]));
  }
  return value;
}

/** RFC 3339 (UTC, `Z`, 0 to 9 fraction digits) as nanoseconds since the epoch. */
function nanoseconds(text: string): bigint {
  const found = /^(.*T\d\d:\d\d:\d\d)(?:\.(\d{1,9}))?Z$/.exec(text);
  assert.ok(found?.[1] !== undefined, text);
  const seconds = BigInt(Date.parse(`${found[1]}Z`) / 1000);
  return seconds * 1_000_000_000n + BigInt((found[2] ?? "").padEnd(9, "0"));
}
