/** What the store gives back: records, subscription markers, pages of sessions. */

import type { Timestamp } from "@bufbuild/protobuf/wkt";

import type {
  BranchInfo as BranchInfoMessage,
  EventRecord as EventRecordMessage,
  SessionDeleted as SessionDeletedMessage,
  SessionInfo as SessionInfoMessage,
} from "./gen/agentlog/v1/session_pb.js";
import { type AgentEvent, eventFromMessage } from "./events.js";

/** One stored event: a line of an arcan session file. */
export interface EventRecord {
  /** The record's id (a UUID). */
  id: string;
  sessionId: string;
  /** The branch of the session it belongs to ("main" unless named). */
  branchId: string;
  /** The record this one follows in the event tree; null for a root. */
  parentId: string | null;
  /** When the store accepted the event (to the millisecond; `nanos` has the rest). */
  timestamp: Date;
  /** The nanoseconds within the timestamp's second (0 to 999,999,999). */
  nanos: number;
  /** The timestamp as nanoseconds since the Unix epoch. */
  timestampNs: bigint;
  /** The record's place in its branch: 1, 2, 3, ... */
  sequence: bigint;
  event: AgentEvent;
}

/** Every stored record has been delivered; what follows is live. */
export class CaughtUp {
  constructor(
    /** SubscribeSession: the last sequence delivered so far (0n: none). */
    readonly sequence: bigint,
    /** SubscribeAll: the last position examined so far (0n: none). */
    readonly position: bigint,
  ) {}
}

/** How far a filtered all-sessions feed has been examined: no record up to `position`
 * passed the filters since the last item delivered (store it as the last position). */
export class Checkpoint {
  constructor(readonly position: bigint) {}
}

/** A record with its place in the all-sessions feed. */
export class FeedRecord {
  constructor(
    readonly position: bigint,
    readonly record: EventRecord,
  ) {}
}

/** Feed positions, all of one branch of a session, that the server could not read
 * (its file is damaged); the feed goes on after them. */
export class FeedGap {
  constructor(
    readonly firstPosition: bigint,
    readonly lastPosition: bigint,
    readonly sessionId: string,
    readonly reason: string,
    readonly message: string,
    readonly branchId: string = "main",
  ) {}
}

/** Where a forked branch came from: its records 1 to `sequence` are copies of those
 * of `branchId` of `sessionId`. */
export interface ForkedFrom {
  sessionId: string;
  branchId: string;
  sequence: bigint;
}

/** One branch of a session. */
export interface BranchInfo {
  branchId: string;
  /** How many records it holds, which is also its last sequence. */
  eventCount: bigint;
  firstTimestamp: Date;
  lastTimestamp: Date;
  /** The id of its last record. */
  headId: string;
  /** Where it was forked from; null if it was not. */
  forkedFrom: ForkedFrom | null;
}

export interface SessionInfo {
  sessionId: string;
  /** How many records it holds in all its branches (with one, its last sequence). */
  eventCount: bigint;
  /** Its earliest record's time, and its latest's. */
  firstTimestamp: Date;
  lastTimestamp: Date;
  /** The id of the last record of its "main" branch (of its first, if none). */
  headId: string;
  /** Its branches, in byte order of their ids. */
  branches: BranchInfo[];
  /** Its labels. */
  labels: Record<string, string>;
  /** Their version: 0 before any were set, then one more at each change. */
  labelsVersion: bigint;
}

/** A session's labels and their version. */
export interface SessionLabels {
  labels: Record<string, string>;
  version: bigint;
}

/** The feed's mark that a branch was deleted: its records 1 to `lastSequence` are gone
 * (their positions no longer appear); the marker takes a position of its own. */
export class SessionDeleted {
  constructor(
    readonly position: bigint,
    readonly sessionId: string,
    readonly branchId: string,
    readonly lastSequence: bigint,
    readonly timestamp: Date,
  ) {}
}

export function deletedFromMessage(message: SessionDeletedMessage): SessionDeleted {
  return new SessionDeleted(
    message.position,
    message.sessionId,
    message.branchId || "main",
    message.lastSequence,
    toDate(message.timestamp),
  );
}

export interface SessionPage {
  sessions: SessionInfo[];
  /** Pass to `listSessions` for the next page; null on the last page. */
  nextPageToken: string | null;
}

function toDate(timestamp: Timestamp | undefined): Date {
  if (timestamp === undefined) return new Date(0);
  return new Date(Number(timestamp.seconds) * 1000 + Math.floor(timestamp.nanos / 1_000_000));
}

/** A record from its message; `sent` stands in for an event the answer left out. */
export function recordFromMessage(message: EventRecordMessage, sent?: AgentEvent): EventRecord {
  const timestamp = message.timestamp;
  const event = sent ?? eventFromMessage(message.event);
  if (event === undefined) throw new TypeError(`record ${message.id} carries no event`);
  return {
    id: message.id,
    sessionId: message.sessionId,
    branchId: message.branchId || "main",
    parentId: message.parentId ?? null,
    timestamp: toDate(timestamp),
    nanos: timestamp?.nanos ?? 0,
    timestampNs: timestamp ? timestamp.seconds * 1_000_000_000n + BigInt(timestamp.nanos) : 0n,
    sequence: message.sequence,
    event,
  };
}

export function branchFromMessage(message: BranchInfoMessage): BranchInfo {
  const forked = message.forkedFrom;
  return {
    branchId: message.branchId || "main",
    eventCount: message.eventCount,
    firstTimestamp: toDate(message.firstTimestamp),
    lastTimestamp: toDate(message.lastTimestamp),
    headId: message.headId,
    forkedFrom:
      forked === undefined
        ? null
        : {
            sessionId: forked.sessionId,
            branchId: forked.branchId || "main",
            sequence: forked.sequence,
          },
  };
}

export function sessionFromMessage(message: SessionInfoMessage): SessionInfo {
  return {
    sessionId: message.sessionId,
    eventCount: message.eventCount,
    firstTimestamp: toDate(message.firstTimestamp),
    lastTimestamp: toDate(message.lastTimestamp),
    headId: message.headId,
    branches: message.branches.map(branchFromMessage),
    labels: { ...message.labels },
    labelsVersion: message.labelsVersion,
  };
}
