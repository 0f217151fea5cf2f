/** Across a server restart: appends retried with their ids, subscriptions resumed
 * where they stood, with no gap and no duplicate. */

import assert from "node:assert/strict";
import { randomUUID } from "node:crypto";
import { test } from "node:test";

import { AgentlogClient, CaughtUp, type EventRecord, FeedRecord } from "../src/index.js";
import { delta } from "./samples.js";
import { startServer, temporaryDirectory } from "./server.js";

test("subscriptions resume across a server restart with no gap or duplicate", async () => {
  const dataDir = temporaryDirectory();
  let served = await startServer({ dataDir });
  const client = new AgentlogClient(served.target, { retries: 50 });
  const id = `resume-${randomUUID().slice(0, 8)}`;
  try {
    const before = await client.appendBatch(
      id,
      [0, 1, 2].map((n) => ({ event: delta(id, `b${n}`) })),
    );
    const followed = client.subscribeSession(id, { fromSequence: 1 });
    const feed = client.subscribeAll({ fromPosition: 1 });
    const seen: EventRecord[] = [];
    const fed: bigint[] = [];
    for (let n = 0; n < 4; n++) {
      const item = (await followed.next()).value;
      if (!(item instanceof CaughtUp) && item !== undefined) seen.push(item);
      const fedItem = (await feed.next()).value;
      if (fedItem instanceof FeedRecord) fed.push(fedItem.position);
    }
    await served.stop(); // the streams end with UNAVAILABLE; the client reconnects
    served = await startServer({ dataDir, port: served.port });
    const after = await client.appendBatch(
      id,
      [0, 1].map((n) => ({ event: delta(id, `a${n}`) })),
    );
    while (seen.length < 5) {
      const item = (await followed.next()).value;
      if (!(item instanceof CaughtUp) && item !== undefined) seen.push(item);
    }
    while (fed.length < 5) {
      const item = (await feed.next()).value;
      if (item instanceof FeedRecord) fed.push(item.position);
    }
    assert.deepEqual(seen, [...before, ...after]);
    assert.deepEqual(fed, [1n, 2n, 3n, 4n, 5n]);
    await followed.return(undefined);
    await feed.return(undefined);
  } finally {
    client.close();
    await served.stop();
  }
});

test("an append retried across a restart is stored once", async () => {
  const dataDir = temporaryDirectory();
  let served = await startServer({ dataDir });
  const client = new AgentlogClient(served.target, { retries: 50 });
  const id = `retry-${randomUUID().slice(0, 8)}`;
  try {
    await client.append({ sessionId: id, event: delta(id, "first") });
    await served.stop();
    const pending = client.append({ sessionId: id, event: delta(id, "during") }); // retries
    await new Promise((resolve) => setTimeout(resolve, 300));
    served = await startServer({ dataDir, port: served.port });
    const stored = await pending;
    assert.equal(stored.sequence, 2n);
    const stored_ = await client.loadSession(id);
    assert.equal(stored_.length, 2); // once, though the call was tried more than once
    assert.equal(stored_[1]?.id, stored.id);
  } finally {
    client.close();
    await served.stop();
  }
});

test("subscriptions resume across the server's connection-age GOAWAY with no gap", async () => {
  const served = await startServer({
    args: ["--max-connection-age", "1", "--max-connection-age-grace", "0.5"],
  });
  const client = new AgentlogClient(served.target, { retries: 20 });
  const id = `aged-${randomUUID().slice(0, 8)}`;
  try {
    const followed = client.subscribeSession(id, { fromSequence: 1 });
    await followed.next(); // CaughtUp: live from here
    const appended: bigint[] = [];
    const deadline = Date.now() + 3500; // several connection lifetimes
    while (Date.now() < deadline) {
      appended.push((await client.append({ sessionId: id, event: delta(id, "x") })).sequence);
      await new Promise((resolve) => setTimeout(resolve, 20));
    }
    const seen: bigint[] = [];
    while (seen.length < appended.length) {
      const item = (await followed.next()).value;
      if (item !== undefined && !(item instanceof CaughtUp)) seen.push(item.sequence);
    }
    assert.deepEqual(seen, appended);
    await followed.return(undefined);
  } finally {
    client.close();
    await served.stop();
  }
});
