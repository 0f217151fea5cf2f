/**
 * What every append shares: the input a caller gives, the request made of it (ids
 * made here, so that a retry is stored once), and the pacing of retries.
 */

import { randomUUID } from "node:crypto";

import { create } from "@bufbuild/protobuf";

import { type AgentEvent, eventToMessage, toU64 } from "./events.js";
import { InvalidArgumentError } from "./errors.js";
import { type AppendRequest, AppendRequestSchema } from "./gen/agentlog/v1/session_pb.js";

const BACKOFF_BASE_MS = 50;
const BACKOFF_CAP_MS = 2_000;

export interface AppendInput {
  sessionId: string;
  event: AgentEvent;
  /** The record this one follows; absent or null for a root. */
  parentId?: string | null;
  /** A canonical UUID; made here when absent, so that a retry is stored once. */
  id?: string;
  /** The branch's last sequence must be this (0: no events yet), or nothing is written. */
  expectedSequence?: bigint | number;
  /** The branch to append to (default "main"). */
  branchId?: string;
  /** Labels for the session, taken if it has none and this append starts its branch. */
  labels?: Record<string, string>;
}

export interface NewEvent {
  event: AgentEvent;
  parentId?: string | null;
  id?: string;
}

/** The AppendRequest for an append, checked as the server checks it (InvalidArgumentError). */
export function appendRequest(input: AppendInput): AppendRequest {
  const event = eventToMessage(input.event);
  return create(AppendRequestSchema, {
    sessionId: input.sessionId,
    event,
    id: checkId(input.id, "id"),
    omitEvent: true, // the answer leaves out the event this client already has
    branchId: branch(input.branchId),
    labels: input.labels ?? {},
    ...(input.parentId != null && { parentId: input.parentId }),
    ...(input.expectedSequence !== undefined && {
      expectedSequence: toU64(input.expectedSequence, "expectedSequence"),
    }),
  });
}

export function backoffMs(attempt: number): number {
  return Math.random() * Math.min(BACKOFF_CAP_MS, BACKOFF_BASE_MS * 2 ** attempt);
}

export function sleep(ms: number, signal?: AbortSignal): Promise<void> {
  return new Promise((resolve) => {
    const timer = setTimeout(done, ms);
    function done(): void {
      clearTimeout(timer);
      signal?.removeEventListener("abort", done);
      resolve();
    }
    signal?.addEventListener("abort", done, { once: true });
  });
}

/** A branch id as a request carries it: "" for "main" (the default). */
export function branch(branchId: string | undefined): string {
  return branchId === undefined || branchId === "main" ? "" : branchId;
}

export function checkId(id: string | undefined, where: string): string {
  if (id === undefined || id === "") return randomUUID();
  if (!/^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/.test(id)) {
    throw new InvalidArgumentError(
      `${where}: ${JSON.stringify(id)} is not a canonical UUID (lower-case, hyphenated)`,
      { reason: "INVALID_ID", field: where },
    );
  }
  return id;
}
