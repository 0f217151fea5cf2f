/** Delete, labels and finding sessions through the TypeScript client, against the
 * JSONL store (both layouts) and PostgreSQL: the cases of the Python lifecycle contract. */

import assert from "node:assert/strict";
import { randomUUID } from "node:crypto";
import { after, before, describe, test } from "node:test";

import {
  AgentlogClient,
  AlreadyExistsError,
  CaughtUp,
  FailedPreconditionError,
  FeedRecord,
  InvalidArgumentError,
  NotFoundError,
  SessionDeleted,
  type SessionInfo,
  WrongExpectedSequence,
} from "../src/index.js";
import { delta } from "./samples.js";
import { type Served, STORES } from "./server.js";

async function listed(
  client: AgentlogClient,
  filters: Parameters<AgentlogClient["listSessions"]>[0] = {},
): Promise<SessionInfo[]> {
  const found: SessionInfo[] = [];
  let pageToken = "";
  for (;;) {
    const page = await client.listSessions({ ...filters, pageSize: 2, pageToken });
    found.push(...page.sessions);
    if (page.nextPageToken === null) return found;
    pageToken = page.nextPageToken;
  }
}

async function feedFrom(client: AgentlogClient, fromPosition: bigint): Promise<unknown[]> {
  const items: unknown[] = [];
  for await (const item of client.subscribeAll({ fromPosition })) {
    if (item instanceof CaughtUp) break;
    items.push(item);
  }
  return items;
}

for (const [name, open] of Object.entries(STORES)) {
  const branched = name !== "JSONL, seed layout";
  describe(`the session lifecycle on ${name}`, () => {
    let served: Served;
    let client: AgentlogClient;
    before(async () => {
      served = await open();
      client = new AgentlogClient(served.target, {
        retries: 0,
        protocol: served.protocol ?? "grpc",
      });
    });
    after(async () => {
      client.close();
      await served.stop();
    });

    test("a deleted branch reads as empty, leaves the feed, and is marked there", async () => {
      const sessionId = `del-${randomUUID()}`;
      const root = await client.append({
        sessionId: `keep-${randomUUID()}`,
        event: delta("k", "k"),
      });
      const gone = await client.append({
        sessionId,
        event: delta(sessionId, "x"),
        parentId: root.id,
      });
      const markers = await client.deleteSession(sessionId);
      assert.equal(markers.length, 1);
      const [marker] = markers;
      assert.ok(marker instanceof SessionDeleted);
      assert.equal(marker.lastSequence, 1n);
      assert.deepEqual(await client.loadSession(sessionId), []);
      assert.equal(await client.head(sessionId), null);
      assert.deepEqual(await client.loadChildren(root.id), []);
      assert.deepEqual(await listed(client, { sessionIdPrefix: sessionId }), []);
      const feed = await feedFrom(client, 1n);
      assert.ok(!feed.some((item) => item instanceof FeedRecord && item.record.id === gone.id));
      assert.ok(
        feed.some((item) => item instanceof SessionDeleted && item.sessionId === sessionId),
      );
    });

    test("an old retry cannot bring a deleted record back; the branch starts again at 1", async () => {
      const sessionId = `retry-${randomUUID()}`;
      const id = randomUUID();
      await client.append({ sessionId, event: delta(sessionId, "x"), id });
      await client.deleteSession(sessionId, { expectedSequence: 1 });
      await assert.rejects(
        client.append({ sessionId, event: delta(sessionId, "x"), id }),
        (error: unknown) =>
          error instanceof AlreadyExistsError && error.reason === "RECORD_ID_DELETED",
      );
      const again = await client.append({ sessionId, event: delta(sessionId, "y") });
      assert.equal(again.sequence, 1n);
    });

    test("a delete checks its expectation and that there is something to delete", async () => {
      const sessionId = `expect-${randomUUID()}`;
      await client.append({ sessionId, event: delta(sessionId, "x") });
      await assert.rejects(
        client.deleteSession(sessionId, { expectedSequence: 5 }),
        WrongExpectedSequence,
      );
      await assert.rejects(client.deleteSession(`none-${randomUUID()}`), NotFoundError);
      await assert.rejects(
        client.deleteSession(sessionId, { allBranches: true, expectedSequence: 1 }),
        InvalidArgumentError,
      );
    });

    test("a subscriber of a deleted branch ends with NotFoundError", async () => {
      const sessionId = `sub-${randomUUID()}`;
      await client.append({ sessionId, event: delta(sessionId, "x") });
      const items = client.subscribeSession(sessionId, { fromSequence: 1 });
      assert.equal((await items.next()).done, false); // the record
      assert.ok((await items.next()).value instanceof CaughtUp);
      const ended = assert.rejects(
        items.next(),
        (error: unknown) => error instanceof NotFoundError && error.reason === "BRANCH_DELETED",
      );
      await client.deleteSession(sessionId);
      await ended;
    });

    test("labels are set by the first append and changed with a version", async () => {
      const tag = randomUUID();
      const a = `lab-${tag}-a`;
      const b = `lab-${tag}-b`;
      await client.append({
        sessionId: a,
        event: delta(a, "x"),
        labels: { app: tag, user: "ana" },
      });
      await client.appendBatch(b, [{ event: delta(b, "x") }], { labels: { app: tag } });
      const changed = await client.updateSessionLabels(b, {
        set: { user: "bob" },
        expectedVersion: 1,
      });
      assert.deepEqual(changed, { labels: { app: tag, user: "bob" }, version: 2n });
      await assert.rejects(
        client.updateSessionLabels(b, { set: { user: "eve" }, expectedVersion: 1 }),
        (error: unknown) =>
          error instanceof FailedPreconditionError && error.reason === "WRONG_LABELS_VERSION",
      );
      await assert.rejects(
        client.updateSessionLabels(b, { set: { "bad key": "v" } }),
        InvalidArgumentError,
      );
      const found = await listed(client, { labels: { app: tag } });
      assert.deepEqual(
        found.map((info) => [info.sessionId, info.labels, info.labelsVersion]),
        [
          [a, { app: tag, user: "ana" }, 1n],
          [b, { app: tag, user: "bob" }, 2n],
        ],
      );
      const anas = await listed(client, { labels: { app: tag, user: "ana" } });
      assert.deepEqual(
        anas.map((info) => info.sessionId),
        [a],
      );
      const later = await listed(client, {
        sessionIdPrefix: `lab-${tag}`,
        updatedAfter: new Date(Date.now() + 60_000),
      });
      assert.deepEqual(later, []);
    });

    if (branched) {
      test("one branch is deleted and the others stay", async () => {
        const sessionId = `br-${randomUUID()}`;
        await client.append({ sessionId, event: delta(sessionId, "m") });
        await client.append({ sessionId, event: delta(sessionId, "a"), branchId: "alt" });
        const [marker] = await client.deleteSession(sessionId, { branchId: "alt" });
        assert.equal(marker?.branchId, "alt");
        const [info] = await listed(client, { sessionIdPrefix: sessionId });
        assert.deepEqual(
          info?.branches.map((b) => b.branchId),
          ["main"],
        );
      });
    }
  });
}
