/**
 * AppendWriter: one writer's events sent on an AppendStream without a round trip
 * each, as the Python clients' writers do. `append` checks the event, queues it and
 * returns a promise of its record; the events queued while the previous message was
 * on its way go together in the next message, and the server answers in order once
 * they are durable.
 *
 * A refusal: the first append the server refuses rejects with its error; every
 * append behind it rejects with AbortedError (reason EARLIER_APPEND_REFUSED) and is
 * not stored; the writer is done (`append` then throws AbortedError) and `close()`
 * rejects with the refusal. When the server goes away (UNAVAILABLE) the writer opens a
 * new stream and sends every unanswered append again, in order (their ids make that
 * safe), giving up after `retries` attempts in a row that brought no answer.
 */

import { create } from "@bufbuild/protobuf";

import { type AppendInput, appendRequest, backoffMs, sleep } from "./appends.js";
import { eventFromMessage } from "./events.js";
import {
  AbortedError,
  type AgentlogError,
  InvalidArgumentError,
  ServerError,
  toAgentlogError,
} from "./errors.js";
import {
  type AppendRequest,
  type AppendStreamRequest,
  AppendStreamRequestSchema,
  type AppendStreamResponse,
} from "./gen/agentlog/v1/session_pb.js";
import { type EventRecord, recordFromMessage } from "./records.js";

/** How many appends may wait for their answers before `room()` waits. */
export const DEFAULT_WINDOW = 1000;
// A message carries at most this many appends and, unless one is larger, bytes.
const MESSAGE_APPENDS = 500;
const MESSAGE_BYTES = 1 << 20;

/** Opens one stream: the messages to send in, the server's answers out. */
export type OpenStream = (
  messages: AsyncIterable<AppendStreamRequest>,
  signal: AbortSignal,
) => AsyncIterable<AppendStreamResponse>;

interface Entry {
  request: AppendRequest;
  size: number;
  resolve: (record: EventRecord) => void;
  reject: (error: AgentlogError) => void;
}

export class AppendWriter {
  readonly window: number;
  private readonly entries: Entry[] = [];
  private sent = 0; // entries[0..sent) went on the current stream
  private failure: AgentlogError | null = null;
  private closing = false;
  private stream = 0;
  private waiters: (() => void)[] = [];
  private running: Promise<void> | null = null;

  constructor(
    private readonly open: OpenStream,
    private readonly retries: number,
    window: number = DEFAULT_WINDOW,
  ) {
    this.window = Math.max(1, window);
  }

  /** How many appends wait for their answers. */
  get pending(): number {
    return this.entries.length;
  }

  /** Send an event; the promise gives its record as stored, or rejects with why it was
   * not stored. Throws at once (nothing sent) for a malformed event, a closed writer,
   * or one that failed (AbortedError). It never waits: see `room()`. */
  append(input: AppendInput): Promise<EventRecord> {
    const request = appendRequest(input);
    if (this.failure !== null) {
      // After a refusal, what follows is aborted; after the stream's own end (a lapsed
      // credential, a server gone past the retries), that error.
      throw "stream_index" in this.failure.metadata ? behind(this.failure) : this.failure;
    }
    if (this.closing) {
      throw new InvalidArgumentError("the writer is closed: open a new one", {
        reason: "WRITER_CLOSED",
      });
    }
    const promise = new Promise<EventRecord>((resolve, reject) => {
      this.entries.push({ request, size: byteSize(request), resolve, reject });
    });
    // A failure is reported by close(): an unawaited append must not also be an
    // unhandled rejection, which ends a Node process.
    promise.catch(() => {});
    this.changed();
    this.running ??= this.run();
    return promise;
  }

  /** Resolves once fewer than `window` appends wait for their answers (or the writer
   * failed): await it in a loop that appends faster than the server answers. */
  async room(): Promise<void> {
    while (this.entries.length >= this.window && this.failure === null) await this.change();
  }

  /** Resolves once every append so far is answered (or the writer failed). */
  async flush(): Promise<void> {
    while (this.entries.length > 0) await this.change();
  }

  /** Send what is queued, wait for every answer and end the stream; rejects with the
   * first append's failure, if one failed. */
  async close(): Promise<void> {
    this.closing = true;
    this.changed();
    if (this.running !== null) await this.running;
    if (this.failure !== null) throw this.failure;
  }

  [Symbol.asyncDispose](): Promise<void> {
    return this.close();
  }

  private change(): Promise<void> {
    return new Promise((resolve) => this.waiters.push(resolve));
  }

  private changed(): void {
    const waiting = this.waiters;
    this.waiters = [];
    for (const wake of waiting) wake();
  }

  /** The messages of one stream: the unanswered appends (again, after a reconnect),
   * then each new one; it ends (half-closing) once closing and all is sent, or when a
   * newer stream replaced it. */
  private async *messages(stream: number): AsyncGenerator<AppendStreamRequest> {
    for (;;) {
      while (stream === this.stream && this.sent >= this.entries.length) {
        if (this.closing) return;
        await this.change();
      }
      if (stream !== this.stream) return;
      const appends: AppendRequest[] = [];
      let size = 0;
      while (this.sent < this.entries.length && appends.length < MESSAGE_APPENDS) {
        const entry = this.entries[this.sent] as Entry;
        if (appends.length > 0 && size + entry.size > MESSAGE_BYTES) break;
        appends.push(entry.request);
        size += entry.size;
        this.sent++;
      }
      yield create(AppendStreamRequestSchema, { appends });
    }
  }

  private async run(): Promise<void> {
    let attempt = 0;
    for (;;) {
      while (this.entries.length === 0 && !this.closing) await this.change();
      if (this.entries.length === 0) return;
      this.sent = 0;
      const stream = ++this.stream;
      const call = new AbortController();
      let error: AgentlogError;
      try {
        for await (const response of this.open(this.messages(stream), call.signal)) {
          this.answered(response);
          attempt = 0;
        }
        if (this.entries.length === 0) continue;
        error = new ServerError("the server ended the append stream with appends unanswered");
      } catch (thrown) {
        const failure = toAgentlogError(thrown);
        const waiting = this.entries.length > 0;
        if (failure.status === "UNAVAILABLE" && (!waiting || attempt < this.retries)) {
          if (waiting) await sleep(backoffMs(attempt++));
          continue;
        }
        error = failure;
      } finally {
        this.stream++; // ends this stream's messages
        call.abort();
        this.changed();
      }
      this.fail(error);
      return;
    }
  }

  private answered(response: AppendStreamResponse): void {
    if (response.records.length > this.sent) {
      throw new ServerError(
        `the server answered ${response.records.length} appends of a stream that had ${this.sent} waiting`,
      );
    }
    const settled = this.entries.splice(0, response.records.length);
    this.sent -= settled.length;
    settled.forEach((entry, index) => {
      const record = response.records[index];
      if (record !== undefined) {
        entry.resolve(recordFromMessage(record, eventFromMessage(entry.request.event)));
      }
    });
    this.changed();
  }

  /** The writer ends with `error`: a refusal (it names the append's place in the
   * stream) rejects the first unanswered append and aborts the ones behind it; any
   * other error rejects every unanswered append. */
  private fail(error: AgentlogError): void {
    this.failure = error;
    const refused = "stream_index" in error.metadata;
    const failed = this.entries.splice(0);
    this.sent = 0;
    failed.forEach((entry, position) =>
      entry.reject(refused && position > 0 ? behind(error) : error),
    );
    this.changed();
  }
}

function behind(error: AgentlogError): AbortedError {
  return new AbortedError(
    `not appended: an append before it on this writer failed (${error.message}); ` +
      "nothing after that append was stored",
    { reason: "EARLIER_APPEND_REFUSED", metadata: { refused_reason: error.reason } },
  );
}

function byteSize(request: AppendRequest): number {
  // An estimate without encoding twice: the event's text dominates a request.
  return JSON.stringify(request.event?.kind.value ?? {}, (_, value: unknown) =>
    typeof value === "bigint" ? value.toString() : value,
  ).length;
}

/** Appends sent one Append call at a time, as a stream: for the HTTP/1.1 protocols,
 * which cannot carry a stream of requests. The same order, answers and refusals. */
export function unaryStream(
  append: (request: AppendRequest, signal: AbortSignal) => Promise<EventRecordMessage>,
): OpenStream {
  return async function* (messages, signal) {
    let index = 0;
    for await (const message of messages) {
      for (const request of message.appends) {
        let record: EventRecordMessage;
        try {
          record = await append(request, signal);
        } catch (thrown) {
          const error = toAgentlogError(thrown);
          if (error.status === "UNAVAILABLE") throw error;
          throw placed(error, index);
        }
        index++;
        yield { records: [record] } as unknown as AppendStreamResponse;
      }
    }
  };
}

type EventRecordMessage = AppendStreamResponse["records"][number];

/** `error`, saying which append of the stream it refused (as the server says it). */
function placed(error: AgentlogError, index: number): AgentlogError {
  const Class = error.constructor as new (
    message: string,
    options: ConstructorParameters<typeof AbortedError>[1],
  ) => AgentlogError;
  return new Class(error.message, {
    status: error.status,
    reason: error.reason,
    metadata: { ...error.metadata, stream_index: String(index) },
    field: error.field,
  });
}
