/**
 * The agentlog client for Node.js: every SessionRepository call, with client-made
 * ids and retries for appends, typed errors, and subscriptions that resume where
 * they stood after UNAVAILABLE. Speaks gRPC over HTTP/2 (Connect's Node transport).
 */

import { create } from "@bufbuild/protobuf";
import { timestampFromDate } from "@bufbuild/protobuf/wkt";
import {
  type CallOptions,
  type Client,
  Code,
  ConnectError,
  createClient,
  type Interceptor,
  type Transport,
} from "@connectrpc/connect";
import {
  createConnectTransport,
  createGrpcTransport,
  createGrpcWebTransport,
  Http2SessionManager,
} from "@connectrpc/connect-node";

import {
  type AppendInput,
  appendRequest,
  backoffMs,
  branch,
  checkId,
  type NewEvent,
  sleep,
} from "./appends.js";
import { type AgentEvent, eventFromMessage, eventToMessage, toU64 } from "./events.js";
import { AgentlogError, InvalidArgumentError, toAgentlogError } from "./errors.js";
import {
  AppendBatchRequestSchema,
  BatchEventSchema,
  DeleteSessionRequestSchema,
  ForkSessionRequestSchema,
  ListSessionsRequestSchema,
  ReadDirection,
  SessionRepository,
  type AppendStreamRequest,
  type SubscribeAllResponse,
  type SubscribeSessionResponse,
  UpdateSessionLabelsRequestSchema,
} from "./gen/agentlog/v1/session_pb.js";
import {
  type BranchInfo,
  branchFromMessage,
  CaughtUp,
  Checkpoint,
  type EventRecord,
  FeedGap,
  FeedRecord,
  deletedFromMessage,
  recordFromMessage,
  SessionDeleted,
  type SessionLabels,
  type SessionPage,
  sessionFromMessage,
} from "./records.js";
import { AppendWriter, DEFAULT_WINDOW, unaryStream } from "./writer.js";

export type { AppendInput, NewEvent } from "./appends.js";

export const DEFAULT_TARGET = "127.0.0.1:50051";
const DEFAULT_TIMEOUT_MS = 30_000;
const DEFAULT_RETRIES = 3;
const RETRYABLE = new Set(["UNAVAILABLE", "DEADLINE_EXCEEDED"]);

/** TLS settings: PEM text or bytes (read the files yourself, e.g. with readFileSync). */
export interface TlsOptions {
  /** The CA that signed the server's certificate (default: the system's CAs). */
  ca?: string | Buffer;
  /** A client certificate and its key, for servers that require mTLS. */
  cert?: string | Buffer;
  key?: string | Buffer;
  /** The name to check the server's certificate against, when not the target's host. */
  serverName?: string;
}

export interface ClientOptions {
  /** Each call's deadline in milliseconds (null: none). Subscriptions have none. */
  timeoutMs?: number | null;
  /** Retries after UNAVAILABLE or DEADLINE_EXCEEDED (appends keep their ids, so a
   * retry never stores an event twice); a subscription's reconnects in a row. */
  retries?: number;
  /** Speak TLS (true: with the system's CAs). */
  tls?: TlsOptions | boolean;
  /** Sent as `authorization: Bearer <token>`; a function is asked on every call. */
  token?: string | (() => string | Promise<string>);
  /** How calls travel: "grpc" (default: HTTP/2 to the server's --addr), or "connect" or
   * "grpc-web" (HTTP/1.1 to its --http-addr, through proxies that only pass HTTP/1.1). */
  protocol?: "grpc" | "connect" | "grpc-web";
}

export interface ReadOptions {
  /** The first sequence (0: the first record forwards, the last backwards). */
  fromSequence?: bigint | number;
  /** The most records (absent: all). */
  limit?: bigint | number;
  direction?: "forwards" | "backwards";
  /** The branch to read (default "main"). */
  branchId?: string;
}

export interface ForkOptions {
  /** The source branch (default "main"). */
  branchId?: string;
  /** Fork only if the source branch's last sequence is this. */
  expectedSequence?: bigint | number;
  /** The new branch; required within the same session ("main" in a new one). */
  newBranchId?: string;
  /** Make the new branch in this new session (default: the source session). */
  newSessionId?: string;
}

export interface ListOptions {
  pageSize?: number;
  pageToken?: string;
  /** Only sessions carrying every one of these labels. */
  labels?: Record<string, string>;
  /** Only sessions whose id starts with this. */
  sessionIdPrefix?: string;
  /** Only sessions last appended to at or after this time. */
  updatedAfter?: Date;
  /** Only sessions last appended to before this time. */
  updatedBefore?: Date;
}

export interface DeleteOptions {
  /** The branch to delete (default "main"). */
  branchId?: string;
  /** Delete every branch of the session, and its labels. */
  allBranches?: boolean;
  /** Delete only if the branch's last sequence is this. */
  expectedSequence?: bigint | number;
}

export interface SubscribeOptions {
  /** Ends the subscription (the iterator returns). Breaking out of the loop does too. */
  signal?: AbortSignal;
}

export interface SubscribeAllOptions extends SubscribeOptions {
  /** The first position to deliver (1n: the beginning); absent: only new records. */
  fromPosition?: bigint | number;
  /** Only sessions whose id starts with this. */
  sessionIdPrefix?: string;
  /** Only events of these kinds, e.g. ["run_finished"]. */
  partTypes?: AgentEvent["part_type"][];
  /** Only records of branches with this id (of any session); absent: every branch. */
  branchId?: string;
}

/**
 * A client of one agentlog server. `target` is "host:port"; close it with `close()`
 * when done (calls in flight are cancelled).
 */
export class AgentlogClient {
  readonly timeoutMs: number | null;
  readonly retries: number;
  private readonly sessions: Http2SessionManager | null;
  // Ends every call at close() when calls do not share one HTTP/2 connection.
  private readonly aborter = new AbortController();
  private readonly client: Client<typeof SessionRepository>;
  private closed = false;
  private readonly grpc: boolean;

  constructor(target: string = DEFAULT_TARGET, options: ClientOptions = {}) {
    this.timeoutMs = options.timeoutMs === undefined ? DEFAULT_TIMEOUT_MS : options.timeoutMs;
    this.retries = options.retries ?? DEFAULT_RETRIES;
    const tls = options.tls === true ? {} : options.tls || undefined;
    const baseUrl = `${tls ? "https" : "http"}://${target}`;
    const nodeOptions = tls
      ? {
          ...(tls.ca !== undefined && { ca: tls.ca }),
          ...(tls.cert !== undefined && { cert: tls.cert }),
          ...(tls.key !== undefined && { key: tls.key }),
          ...(tls.serverName !== undefined && { servername: tls.serverName }),
        }
      : {};
    const protocol = options.protocol ?? "grpc";
    this.grpc = protocol === "grpc";
    const interceptors: Interceptor[] = [];
    const token = options.token;
    if (token !== undefined) {
      interceptors.push((next) => async (request) => {
        const value = typeof token === "function" ? await token() : token;
        request.header.set("authorization", `Bearer ${value}`);
        return next(request);
      });
    }
    // Records come back with an id and timestamp added: a reply may be a little
    // larger than the largest request a server accepts.
    const readMaxBytes = 64 * 1024 * 1024;
    let transport: Transport;
    if (protocol === "grpc") {
      // Our own session manager, so that close() ends the connection.
      this.sessions = new Http2SessionManager(
        baseUrl,
        { pingIntervalMs: 30_000, pingTimeoutMs: 10_000 },
        nodeOptions,
      );
      transport = createGrpcTransport({
        baseUrl,
        sessionManager: this.sessions,
        interceptors,
        readMaxBytes,
      });
    } else {
      this.sessions = null;
      const http = {
        baseUrl,
        httpVersion: "1.1" as const,
        nodeOptions,
        interceptors,
        readMaxBytes,
        useBinaryFormat: true,
      };
      transport =
        protocol === "connect" ? createConnectTransport(http) : createGrpcWebTransport(http);
    }
    this.client = createClient(SessionRepository, transport);
  }

  /** Close the connection; calls in flight fail with CancelledError or UnavailableError. */
  close(): void {
    if (!this.closed) {
      this.closed = true;
      this.sessions?.abort();
      this.aborter.abort();
    }
  }

  [Symbol.asyncDispose](): Promise<void> {
    this.close();
    return Promise.resolve();
  }

  private options(signal?: AbortSignal): CallOptions {
    return {
      ...(this.timeoutMs !== null && { timeoutMs: this.timeoutMs }),
      signal: this.untilClosed(signal),
    };
  }

  /** `signal`, also aborted when the client closes. */
  private untilClosed(signal?: AbortSignal): AbortSignal {
    return signal === undefined
      ? this.aborter.signal
      : AbortSignal.any([signal, this.aborter.signal]);
  }

  /** A unary call, retried after UNAVAILABLE or DEADLINE_EXCEEDED. */
  private async unary<T>(call: (options: CallOptions) => Promise<T>): Promise<T> {
    for (let attempt = 0; ; attempt++) {
      try {
        return await call(this.options());
      } catch (error) {
        const failure = toAgentlogError(error, this.closed);
        if (attempt >= this.retries || !RETRYABLE.has(failure.status) || this.closed) {
          throw failure;
        }
      }
      await sleep(backoffMs(attempt));
    }
  }

  /** Store one event at the end of a session; the record as stored. */
  async append(input: AppendInput): Promise<EventRecord> {
    const request = appendRequest(input);
    const response = await this.unary((options) => this.client.append(request, options));
    if (response.record === undefined) throw new AgentlogError("the server sent no record");
    return recordFromMessage(response.record, eventFromMessage(request.event));
  }

  /** A writer for events that need no round trip each (an agent's text deltas and tool
   * calls): `writer.append(input)` returns a promise of the record at once, the events
   * go on one stream, stored in the order appended, each as `append` stores it. The
   * first refused rejects with its error and every one behind it with AbortedError, not
   * stored; `close()` waits for every answer and rejects with that refusal. Over the
   * "connect" and "grpc-web" protocols (HTTP/1.1, which cannot carry a stream of
   * requests) it sends one Append at a time, with the same answers. */
  writer(options: { window?: number } = {}): AppendWriter {
    const open = this.grpc
      ? (messages: AsyncIterable<AppendStreamRequest>, signal: AbortSignal) =>
          this.client.appendStream(messages, { signal: this.untilClosed(signal) })
      : unaryStream(async (request, signal) => {
          const options = { ...this.options(signal) };
          const response = await this.client.append(request, options);
          if (response.record === undefined) throw new AgentlogError("the server sent no record");
          return response.record;
        });
    return new AppendWriter(open, this.retries, options.window ?? DEFAULT_WINDOW);
  }

  /** Store several events at the end of one session, all or none; the records. */
  async appendBatch(
    sessionId: string,
    events: NewEvent[],
    options: {
      expectedSequence?: bigint | number;
      branchId?: string;
      labels?: Record<string, string>;
    } = {},
  ): Promise<EventRecord[]> {
    const messages = events.map((item, index) =>
      create(BatchEventSchema, {
        id: checkId(item.id, `events[${index}].id`),
        event: eventToMessage(item.event),
        ...(item.parentId != null && { parentId: item.parentId }),
      }),
    );
    const request = create(AppendBatchRequestSchema, {
      sessionId,
      events: messages,
      omitEvents: true,
      branchId: branch(options.branchId),
      labels: options.labels ?? {},
      ...(options.expectedSequence !== undefined && {
        expectedSequence: toU64(options.expectedSequence, "expectedSequence"),
      }),
    });
    const response = await this.unary((call) => this.client.appendBatch(request, call));
    return response.records.map((record, index) =>
      recordFromMessage(record, eventFromMessage(messages[index]?.event)),
    );
  }

  /** A range of a session's records as they stream in. */
  async *readSession(sessionId: string, options: ReadOptions = {}): AsyncGenerator<EventRecord> {
    const direction = options.direction ?? "forwards";
    if (direction !== "forwards" && direction !== "backwards") {
      throw new InvalidArgumentError(
        `direction must be "forwards" or "backwards", not ${JSON.stringify(direction)}`,
        { field: "direction" },
      );
    }
    const request = {
      sessionId,
      fromSequence: toU64(options.fromSequence ?? 0, "fromSequence"),
      limit: toU64(options.limit ?? 0, "limit"),
      direction: direction === "backwards" ? ReadDirection.BACKWARDS : ReadDirection.FORWARDS,
      branchId: branch(options.branchId),
    };
    if (options.limit !== undefined && request.limit === 0n) {
      throw new InvalidArgumentError("limit must be at least 1 (leave it out for no limit)", {
        field: "limit",
      });
    }
    yield* this.records((options) => this.client.loadSession(request, options));
  }

  /** A range of a session's records (every record by default). */
  async loadSession(sessionId: string, options: ReadOptions = {}): Promise<EventRecord[]> {
    return collect(this.readSession(sessionId, options));
  }

  /** The children of a record (of any session) as they stream in. */
  async *iterChildren(parentId: string): AsyncGenerator<EventRecord> {
    yield* this.records((options) => this.client.loadChildren({ parentId }, options));
  }

  /** Every record, of any session, whose parentId is `parentId`. */
  async loadChildren(parentId: string): Promise<EventRecord[]> {
    return collect(this.iterChildren(parentId));
  }

  private async *records(
    open: (
      options: CallOptions,
    ) => AsyncIterable<{ records: Parameters<typeof recordFromMessage>[0][] }>,
  ): AsyncGenerator<EventRecord> {
    // The deadline is kept here rather than by Connect (whose timer outlives a stream
    // the caller stopped reading early, holding the process open until it fires);
    // the server still learns it from grpc-timeout.
    const call = new AbortController();
    const timeoutMs = this.timeoutMs;
    const deadline =
      timeoutMs === null
        ? undefined
        : setTimeout(
            () => call.abort(new ConnectError("the deadline passed", Code.DeadlineExceeded)),
            timeoutMs,
          );
    const options: CallOptions = {
      signal: this.untilClosed(call.signal),
      ...(timeoutMs !== null && { headers: { "grpc-timeout": `${Math.max(1, timeoutMs)}m` } }),
    };
    try {
      for await (const response of open(options)) {
        for (const record of response.records) yield recordFromMessage(record);
      }
    } catch (error) {
      const aborted = call.signal.aborted; // by the deadline: its reason says so
      throw toAgentlogError(aborted ? (call.signal.reason ?? error) : error, aborted);
    } finally {
      clearTimeout(deadline);
      call.abort(); // a caller that stopped early frees the stream
    }
  }

  /** A branch's latest record (of "main" unless named); null when it has none. */
  async head(sessionId: string, branchId?: string): Promise<EventRecord | null> {
    const request = { sessionId, branchId: branch(branchId) };
    const response = await this.unary((options) => this.client.head(request, options));
    return response.record === undefined ? null : recordFromMessage(response.record);
  }

  /**
   * Make a new branch whose records 1 to `upToSequence` are copies of a branch's (the
   * same events and timestamps under new ids; parents inside the copied records point
   * to the copies); the new branch, with `forkedFrom`. Not retried: a retry after a
   * lost answer would find the branch made and fail (look with `head`).
   */
  async forkSession(
    sessionId: string,
    upToSequence: bigint | number,
    options: ForkOptions = {},
  ): Promise<BranchInfo> {
    const request = create(ForkSessionRequestSchema, {
      sessionId,
      branchId: branch(options.branchId),
      upToSequence: toU64(upToSequence, "upToSequence"),
      newBranchId: options.newBranchId ?? "",
      newSessionId: options.newSessionId ?? "",
      ...(options.expectedSequence !== undefined && {
        expectedSequence: toU64(options.expectedSequence, "expectedSequence"),
      }),
    });
    let response;
    try {
      response = await this.client.forkSession(request, this.options());
    } catch (error) {
      throw toAgentlogError(error, this.closed);
    }
    if (response.branch === undefined) throw new AgentlogError("the server sent no branch");
    return branchFromMessage(response.branch);
  }

  /**
   * One page of sessions in session id (byte) order; optionally only those carrying
   * every one of `labels`, with ids starting with `sessionIdPrefix`, last appended to
   * at or after `updatedAfter` and before `updatedBefore`. A page token serves only
   * the filters it was made for.
   */
  async listSessions(options: ListOptions = {}): Promise<SessionPage> {
    const pageSize = options.pageSize ?? 0;
    if (!Number.isInteger(pageSize) || pageSize < 0 || pageSize > 1000) {
      throw new InvalidArgumentError("pageSize must be an integer from 1 to 1000", {
        field: "pageSize",
      });
    }
    const request = create(ListSessionsRequestSchema, {
      pageSize,
      pageToken: options.pageToken ?? "",
      labels: options.labels ?? {},
      sessionIdPrefix: options.sessionIdPrefix ?? "",
      ...(options.updatedAfter !== undefined && {
        updatedAfter: timestampFromDate(options.updatedAfter),
      }),
      ...(options.updatedBefore !== undefined && {
        updatedBefore: timestampFromDate(options.updatedBefore),
      }),
    });
    const response = await this.unary((call) => this.client.listSessions(request, call));
    return {
      sessions: response.sessions.map(sessionFromMessage),
      nextPageToken: response.nextPageToken || null,
    };
  }

  /**
   * Delete a branch (or, with `allBranches`, every branch and the session's labels)
   * for good: its records are erased, the feed gets a SessionDeleted marker,
   * subscribers of the branch end with NotFoundError (BRANCH_DELETED), and the deleted
   * records' ids stay reserved (reusing one fails with AlreadyExistsError,
   * RECORD_ID_DELETED). The markers. Not retried: a retry after a lost answer would
   * find nothing to delete.
   */
  async deleteSession(sessionId: string, options: DeleteOptions = {}): Promise<SessionDeleted[]> {
    const request = create(DeleteSessionRequestSchema, {
      sessionId,
      branchId: branch(options.branchId),
      allBranches: options.allBranches ?? false,
      ...(options.expectedSequence !== undefined && {
        expectedSequence: toU64(options.expectedSequence, "expectedSequence"),
      }),
    });
    let response;
    try {
      response = await this.client.deleteSession(request, this.options());
    } catch (error) {
      throw toAgentlogError(error, this.closed);
    }
    return response.deleted.map(deletedFromMessage);
  }

  /**
   * Set and remove a session's labels, all or none; the labels and their version
   * after. With `expectedVersion`, fails with FailedPreconditionError
   * (WRONG_LABELS_VERSION) if another editor changed them first (and is then retried
   * after UNAVAILABLE, which it makes safe).
   */
  async updateSessionLabels(
    sessionId: string,
    change: { set?: Record<string, string>; remove?: string[]; expectedVersion?: bigint | number },
  ): Promise<SessionLabels> {
    const request = create(UpdateSessionLabelsRequestSchema, {
      sessionId,
      set: change.set ?? {},
      remove: change.remove ?? [],
      ...(change.expectedVersion !== undefined && {
        expectedVersion: toU64(change.expectedVersion, "expectedVersion"),
      }),
    });
    let response;
    if (change.expectedVersion !== undefined) {
      response = await this.unary((call) => this.client.updateSessionLabels(request, call));
    } else {
      try {
        response = await this.client.updateSessionLabels(request, this.options());
      } catch (error) {
        throw toAgentlogError(error, this.closed);
      }
    }
    return { labels: { ...response.labels }, version: response.version };
  }

  /**
   * Stored records from `fromSequence` (absent: only new ones), a CaughtUp, then live
   * ones, with no deadline. After UNAVAILABLE it subscribes again from the sequence
   * after the last one delivered (up to `retries` times in a row): no gap, no
   * duplicate; a CaughtUp follows each reconnect.
   */
  async *subscribeSession(
    sessionId: string,
    options: SubscribeOptions & { fromSequence?: bigint | number; branchId?: string } = {},
  ): AsyncGenerator<EventRecord | CaughtUp> {
    let next =
      options.fromSequence === undefined ? undefined : toU64(options.fromSequence, "fromSequence");
    const branchId = branch(options.branchId);
    yield* this.resuming(
      (signal) =>
        this.client.subscribeSession(
          { sessionId, branchId, ...(next !== undefined && { fromSequence: next }) },
          { signal },
        ),
      (response: SubscribeSessionResponse): (EventRecord | CaughtUp)[] => {
        if (response.kind.case === "caughtUp") {
          next = response.kind.value.sequence + 1n;
          return [new CaughtUp(response.kind.value.sequence, 0n)];
        }
        const records = (response.kind.value?.records ?? []).map((r) => recordFromMessage(r));
        const last = records.at(-1);
        if (last !== undefined) next = last.sequence + 1n;
        return records;
      },
      options.signal,
    );
  }

  /**
   * Every session's records in commit order, as FeedRecord(position, record); a
   * FeedGap where records could not be read. Stored ones from `fromPosition`
   * (absent: only new ones), a CaughtUp (once), then live ones; with filters, a
   * Checkpoint says how far the feed was examined where they kept nothing. Resumes
   * after UNAVAILABLE from the position after the last one served, like
   * `subscribeSession`.
   */
  async *subscribeAll(
    options: SubscribeAllOptions = {},
  ): AsyncGenerator<FeedRecord | FeedGap | SessionDeleted | CaughtUp | Checkpoint> {
    let next =
      options.fromPosition === undefined ? undefined : toU64(options.fromPosition, "fromPosition");
    const filters = {
      sessionIdPrefix: options.sessionIdPrefix ?? "",
      partTypes: options.partTypes ?? [],
      branchId: options.branchId ?? "",
    };
    yield* this.resuming(
      (signal) =>
        this.client.subscribeAll(
          { ...filters, ...(next !== undefined && { fromPosition: next }) },
          { signal },
        ),
      (
        response: SubscribeAllResponse,
      ): (FeedRecord | FeedGap | SessionDeleted | CaughtUp | Checkpoint)[] => {
        const kind = response.kind;
        switch (kind.case) {
          case "caughtUp":
            next = kind.value.position + 1n;
            return [new CaughtUp(0n, kind.value.position)];
          case "checkpoint":
            next = kind.value.position + 1n;
            return [new Checkpoint(kind.value.position)];
          case "gap":
            next = kind.value.lastPosition + 1n;
            return [
              new FeedGap(
                kind.value.firstPosition,
                kind.value.lastPosition,
                kind.value.sessionId,
                kind.value.reason,
                kind.value.message,
                kind.value.branchId || "main",
              ),
            ];
          case "deleted": {
            const marker = deletedFromMessage(kind.value);
            next = marker.position + 1n;
            return [marker];
          }
          case "records": {
            const items = kind.value.records.map((item) => {
              if (item.record === undefined) {
                throw new AgentlogError(`feed position ${item.position} came without its record`);
              }
              return new FeedRecord(item.position, recordFromMessage(item.record));
            });
            const last = items.at(-1);
            if (last !== undefined) next = last.position + 1n;
            return items;
          }
          default:
            return [];
        }
      },
      options.signal,
    );
  }

  private async *resuming<R, T>(
    open: (signal: AbortSignal) => AsyncIterable<R>,
    items: (response: R) => T[],
    outer?: AbortSignal,
  ): AsyncGenerator<T> {
    let attempt = 0;
    while (!outer?.aborted) {
      const call = new AbortController();
      const stop = (): void => call.abort();
      outer?.addEventListener("abort", stop, { once: true });
      try {
        for await (const response of open(this.untilClosed(call.signal))) {
          attempt = 0; // the stream works again: a later failure gets all its retries
          yield* items(response);
        }
        return;
      } catch (error) {
        if (outer?.aborted) return;
        const failure = toAgentlogError(error, this.closed);
        if (failure.status !== "UNAVAILABLE" || attempt >= this.retries || this.closed) {
          throw failure;
        }
      } finally {
        outer?.removeEventListener("abort", stop);
        call.abort(); // frees the stream when the caller stopped early
      }
      await sleep(backoffMs(attempt++), outer);
    }
  }
}

async function collect<T>(items: AsyncIterable<T>): Promise<T[]> {
  const all: T[] = [];
  for await (const item of items) all.push(item);
  return all;
}
