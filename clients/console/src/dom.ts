/** Small helpers for building the page: elements, times, exact JSON text. */

import { stringify } from "lossless-json";

import type { EventRecord } from "../../typescript/src/records.js";

export type Child = Node | string | null | undefined | false;
type Attributes = Record<string, string | boolean | ((event: Event) => void) | undefined>;

/** An element with attributes (`on...` ones are listeners) and children. */
export function h<K extends keyof HTMLElementTagNameMap>(
  tag: K,
  attributes: Attributes = {},
  ...children: Child[]
): HTMLElementTagNameMap[K] {
  const element = document.createElement(tag);
  for (const [name, value] of Object.entries(attributes)) {
    if (value === undefined || value === false) continue;
    if (typeof value === "function") element.addEventListener(name.slice(2), value);
    else if (value === true) element.setAttribute(name, "");
    else element.setAttribute(name, value);
  }
  for (const child of children) {
    if (child === null || child === undefined || child === false) continue;
    element.append(child);
  }
  return element;
}

/** A JSON value as indented text, every number exactly as stored (bigints and
 * lossless numbers are written as the digits they hold). */
export function jsonText(value: unknown): string {
  return stringify(value, undefined, 2) ?? "null";
}

/** The record as arcan's line holds it (keys in its order), exact. */
export function rawRecord(record: EventRecord): string {
  const line: Record<string, unknown> = {
    id: record.id,
    session_id: record.sessionId,
    ...(record.branchId !== "main" && { branch_id: record.branchId }),
    sequence: record.sequence,
    parent_id: record.parentId,
    timestamp: isoNanos(record),
    event: record.event,
  };
  return jsonText(line);
}

/** The timestamp to the nanosecond, as stored: 2026-11-25T01:33:39.004711948Z. */
export function isoNanos(record: EventRecord): string {
  const seconds = record.timestamp.toISOString().slice(0, 19);
  return `${seconds}.${String(record.nanos).padStart(9, "0")}Z`;
}

export function clock(date: Date): string {
  return date.toISOString().replace("T", " ").slice(0, 23);
}

export function ago(date: Date): string {
  const seconds = Math.round((Date.now() - date.getTime()) / 1000);
  if (seconds < 60) return `${Math.max(seconds, 0)} s ago`;
  if (seconds < 3600) return `${Math.round(seconds / 60)} min ago`;
  if (seconds < 86400) return `${Math.round(seconds / 3600)} h ago`;
  return `${Math.round(seconds / 86400)} d ago`;
}

/** Milliseconds between two records' timestamps. */
export function between(start: EventRecord, end: EventRecord): number {
  return Number(end.timestampNs - start.timestampNs) / 1e6;
}

export function duration(ms: number): string {
  return ms < 1000 ? `${ms.toFixed(ms < 10 ? 1 : 0)} ms` : `${(ms / 1000).toFixed(2)} s`;
}

/** The #/ link of a session (and a branch, and a record's sequence in it). */
export function sessionLink(sessionId: string, branchId = "main", sequence?: bigint): string {
  const query = new URLSearchParams();
  if (branchId !== "main") query.set("branch", branchId);
  if (sequence !== undefined) query.set("seq", sequence.toString());
  const text = query.toString();
  return `#/s/${encodeURIComponent(sessionId)}${text ? `?${text}` : ""}`;
}
