/** Branches and fork through the TypeScript client, against a JSONL store in the
 * branch layout and against PostgreSQL: the same cases as the Python contract. */

import assert from "node:assert/strict";
import { randomUUID } from "node:crypto";
import { after, before, describe, test } from "node:test";

import {
  AgentlogClient,
  AlreadyExistsError,
  CaughtUp,
  type EventRecord,
  FeedRecord,
  InvalidArgumentError,
  NotFoundError,
  WrongExpectedSequence,
} from "../src/index.js";
import { delta } from "./samples.js";
import { type Served, STORES } from "./server.js";

async function take<T>(items: AsyncIterator<T>, count: number): Promise<T[]> {
  const taken: T[] = [];
  while (taken.length < count) {
    const next = await items.next();
    if (next.done) break;
    taken.push(next.value);
  }
  return taken;
}

async function chain(
  client: AgentlogClient,
  sessionId: string,
  count: number,
  branchId = "main",
): Promise<EventRecord[]> {
  const records: EventRecord[] = [];
  for (let i = 0; i < count; i++) {
    records.push(
      await client.append({
        sessionId,
        event: delta(sessionId, `${branchId}-${i}`),
        parentId: records.at(-1)?.id ?? null,
        branchId,
      }),
    );
  }
  return records;
}

for (const name of ["JSONL, branch layout", "PostgreSQL"] as const) {
  const open = STORES[name];
  describe(`branches and forks on ${name}`, () => {
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

    function session(prefix: string): string {
      return `${prefix}-${randomUUID().slice(0, 8)}`;
    }

    test("a writer keeps each branch's sequences and expectations", async () => {
      const id = session("writer");
      await client.append({ sessionId: id, event: delta(id, "start") });
      const writer = client.writer();
      const pending: Promise<EventRecord>[] = [];
      for (let n = 0; n < 20; n++) {
        for (const branchId of ["main", "alt"]) {
          pending.push(
            writer.append({
              sessionId: id,
              event: delta(id, `${branchId} ${n}`),
              branchId,
              expectedSequence: n + (branchId === "main" ? 1 : 0),
            }),
          );
        }
      }
      await writer.close();
      const records = await Promise.all(pending);
      const alt = records.filter((r) => r.branchId === "alt");
      assert.deepEqual(
        alt.map((r) => Number(r.sequence)),
        Array.from({ length: 20 }, (_, n) => n + 1),
      );
      assert.deepEqual(await client.loadSession(id, { branchId: "alt" }), alt);
      assert.equal((await client.loadSession(id)).length, 21);
    });

    test("each branch has its own sequences, expectations, heads and reads", async () => {
      const id = session("b");
      const main = await chain(client, id, 3);
      const alt = await chain(client, id, 2, "alt");
      assert.deepEqual(
        alt.map((r) => [r.branchId, r.sequence]),
        [
          ["alt", 1n],
          ["alt", 2n],
        ],
      );
      assert.equal(main[0]?.branchId, "main");
      assert.deepEqual(await client.loadSession(id, { branchId: "alt" }), alt);
      assert.deepEqual(
        (await client.loadSession(id)).map((r) => r.id),
        main.map((r) => r.id),
      );
      assert.equal((await client.head(id, "alt"))?.id, alt[1]?.id);
      assert.equal((await client.head(id))?.id, main[2]?.id);
      assert.equal(await client.head(id, "nowhere"), null);
      const batch = await client.appendBatch(id, [{ event: delta(id, "x") }], {
        branchId: "alt",
        expectedSequence: 2,
      });
      assert.equal(batch[0]?.sequence, 3n);
      await assert.rejects(
        client.append({
          sessionId: id,
          event: delta(id, "y"),
          branchId: "alt",
          expectedSequence: 2,
        }),
        (error: unknown) =>
          error instanceof WrongExpectedSequence && error.metadata.branch_id === "alt",
      );
      await assert.rejects(
        client.append({ sessionId: id, event: delta(id, "z"), branchId: "a__b" }),
        (error: unknown) =>
          error instanceof InvalidArgumentError && error.reason === "INVALID_BRANCH_ID",
      );
    });

    test("a retry naming another branch is refused", async () => {
      const id = session("r");
      const recordId = randomUUID();
      const stored = await client.append({
        sessionId: id,
        event: delta(id, "once"),
        id: recordId,
        branchId: "x",
      });
      const again = await client.append({
        sessionId: id,
        event: delta(id, "once"),
        id: recordId,
        branchId: "x",
      });
      assert.deepEqual(again, stored);
      await assert.rejects(
        client.append({ sessionId: id, event: delta(id, "once"), id: recordId, branchId: "y" }),
        (error: unknown) => error instanceof AlreadyExistsError && error.metadata.branch_id === "x",
      );
    });

    test("a subscription follows one branch, and the feed filters by branch", async () => {
      const id = session("s");
      await chain(client, id, 1, "alt");
      const items = client.subscribeSession(id, { fromSequence: 1, branchId: "alt" });
      const first = await take(items, 2);
      assert.ok(first[1] instanceof CaughtUp);
      await chain(client, id, 1);
      await client.append({ sessionId: id, event: delta(id, "live"), branchId: "alt" });
      const [live] = await take(items, 1);
      await items.return(undefined);
      assert.equal((live as EventRecord).branchId, "alt");
      assert.equal((live as EventRecord).sequence, 2n);
      const feed = client.subscribeAll({ fromPosition: 1, sessionIdPrefix: id, branchId: "alt" });
      const got = await take(feed, 3);
      await feed.return(undefined);
      const records = got.filter((item): item is FeedRecord => item instanceof FeedRecord);
      assert.deepEqual(
        records.map((f) => [f.record.branchId, f.record.sequence]),
        [
          ["alt", 1n],
          ["alt", 2n],
        ],
      );
    });

    test("a fork copies records with new ids, re-pointed parents and forkedFrom", async () => {
      const id = session("f");
      const other = session("o");
      const outside = await client.append({ sessionId: other, event: delta(other, "o") });
      const source = await chain(client, id, 2);
      source.push(
        await client.append({ sessionId: id, event: delta(id, "x"), parentId: outside.id }),
      );
      source.push(...(await chain(client, id, 1)));
      const made = await client.forkSession(id, 3, { newBranchId: "retry" });
      assert.deepEqual(made.forkedFrom, { sessionId: id, branchId: "main", sequence: 3n });
      assert.equal(made.eventCount, 3n);
      const copies = await client.loadSession(id, { branchId: "retry" });
      assert.equal(copies.length, 3);
      copies.forEach((copy, k) => {
        assert.notEqual(copy.id, source[k]?.id);
        assert.deepEqual(copy.event, source[k]?.event);
        assert.equal(copy.timestampNs, source[k]?.timestampNs);
      });
      assert.equal(copies[1]?.parentId, copies[0]?.id);
      assert.equal(copies[2]?.parentId, outside.id);
      const page = await client.listSessions({ pageSize: 1000 });
      const info = page.sessions.find((s) => s.sessionId === id);
      assert.deepEqual(
        info?.branches.map((b) => [b.branchId, b.forkedFrom?.sequence ?? null]),
        [
          ["main", null],
          ["retry", 3n],
        ],
      );
      const elsewhere = session("n");
      const moved = await client.forkSession(id, 2, { newSessionId: elsewhere });
      assert.equal(moved.branchId, "main");
      assert.equal((await client.loadSession(elsewhere)).length, 2);
    });

    test("a fork is refused with a status that says why", async () => {
      const id = session("x");
      await chain(client, id, 2);
      await assert.rejects(
        client.forkSession(id, 5, { newBranchId: "f" }),
        (error: unknown) =>
          error instanceof NotFoundError && error.reason === "FORK_SOURCE_NOT_FOUND",
      );
      await assert.rejects(
        client.forkSession(id, 1, { newBranchId: "f", expectedSequence: 1 }),
        (error: unknown) => error instanceof WrongExpectedSequence,
      );
      await chain(client, id, 1, "taken");
      await assert.rejects(
        client.forkSession(id, 1, { newBranchId: "taken" }),
        (error: unknown) => error instanceof AlreadyExistsError && error.reason === "BRANCH_EXISTS",
      );
      await assert.rejects(
        client.forkSession(id, 1),
        (error: unknown) => error instanceof InvalidArgumentError,
      );
    });
  });
}
