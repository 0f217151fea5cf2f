/**
 * The events of an agent's run, in arcan's JSON shape: `part_type` names the kind
 * beside its fields, keys are snake_case, enums are arcan's strings ("end_turn"),
 * u32 counts are numbers, u64 counts are bigints, and arbitrary JSON is a plain
 * JsonValue (no wrapper). Converted to and from the generated protobuf messages by
 * walking their descriptors, so a field added to the .proto needs no code here.
 */

import {
  create,
  type DescEnumValue,
  type DescField,
  type DescMessage,
  ScalarType,
} from "@bufbuild/protobuf";

import {
  type AgentEvent as AgentEventMessage,
  AgentEventSchema,
  JsonValueSchema,
} from "./gen/agentlog/v1/session_pb.js";
import { InvalidArgumentError } from "./errors.js";
import { type JsonValue, parseJson, stringifyJson } from "./json.js";

export type ModelStopReason =
  "end_turn" | "tool_use" | "needs_user" | "max_tokens" | "safety" | "unknown";
export type RunStopReason =
  "completed" | "needs_user" | "blocked_by_policy" | "budget_exceeded" | "cancelled" | "error";
export type StatePatchFormat = "json_patch" | "merge_patch";
export type StatePatchSource = "model" | "tool" | "system";

/** Token counts of a model call (each 0 when the provider gave none). */
export interface TokenUsage {
  input_tokens: bigint;
  output_tokens: bigint;
  cache_read_tokens: bigint;
  cache_creation_tokens: bigint;
}
export interface ToolCall {
  call_id: string;
  tool_name: string;
  input: JsonValue;
}
export interface ToolResultSummary {
  call_id: string;
  tool_name: string;
  output: JsonValue;
}
export interface StatePatch {
  format: StatePatchFormat;
  patch: JsonValue;
  source: StatePatchSource;
}

interface InRun {
  run_id: string;
  session_id: string;
}
export interface RunStarted extends InRun {
  part_type: "run_started";
  provider: string;
  max_iterations: number;
}
export interface IterationStarted extends InRun {
  part_type: "iteration_started";
  iteration: number;
}
export interface ModelOutput extends InRun {
  part_type: "model_output";
  iteration: number;
  stop_reason: ModelStopReason;
  directive_count: bigint;
  usage?: TokenUsage;
}
export interface TextDelta extends InRun {
  part_type: "text_delta";
  iteration: number;
  delta: string;
}
export interface ToolCallRequested extends InRun {
  part_type: "tool_call_requested";
  iteration: number;
  call: ToolCall;
}
export interface ToolCallCompleted extends InRun {
  part_type: "tool_call_completed";
  iteration: number;
  result: ToolResultSummary;
}
export interface ToolCallFailed extends InRun {
  part_type: "tool_call_failed";
  iteration: number;
  call_id: string;
  tool_name: string;
  error: string;
}
export interface StatePatched extends InRun {
  part_type: "state_patched";
  iteration: number;
  patch: StatePatch;
  revision: bigint;
}
export interface ContextCompacted extends InRun {
  part_type: "context_compacted";
  iteration: number;
  dropped_count: bigint;
  tokens_before: bigint;
  tokens_after: bigint;
}
export interface ApprovalRequested extends InRun {
  part_type: "approval_requested";
  approval_id: string;
  call_id: string;
  tool_name: string;
  arguments: JsonValue;
  risk: "low" | "medium" | "high" | "critical";
}
export interface ApprovalResolved extends InRun {
  part_type: "approval_resolved";
  approval_id: string;
  decision: "approved" | "denied" | "timeout";
  reason: string | null;
}
export interface RunErrored extends InRun {
  part_type: "run_errored";
  error: string;
}
export interface RunFinished extends InRun {
  part_type: "run_finished";
  reason: RunStopReason;
  total_iterations: number;
  final_answer: string | null;
  usage?: TokenUsage;
}

/** One thing that happened in an agent's run. */
export type AgentEvent =
  | RunStarted
  | IterationStarted
  | ModelOutput
  | TextDelta
  | ToolCallRequested
  | ToolCallCompleted
  | ToolCallFailed
  | StatePatched
  | ContextCompacted
  | ApprovalRequested
  | ApprovalResolved
  | RunErrored
  | RunFinished;

/** Every `part_type`, in the order of the .proto. */
export const PART_TYPES: readonly AgentEvent["part_type"][] = AgentEventSchema.fields.map(
  (field) => field.name as AgentEvent["part_type"],
);

/** Thrown (before any call) for an event, or another request value, that does not fit
 * the contract. */
export class InvalidEventError extends InvalidArgumentError {
  override name = "InvalidEventError";
  constructor(message: string) {
    super(message, { reason: "INVALID_EVENT" });
  }
}

type Plain = Record<string, unknown>;
const U32_MAX = 2 ** 32 - 1;
const U64_MAX = 2n ** 64n - 1n;

/** An event as the protobuf message sent on the wire. */
export function eventToMessage(event: AgentEvent): AgentEventMessage {
  if (typeof event !== "object" || event === null) {
    throw new InvalidEventError("an event must be an object with a part_type");
  }
  const kind = (event as unknown as Plain).part_type;
  const member = AgentEventSchema.fields.find((field) => field.name === kind);
  if (member === undefined || member.message === undefined) {
    throw new InvalidEventError(
      `unknown part_type ${JSON.stringify(kind)}; one of: ${PART_TYPES.join(", ")}`,
    );
  }
  const value = toInit(member.message, event as unknown as Plain, String(kind), ["part_type"]);
  return create(AgentEventSchema, { kind: { case: member.localName, value } } as never);
}

/** The event a protobuf message carries (undefined when it carries none). */
export function eventFromMessage(message: AgentEventMessage | undefined): AgentEvent | undefined {
  const kind = message?.kind;
  if (kind === undefined || kind.case === undefined) return undefined;
  const member = AgentEventSchema.fields.find((field) => field.localName === kind.case);
  if (member?.message === undefined) return undefined;
  return {
    part_type: member.name,
    ...fromMessage(member.message, kind.value as unknown as Plain),
  } as unknown as AgentEvent;
}

/** The event as arcan writes it in a session file's `event` field (JSON text). */
export function eventToJson(event: AgentEvent): string {
  return stringifyJson(eventFromMessage(eventToMessage(event)), "event");
}

/** arcan's string for an enum value: MODEL_STOP_REASON_END_TURN is "end_turn". */
function arcanName(value: DescEnumValue): string {
  return value.localName.toLowerCase();
}

function isJsonValue(desc: DescMessage): boolean {
  return desc.typeName === JsonValueSchema.typeName;
}

function toInit(desc: DescMessage, object: Plain, path: string, skip: string[] = []): Plain {
  const known = new Set([...skip, ...desc.fields.map((field) => field.name)]);
  for (const key of Object.keys(object)) {
    if (!known.has(key)) {
      const fields = desc.fields.map((field) => field.name).join(", ");
      throw new InvalidEventError(`${path}: no field ${JSON.stringify(key)} (fields: ${fields})`);
    }
  }
  const init: Plain = {};
  for (const field of desc.fields) {
    const value = object[field.name];
    const where = `${path}.${field.name}`;
    const converted = toField(field, value, where);
    if (converted !== undefined) init[field.localName] = converted;
  }
  return init;
}

function toField(field: DescField, value: unknown, where: string): unknown {
  switch (field.fieldKind) {
    case "scalar": {
      if (value === null || value === undefined) {
        if (field.proto.proto3Optional) return undefined; // null: absent
        throw new InvalidEventError(`${where} is required`);
      }
      return toScalar(field.scalar, value, where);
    }
    case "enum": {
      const values = field.enum.values.filter((v) => v.number !== 0);
      const found = values.find((v) => value === arcanName(v) || value === v.name);
      if (found === undefined) {
        const spellings = values.map((v) => JSON.stringify(arcanName(v)));
        throw new InvalidEventError(
          `${where}: ${JSON.stringify(value)} is not one of ${spellings.join(", ")}`,
        );
      }
      return found.number;
    }
    case "message": {
      if (isJsonValue(field.message)) {
        // JSON null is the unset field; anything else goes as its exact text.
        return value === null || value === undefined
          ? undefined
          : { json: stringifyJson(value, `${where}`) };
      }
      if (value === null || value === undefined) return undefined; // absent (usage)
      if (typeof value !== "object" || Array.isArray(value)) {
        throw new InvalidEventError(`${where} must be an object`);
      }
      return toInit(field.message, value as Plain, where);
    }
    default:
      throw new InvalidEventError(`${where}: a ${field.fieldKind} field is not supported`);
  }
}

function toScalar(scalar: ScalarType, value: unknown, where: string): unknown {
  switch (scalar) {
    case ScalarType.STRING:
      if (typeof value !== "string") throw new InvalidEventError(`${where} must be a string`);
      return value;
    case ScalarType.BOOL:
      if (typeof value !== "boolean") throw new InvalidEventError(`${where} must be a boolean`);
      return value;
    case ScalarType.UINT32:
      if (typeof value !== "number" || !Number.isInteger(value) || value < 0 || value > U32_MAX) {
        throw new InvalidEventError(`${where} must be an integer from 0 to ${U32_MAX}`);
      }
      return value;
    case ScalarType.UINT64:
      return toU64(value, where);
    default:
      throw new InvalidEventError(`${where}: scalar type ${scalar} is not supported`);
  }
}

/** A u64 given as a bigint or a safe integer number. */
export function toU64(value: unknown, where: string): bigint {
  if (typeof value === "number" && Number.isSafeInteger(value) && value >= 0) return BigInt(value);
  if (typeof value === "bigint" && value >= 0n && value <= U64_MAX) return value;
  throw new InvalidEventError(
    `${where} must be an integer from 0 to 2^64-1 (a bigint, or a number up to 2^53)`,
  );
}

function fromMessage(desc: DescMessage, message: Plain): Plain {
  const object: Plain = {};
  for (const field of desc.fields) {
    const value = message[field.localName];
    switch (field.fieldKind) {
      case "scalar":
        object[field.name] = value === undefined && field.proto.proto3Optional ? null : value;
        break;
      case "enum": {
        const found = field.enum.values.find((v) => v.number === value);
        object[field.name] = found ? arcanName(found) : value;
        break;
      }
      case "message":
        if (isJsonValue(field.message)) {
          const text = (value as { json?: string } | undefined)?.json;
          object[field.name] = text === undefined || text === "" ? null : parseJson(text);
        } else if (value !== undefined) {
          object[field.name] = fromMessage(field.message, value as Plain);
        } // else absent (usage): left out, as arcan leaves it out
        break;
      default:
        break;
    }
  }
  return object;
}
