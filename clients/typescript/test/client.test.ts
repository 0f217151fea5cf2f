/** The client against a real server: every RPC, expectations, retries, batches,
 * ranges, children, paging, subscriptions, the feed with filters, errors. */

import assert from "node:assert/strict";
import { randomUUID } from "node:crypto";
import { appendFileSync } from "node:fs";
import { join } from "node:path";
import { after, before, describe, test } from "node:test";

import {
  AbortedError,
  AgentlogClient,
  AlreadyExistsError,
  type ClientOptions,
  CaughtUp,
  Checkpoint,
  DataLossError,
  DeadlineExceededError,
  type EventRecord,
  FeedRecord,
  InvalidArgumentError,
  type ReadOptions,
  LosslessNumber,
  ResourceExhaustedError,
  UnavailableError,
  WrongExpectedSequence,
} from "../src/index.js";
import { delta, everyEvent } from "./samples.js";
import { type Protocol, PROTOCOLS, type Served, startServer } from "./server.js";

let served: Served;
let client: AgentlogClient;
// The transport of the suite running: each runs it over gRPC, and over HTTP with
// the Connect protocol and with gRPC-Web (`--http-addr`).
let protocol: Protocol;

/** A client of the server under test, over the suite's transport. */
function connect(options: ClientOptions = {}): AgentlogClient {
  const target = protocol === "grpc" ? served.target : served.httpTarget;
  return new AgentlogClient(target, { retries: 0, ...options, protocol });
}

function session(name: string): string {
  return `${name}-${randomUUID().slice(0, 8)}`;
}

async function take<T>(items: AsyncIterator<T>, count: number): Promise<T[]> {
  const taken: T[] = [];
  while (taken.length < count) {
    const next = await items.next();
    if (next.done) break;
    taken.push(next.value);
  }
  return taken;
}

for (const each of PROTOCOLS) {
  describe(`over ${each}`, () => {
    before(async () => {
      protocol = each;
      served = await startServer({ http: true });
      client = connect();
    });

    after(async () => {
      client.close();
      await served.stop();
    });

    describe("append and read back", () => {
      test("an append is stored with the next sequence, a client-made id and a timestamp", async () => {
        const id = session("a");
        const first = await client.append({ sessionId: id, event: delta(id, "one") });
        const second = await client.append({ sessionId: id, event: delta(id, "two") });
        assert.equal(first.sequence, 1n);
        assert.equal(second.sequence, 2n);
        assert.match(
          first.id,
          /^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$/,
        );
        assert.equal(first.parentId, null);
        assert.ok(Math.abs(first.timestamp.getTime() - Date.now()) < 60_000);
        assert.equal(first.timestampNs / 1_000_000n, BigInt(first.timestamp.getTime()));
        assert.equal(Number(first.timestampNs % 1_000_000_000n), first.nanos);
        assert.deepEqual(first.event, delta(id, "one"));
      });

      test("every kind of event, hostile JSON included, comes back equal", async () => {
        const id = session("every");
        const events = everyEvent(id);
        for (const event of events) await client.append({ sessionId: id, event });
        const loaded = await client.loadSession(id);
        assert.deepEqual(
          loaded.map((r) => r.event),
          events,
        );
      });

      test("head is the latest record, and null for a session without events", async () => {
        const id = session("head");
        assert.equal(await client.head(id), null);
        await client.append({ sessionId: id, event: delta(id, "x") });
        const last = await client.append({ sessionId: id, event: delta(id, "y") });
        assert.deepEqual(await client.head(id), last);
      });

      test("a record read back equals the record the append answered", async () => {
        const id = session("same");
        const appended = await client.append({ sessionId: id, event: delta(id, "x") });
        assert.deepEqual(await client.loadSession(id), [appended]);
      });

      test("a parent may be in another session, and loadChildren finds its children", async () => {
        const parentSession = session("parent");
        const childSession = session("child");
        const root = await client.append({
          sessionId: parentSession,
          event: delta(parentSession, "root"),
        });
        const near = await client.append({
          sessionId: parentSession,
          event: delta(parentSession, "a"),
          parentId: root.id,
        });
        const far = await client.append({
          sessionId: childSession,
          event: delta(childSession, "b"),
          parentId: root.id,
        });
        assert.equal(near.parentId, root.id);
        const children = await client.loadChildren(root.id);
        assert.deepEqual(new Set(children.map((r) => r.id)), new Set([near.id, far.id]));
        assert.deepEqual(await client.loadChildren(randomUUID()), []);
      });
    });

    describe("concurrency", () => {
      test("64 appends in flight on one client get gapless, distinct sequences", async () => {
        const id = session("many");
        const records = await Promise.all(
          Array.from({ length: 64 }, (_, n) =>
            client.append({ sessionId: id, event: delta(id, `${n}`) }),
          ),
        );
        const sequences = records.map((r) => r.sequence).sort((a, b) => (a < b ? -1 : 1));
        assert.deepEqual(
          sequences,
          Array.from({ length: 64 }, (_, n) => BigInt(n + 1)),
        );
        const stored = await client.loadSession(id);
        assert.deepEqual(
          stored.map((r) => r.id),
          [...records].sort((a, b) => (a.sequence < b.sequence ? -1 : 1)).map((r) => r.id),
        );
      });

      test("expectations let exactly one of several racing writers win", async () => {
        const id = session("race");
        const attempts = await Promise.allSettled(
          Array.from({ length: 8 }, (_, n) =>
            client.append({ sessionId: id, event: delta(id, `${n}`), expectedSequence: 0 }),
          ),
        );
        assert.equal(attempts.filter((a) => a.status === "fulfilled").length, 1);
        for (const attempt of attempts) {
          if (attempt.status === "rejected") {
            assert.ok(attempt.reason instanceof WrongExpectedSequence);
            assert.equal(attempt.reason.actualSequence, 1n);
          }
        }
      });
    });

    describe("ids and retries", () => {
      test("an append retried with the same id and content answers the stored record", async () => {
        const id = session("retry");
        const recordId = randomUUID();
        const first = await client.append({ sessionId: id, event: delta(id, "x"), id: recordId });
        const again = await client.append({ sessionId: id, event: delta(id, "x"), id: recordId });
        assert.deepEqual(again, first);
        assert.equal((await client.loadSession(id)).length, 1);
      });

      test("the same id with other content is ALREADY_EXISTS", async () => {
        const id = session("dup");
        const recordId = randomUUID();
        await client.append({ sessionId: id, event: delta(id, "x"), id: recordId });
        await assert.rejects(
          client.append({ sessionId: id, event: delta(id, "other"), id: recordId }),
          AlreadyExistsError,
        );
      });

      test("an id that is not a canonical UUID is refused before sending", async () => {
        const id = session("badid");
        await assert.rejects(
          client.append({ sessionId: id, event: delta(id, "x"), id: "ABC" }),
          (error: unknown) =>
            error instanceof InvalidArgumentError && error.reason === "INVALID_ID",
        );
      });

      test("a batch retried with the same ids is stored once", async () => {
        const id = session("batch-retry");
        const events = [0, 1, 2].map((n) => ({ event: delta(id, `${n}`), id: randomUUID() }));
        const first = await client.appendBatch(id, events);
        const again = await client.appendBatch(id, events);
        assert.deepEqual(again, first);
        assert.equal((await client.loadSession(id)).length, 3);
      });
    });

    describe("writer", () => {
      test("a writer stores events in the order appended and answers each with its record", async () => {
        const one = session("w1");
        const two = session("w2");
        const writer = client.writer();
        const pending: Promise<EventRecord>[] = [];
        for (let n = 0; n < 300; n++) {
          for (const id of n % 3 ? [one] : [one, two]) {
            pending.push(writer.append({ sessionId: id, event: delta(id, `t${n}`) }));
          }
        }
        await writer.close();
        const records = await Promise.all(pending);
        const sequences = (id: string) =>
          records.filter((r) => r.sessionId === id).map((r) => Number(r.sequence));
        assert.deepEqual(sequences(one), range(1, 300));
        assert.deepEqual(sequences(two), range(1, 100));
        assert.deepEqual(
          await client.loadSession(one),
          records.filter((r) => r.sessionId === one),
        );
      });

      test("every kind of event written comes back equal", async () => {
        const id = session("wk");
        const writer = client.writer();
        const pending = everyEvent(id).map((event) => writer.append({ sessionId: id, event }));
        await writer.close();
        assert.deepEqual(await client.loadSession(id), await Promise.all(pending));
      });

      test("a refused append rejects alone; those behind it are aborted and not stored", async () => {
        const id = session("wr");
        const other = session("wo");
        const writer = client.writer();
        const before = [0, 1, 2].map((n) =>
          writer.append({ sessionId: id, event: delta(id, `${n}`) }),
        );
        const refused = writer.append({
          sessionId: id,
          event: delta(id, "late"),
          expectedSequence: 1,
        });
        const behind = writer.append({ sessionId: other, event: delta(other, "behind") });
        await assert.rejects(writer.close(), WrongExpectedSequence);
        assert.deepEqual(
          (await Promise.all(before)).map((r) => r.sequence),
          [1n, 2n, 3n],
        );
        await assert.rejects(refused, (error: WrongExpectedSequence) => {
          assert.equal(error.metadata.stream_index, "3");
          return true;
        });
        await assert.rejects(behind, (error: AbortedError) => {
          assert.ok(error instanceof AbortedError);
          assert.equal(error.reason, "EARLIER_APPEND_REFUSED");
          return true;
        });
        assert.equal((await client.loadSession(id)).length, 3);
        assert.deepEqual(await client.loadSession(other), []);
        assert.throws(
          () => writer.append({ sessionId: other, event: delta(other, "after") }),
          AbortedError,
        );
      });

      test("a resent id is answered with the stored record; other content is ALREADY_EXISTS", async () => {
        const id = session("wi");
        const ids: string[] = [randomUUID(), randomUUID(), randomUUID()];
        const [firstId = "", secondId = ""] = ids;
        const stored = await client.append({ sessionId: id, event: delta(id, "0"), id: firstId });
        const writer = client.writer();
        const pending = ids.map((each, n) =>
          writer.append({ sessionId: id, event: delta(id, `${n}`), id: each }),
        );
        await writer.close();
        const records = await Promise.all(pending);
        assert.deepEqual(records[0], stored);
        assert.deepEqual(
          records.map((r) => r.sequence),
          [1n, 2n, 3n],
        );
        const again = client.writer();
        const conflicting = again.append({
          sessionId: id,
          event: delta(id, "other"),
          id: secondId,
        });
        await assert.rejects(again.close(), AlreadyExistsError);
        await assert.rejects(conflicting, AlreadyExistsError);
      });

      test("a malformed event throws at append and the writer goes on", async () => {
        const id = session("wm");
        const writer = client.writer();
        const first = writer.append({ sessionId: id, event: delta(id, "a") });
        assert.throws(
          () => writer.append({ sessionId: id, event: delta(id, "b"), id: "x" }),
          InvalidArgumentError,
        );
        const last = writer.append({ sessionId: id, event: delta(id, "c") });
        await writer.close();
        assert.deepEqual([(await first).sequence, (await last).sequence], [1n, 2n]);
        assert.throws(
          () => writer.append({ sessionId: id, event: delta(id, "d") }),
          InvalidArgumentError,
        );
      });

      test("room() holds a fast writer to its window, and everything is stored", async () => {
        const id = session("ww");
        const writer = client.writer({ window: 3 });
        const pending: Promise<EventRecord>[] = [];
        for (let n = 0; n < 40; n++) {
          await writer.room();
          assert.ok(writer.pending < 3);
          pending.push(writer.append({ sessionId: id, event: delta(id, `${n}`) }));
        }
        await writer.flush();
        assert.equal(writer.pending, 0);
        await writer.close();
        assert.equal((await Promise.all(pending)).length, 40);
        assert.equal((await client.loadSession(id)).length, 40);
      });
    });

    describe("expectations", () => {
      test("expecting 0 creates a session once; a second such append is refused", async () => {
        const id = session("exp");
        await client.append({ sessionId: id, event: delta(id, "x"), expectedSequence: 0 });
        const refused = await client
          .append({ sessionId: id, event: delta(id, "y"), expectedSequence: 0n })
          .catch((error: unknown) => error);
        assert.ok(refused instanceof WrongExpectedSequence);
        assert.equal(refused.status, "FAILED_PRECONDITION");
        assert.equal(refused.expectedSequence, 0n);
        assert.equal(refused.actualSequence, 1n);
      });

      test("an expectation that holds appends; a stale one writes nothing", async () => {
        const id = session("exp2");
        await client.appendBatch(id, [{ event: delta(id, "a") }, { event: delta(id, "b") }]);
        await client.append({ sessionId: id, event: delta(id, "c"), expectedSequence: 2n });
        await assert.rejects(
          client.appendBatch(id, [{ event: delta(id, "d") }], { expectedSequence: 2n }),
          (error: unknown) => error instanceof WrongExpectedSequence && error.actualSequence === 3n,
        );
        assert.equal((await client.loadSession(id)).length, 3);
      });
    });

    describe("batches", () => {
      test("a batch takes consecutive sequences, in order", async () => {
        const id = session("batch");
        await client.append({ sessionId: id, event: delta(id, "first") });
        const records = await client.appendBatch(
          id,
          ["a", "b", "c"].map((text) => ({ event: delta(id, text) })),
        );
        assert.deepEqual(
          records.map((r) => r.sequence),
          [2n, 3n, 4n],
        );
        assert.deepEqual(
          records.map((r) => (r.event as { delta: string }).delta),
          ["a", "b", "c"],
        );
      });

      test("a batch with one bad event stores none of them", async () => {
        const id = session("atomic");
        const good = { event: delta(id, "ok") };
        const bad = { event: { ...delta(id, "bad"), session_id: "x" } };
        const repeated = randomUUID();
        await assert.rejects(
          client.appendBatch(id, [good, { ...bad, id: repeated }, { ...good, id: repeated }]),
          InvalidArgumentError,
        );
        assert.deepEqual(await client.loadSession(id), []);
      });

      test("an empty batch is INVALID_ARGUMENT", async () => {
        await assert.rejects(client.appendBatch(session("empty"), []), InvalidArgumentError);
      });
    });

    describe("ranged reads", () => {
      let id: string;
      let all: EventRecord[];

      before(async () => {
        id = session("range");
        all = await client.appendBatch(
          id,
          Array.from({ length: 10 }, (_, n) => ({ event: delta(id, `${n}`) })),
        );
      });

      test("forwards from a sequence with a limit", async () => {
        const got = await client.loadSession(id, { fromSequence: 4, limit: 3 });
        assert.deepEqual(
          got.map((r) => r.sequence),
          [4n, 5n, 6n],
        );
      });

      test("backwards from the end and from a sequence", async () => {
        const last = await client.loadSession(id, { direction: "backwards", limit: 2 });
        assert.deepEqual(
          last.map((r) => r.sequence),
          [10n, 9n],
        );
        const from = await client.loadSession(id, { direction: "backwards", fromSequence: 3n });
        assert.deepEqual(
          from.map((r) => r.sequence),
          [3n, 2n, 1n],
        );
      });

      test("past the end is empty; the whole session by default", async () => {
        assert.deepEqual(await client.loadSession(id, { fromSequence: 11 }), []);
        assert.deepEqual(await client.loadSession(id), all);
      });

      test("readSession streams, and stopping early is fine", async () => {
        const seen: bigint[] = [];
        for await (const record of client.readSession(id)) {
          seen.push(record.sequence);
          if (seen.length === 3) break;
        }
        assert.deepEqual(seen, [1n, 2n, 3n]);
      });

      test("a zero limit or an unknown direction is refused before sending", async () => {
        await assert.rejects(client.loadSession(id, { limit: 0 }), InvalidArgumentError);
        const sideways = { direction: "sideways" } as unknown as ReadOptions;
        await assert.rejects(client.loadSession(id, sideways), /direction must be/);
      });
    });

    describe("listing sessions", () => {
      test("pages go through every session in byte order", async () => {
        const prefix = `list-${randomUUID().slice(0, 8)}`;
        const names = ["b", "a", "c", "é", "Z"].map((s) => `${prefix}-${s}`);
        for (const name of names) await client.append({ sessionId: name, event: delta(name, "x") });
        const seen: string[] = [];
        let token: string | null = null;
        do {
          const page: Awaited<ReturnType<typeof client.listSessions>> = await client.listSessions({
            pageSize: 2,
            ...(token !== null && { pageToken: token }),
          });
          assert.ok(page.sessions.length <= 2);
          seen.push(...page.sessions.map((s) => s.sessionId));
          token = page.nextPageToken;
        } while (token !== null);
        const ours = seen.filter((s) => s.startsWith(prefix));
        const sorted = [...names].sort((a, b) => Buffer.compare(Buffer.from(a), Buffer.from(b)));
        assert.deepEqual(ours, sorted);
        const info = (await client.listSessions({ pageSize: 1000 })).sessions.find(
          (s) => s.sessionId === names[0],
        );
        assert.equal(info?.eventCount, 1n);
        assert.ok(info !== undefined && info.headId.length === 36);
      });

      test("a page size past 1000 is refused; a bad token is INVALID_ARGUMENT", async () => {
        await assert.rejects(client.listSessions({ pageSize: 1001 }), InvalidArgumentError);
        await assert.rejects(client.listSessions({ pageToken: "forged" }), InvalidArgumentError);
      });
    });

    describe("subscriptions", () => {
      test("a session subscription delivers stored records, CaughtUp, then live ones", async () => {
        const id = session("sub");
        await client.appendBatch(id, [{ event: delta(id, "a") }, { event: delta(id, "b") }]);
        const items = client.subscribeSession(id, { fromSequence: 1 });
        const start = await take(items, 3);
        assert.deepEqual(
          start.map((i) => (i instanceof CaughtUp ? `caught up ${i.sequence}` : i.sequence)),
          [1n, 2n, "caught up 2"],
        );
        const live = await client.append({ sessionId: id, event: delta(id, "c") });
        assert.deepEqual(await take(items, 1), [live]);
        await items.return(undefined);
      });

      test("without fromSequence only new records come", async () => {
        const id = session("new-only");
        await client.append({ sessionId: id, event: delta(id, "old") });
        const items = client.subscribeSession(id);
        const [marker] = await take(items, 1);
        assert.ok(marker instanceof CaughtUp);
        const live = await client.append({ sessionId: id, event: delta(id, "new") });
        assert.deepEqual(await take(items, 1), [live]);
        await items.return(undefined);
      });

      test("an abort signal ends a subscription", async () => {
        const id = session("abort");
        const controller = new AbortController();
        const items = client.subscribeSession(id, { fromSequence: 1, signal: controller.signal });
        await take(items, 1); // CaughtUp
        setTimeout(() => controller.abort(), 50);
        assert.deepEqual(await take(items, 1), []);
      });

      test("the feed gives positions in commit order, and its filters hold", async () => {
        const prefix = `feed-${randomUUID().slice(0, 8)}`;
        const [mine, other] = [`${prefix}-mine`, `${prefix}-other`];
        const finished = everyEvent(mine).filter((e) => e.part_type === "run_finished");
        const all = client.subscribeAll({ fromPosition: 1 });
        const filtered = client.subscribeAll({
          sessionIdPrefix: `${prefix}-mine`,
          partTypes: ["run_finished"],
        });
        await take(filtered, 1); // CaughtUp: live from here
        await client.append({ sessionId: other, event: everyEvent(other).at(-1)! });
        await client.append({ sessionId: mine, event: delta(mine, "skipped") });
        const kept = await client.append({ sessionId: mine, event: finished[0]! });
        const items = [];
        for await (const item of filtered) {
          items.push(item);
          if (item instanceof FeedRecord) break; // the only record that passes
        }
        const records = items.filter((i): i is FeedRecord => i instanceof FeedRecord);
        assert.deepEqual(
          records.map((r) => r.record),
          [kept],
        );
        // What the filters dropped may be announced as a Checkpoint (never as CaughtUp, which
        // came once, before).
        assert.ok(items.slice(0, -1).every((i) => i instanceof Checkpoint));
        // The unfiltered feed: gapless positions from 1.
        const positions: bigint[] = [];
        for await (const item of all) {
          if (item instanceof FeedRecord) positions.push(item.position);
          if (item instanceof FeedRecord && item.record.id === kept.id) break;
        }
        assert.deepEqual(
          positions,
          positions.map((_, n) => BigInt(n + 1)),
        );
      });
    });

    describe("a filtered feed over many records", () => {
      test("matches past the first runs come before the one CaughtUp; skipped runs as Checkpoints", async () => {
        const start = (await take(client.subscribeAll(), 1))[0];
        assert.ok(start instanceof CaughtUp);
        const prefix = session("many");
        const [noise, mine] = [`${prefix}-noise`, `${prefix}-mine`];
        const finished = everyEvent(mine).filter((e) => e.part_type === "run_finished")[0]!;
        const wanted: EventRecord[] = [];
        for (let block = 0; block < 11; block++) {
          await client.appendBatch(
            noise,
            Array.from({ length: 100 }, (_, i) => ({ event: delta(noise, String(i)) })),
          );
          if (block === 3 || block === 7 || block === 10) {
            wanted.push(await client.append({ sessionId: mine, event: finished }));
          }
        }
        const items = [];
        for await (const item of client.subscribeAll({
          fromPosition: start.position + 1n,
          sessionIdPrefix: prefix,
          partTypes: ["run_finished"],
        })) {
          items.push(item);
          if (item instanceof CaughtUp) break;
        }
        const records = items.filter((i): i is FeedRecord => i instanceof FeedRecord);
        assert.deepEqual(
          records.map((r) => r.record.id),
          wanted.map((r) => r.id),
        );
        assert.equal(items.filter((i) => i instanceof CaughtUp).length, 1);
        const checkpoints = items.filter((i): i is Checkpoint => i instanceof Checkpoint);
        assert.ok(checkpoints.length > 0);
        assert.ok((items.at(-1) as CaughtUp).position >= start.position + 1103n);
      });
    });

    describe("errors", () => {
      test("a bad session id is INVALID_ARGUMENT naming the field", async () => {
        const refused = await client
          .append({ sessionId: "../escape", event: delta("x", "x") })
          .catch((error: unknown) => error);
        assert.ok(refused instanceof InvalidArgumentError);
        assert.equal(refused.status, "INVALID_ARGUMENT");
        assert.equal(refused.field, "session_id");
        assert.match(refused.message, /session/);
      });

      test("a JSON integer past the 64-bit range is INVALID_ARGUMENT from the server", async () => {
        const id = session("too-big");
        const event = {
          part_type: "tool_call_requested" as const,
          run_id: "r",
          session_id: id,
          iteration: 1,
          call: {
            call_id: "c",
            tool_name: "t",
            input: { n: new LosslessNumber("18446744073709551616") },
          },
        };
        const refused = await client
          .append({ sessionId: id, event })
          .catch((error: unknown) => error);
        assert.ok(refused instanceof InvalidArgumentError);
        assert.match(refused.message, /64-bit|range/);
        assert.equal(await client.head(id), null);
      });

      test("a damaged session file is DATA_LOSS, and other sessions are unharmed", async () => {
        const id = session("damaged");
        await client.append({ sessionId: id, event: delta(id, "x") });
        appendFileSync(join(served.dataDir, `${id}.jsonl`), "{not json\n");
        await assert.rejects(client.loadSession(id), DataLossError);
        const other = session("fine");
        await client.append({ sessionId: other, event: delta(other, "x") });
        assert.equal((await client.loadSession(other)).length, 1);
      });

      test("a deadline that passes is DEADLINE_EXCEEDED", async () => {
        const id = session("slow");
        await client.appendBatch(
          id,
          Array.from({ length: 2000 }, () => ({ event: delta(id, "x".repeat(200)) })),
        );
        const hasty = connect({ timeoutMs: 1 });
        try {
          await assert.rejects(hasty.loadSession(id), DeadlineExceededError);
        } finally {
          hasty.close();
        }
      });

      test("a request past the server's size limit is RESOURCE_EXHAUSTED and stores nothing", async () => {
        const id = session("huge");
        const refused = await client
          .append({ sessionId: id, event: delta(id, "x".repeat(5 * 1024 * 1024)) })
          .catch((error: unknown) => error);
        assert.ok(refused instanceof ResourceExhaustedError, String(refused));
        assert.equal(refused.status, "RESOURCE_EXHAUSTED");
        assert.equal(await client.head(id), null);
      });

      test("no server is UNAVAILABLE after the retries", async () => {
        const nowhere = new AgentlogClient("127.0.0.1:1", { retries: 1, protocol });
        try {
          await assert.rejects(nowhere.head("x"), UnavailableError);
        } finally {
          nowhere.close();
        }
      });
    });
  });
}

function range(first: number, last: number): number[] {
  return Array.from({ length: last - first + 1 }, (_, index) => first + index);
}
