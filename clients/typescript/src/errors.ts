/**
 * One error class per gRPC status, as the Python clients have, built from the
 * `google.rpc.ErrorInfo` and `BadRequest` details the server sends (in
 * `grpc-status-details-bin`). No ConnectError leaves the client.
 */

import { Code, ConnectError } from "@connectrpc/connect";

import { BadRequestSchema, ErrorInfoSchema } from "./gen/google/rpc/error_details_pb.js";

/** The server's ErrorInfo domain. */
export const DOMAIN = "agentlog";

/** What every error of this client carries. */
export class AgentlogError extends Error {
  override name = "AgentlogError";
  /** The gRPC status, e.g. "INVALID_ARGUMENT". */
  readonly status: string;
  /** What went wrong, for a program: the ErrorInfo reason, else the status. */
  readonly reason: string;
  /** The ErrorInfo metadata (e.g. `actual_sequence`). */
  readonly metadata: Readonly<Record<string, string>>;
  /** The request field at fault (BadRequest), when the server named one. */
  readonly field: string | undefined;

  constructor(
    message: string,
    options: {
      status?: string | undefined;
      reason?: string | undefined;
      metadata?: Record<string, string> | undefined;
      field?: string | undefined;
      cause?: unknown;
    } = {},
  ) {
    super(message, { cause: options.cause });
    // A subclass made by hand (not from a call) still knows its status.
    const byClass = (new.target as { defaultStatus?: string }).defaultStatus;
    this.status = options.status ?? byClass ?? "UNKNOWN";
    this.reason = options.reason || this.status;
    this.metadata = options.metadata ?? {};
    this.field = options.field;
  }
}

/** A request the server refused as malformed, or one this client refused before
 * sending it (then `reason` says which check: INVALID_EVENT, UNREPRESENTABLE_JSON, ...). */
export class InvalidArgumentError extends AgentlogError {
  static defaultStatus = "INVALID_ARGUMENT";
  override name = "InvalidArgumentError";
}
export class NotFoundError extends AgentlogError {
  static defaultStatus = "NOT_FOUND";
  override name = "NotFoundError";
}
export class AlreadyExistsError extends AgentlogError {
  static defaultStatus = "ALREADY_EXISTS";
  override name = "AlreadyExistsError";
}
export class FailedPreconditionError extends AgentlogError {
  static defaultStatus = "FAILED_PRECONDITION";
  override name = "FailedPreconditionError";
}
/** An expectation (`expectedSequence`) did not hold; nothing was written. */
export class WrongExpectedSequence extends FailedPreconditionError {
  override name = "WrongExpectedSequence";
  /** What the append expected the session's last sequence to be. */
  get expectedSequence(): bigint {
    return BigInt(this.metadata.expected_sequence ?? "0");
  }
  /** The session's last sequence when the append was refused. */
  get actualSequence(): bigint {
    return BigInt(this.metadata.actual_sequence ?? "0");
  }
}
export class DataLossError extends AgentlogError {
  static defaultStatus = "DATA_LOSS";
  override name = "DataLossError";
}
export class ResourceExhaustedError extends AgentlogError {
  static defaultStatus = "RESOURCE_EXHAUSTED";
  override name = "ResourceExhaustedError";
}
export class UnauthenticatedError extends AgentlogError {
  static defaultStatus = "UNAUTHENTICATED";
  override name = "UnauthenticatedError";
}
export class PermissionDeniedError extends AgentlogError {
  static defaultStatus = "PERMISSION_DENIED";
  override name = "PermissionDeniedError";
}
export class UnavailableError extends AgentlogError {
  static defaultStatus = "UNAVAILABLE";
  override name = "UnavailableError";
}
export class DeadlineExceededError extends AgentlogError {
  static defaultStatus = "DEADLINE_EXCEEDED";
  override name = "DeadlineExceededError";
}
export class CancelledError extends AgentlogError {
  static defaultStatus = "CANCELLED";
  override name = "CancelledError";
}
/** Not attempted because an append before it on the same writer was refused (reason
 * EARLIER_APPEND_REFUSED): nothing of it was stored. */
export class AbortedError extends AgentlogError {
  static defaultStatus = "ABORTED";
  override name = "AbortedError";
}
/** The server failed in a way the request did not cause (INTERNAL, UNKNOWN, ...). */
export class ServerError extends AgentlogError {
  static defaultStatus = "INTERNAL";
  override name = "ServerError";
}

type ErrorClass = new (
  message: string,
  options: ConstructorParameters<typeof AgentlogError>[1],
) => AgentlogError;

/** The class of each status; any other status is a ServerError. */
const BY_STATUS: Partial<Record<Code, ErrorClass>> = {
  [Code.InvalidArgument]: InvalidArgumentError,
  [Code.NotFound]: NotFoundError,
  [Code.AlreadyExists]: AlreadyExistsError,
  [Code.FailedPrecondition]: FailedPreconditionError,
  [Code.DataLoss]: DataLossError,
  [Code.ResourceExhausted]: ResourceExhaustedError,
  [Code.Unauthenticated]: UnauthenticatedError,
  [Code.PermissionDenied]: PermissionDeniedError,
  [Code.Unavailable]: UnavailableError,
  [Code.DeadlineExceeded]: DeadlineExceededError,
  [Code.Canceled]: CancelledError,
  [Code.Aborted]: AbortedError,
};

/** Subclasses an ErrorInfo reason selects. */
const BY_REASON: Record<string, ErrorClass> = {
  WRONG_EXPECTED_SEQUENCE: WrongExpectedSequence,
};

/** The status name of a gRPC code, e.g. "INVALID_ARGUMENT" (Connect spells CANCELLED
 * with one L, as `Canceled`; gRPC with two). */
export function statusName(code: Code): string {
  if (code === Code.Canceled) return "CANCELLED";
  return Code[code].replace(/([a-z])([A-Z])/g, "$1_$2").toUpperCase();
}

/** The AgentlogError for anything a call threw. `cancelled`: whether this side
 * cancelled the call; a cancellation it did not ask for is the connection failing
 * under it (a TLS or protocol mismatch, a server going away), so UNAVAILABLE. */
export function toAgentlogError(error: unknown, cancelled = false): AgentlogError {
  if (error instanceof AgentlogError) return error;
  let connect = ConnectError.from(error);
  if (connect.rawMessage.includes("NGHTTP2_REFUSED_STREAM")) {
    // The server refused the stream before reading it (it was closing the connection,
    // a GOAWAY): nothing was done, so it is safe to retry, as UNAVAILABLE is.
    connect = new ConnectError(
      `the server refused the call before processing it (${connect.rawMessage}); retry`,
      Code.Unavailable,
      undefined,
      undefined,
      error,
    );
  } else if (connect.code === Code.Canceled && !cancelled) {
    connect = new ConnectError(
      `the connection failed during the call (${connect.rawMessage}); is the server's ` +
        "address, TLS setting and certificate right?",
      Code.Unavailable,
      undefined,
      undefined,
      error,
    );
  }
  const status = statusName(connect.code);
  let reason: string | undefined;
  let metadata: Record<string, string> = {};
  let field: string | undefined;
  try {
    for (const info of connect.findDetails(ErrorInfoSchema)) {
      if (info.domain === DOMAIN) {
        reason = info.reason;
        metadata = { ...info.metadata };
      }
    }
    field = connect.findDetails(BadRequestSchema)[0]?.fieldViolations[0]?.field;
  } catch {
    // details that do not decode: the status and message still say what happened
  }
  let errorClass: ErrorClass = BY_STATUS[connect.code] ?? ServerError;
  const specific = reason !== undefined ? BY_REASON[reason] : undefined;
  if (specific !== undefined && specific.prototype instanceof errorClass) errorClass = specific;
  let message = connect.rawMessage || status;
  if (errorClass === ServerError && connect.code !== Code.Internal)
    message = `${status}: ${message}`;
  // No `cause`: the transport's error is not part of this client's API.
  return new errorClass(message, { status, reason, metadata, field });
}
