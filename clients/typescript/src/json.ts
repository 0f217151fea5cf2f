/**
 * Arbitrary JSON values (tool inputs and outputs, state patches, approval
 * arguments), lossless both ways.
 *
 * The wire carries them as JSON text. Reading, a number becomes a `number` when
 * that number prints back to the same text, a `bigint` when it is an integer that
 * a `number` cannot hold exactly (past 2^53), and otherwise a `LosslessNumber`
 * holding the text (`1.0`, `-0.0`, `1e400`, 20 significant digits): so a value read
 * and appended again is stored unchanged. Writing, a value that JSON text cannot
 * carry exactly is refused before anything is sent, never rounded.
 */

import { isLosslessNumber, LosslessNumber, parse, stringify } from "lossless-json";

import { InvalidArgumentError } from "./errors.js";

export { LosslessNumber, isLosslessNumber };

/** A JSON value as this client reads and writes it. */
export type JsonValue =
  | null
  | boolean
  | number
  | bigint
  | string
  | LosslessNumber
  | JsonValue[]
  | { [key: string]: JsonValue };

const U64_MAX = 2n ** 64n - 1n;
const I64_MIN = -(2n ** 63n);
const INTEGER = /^-?\d+$/;

/** Thrown (before any call) for a value that JSON text cannot carry exactly. */
export class UnrepresentableJsonError extends InvalidArgumentError {
  override name = "UnrepresentableJsonError";
  constructor(
    message: string,
    /** Where in the value, e.g. `$.rows[3]`. */
    readonly path: string,
  ) {
    super(`${path}: ${message}`, { reason: "UNREPRESENTABLE_JSON", field: path });
  }
}

function parseNumber(text: string): number | bigint | LosslessNumber {
  const value = Number(text);
  if (String(value) === text) return value;
  if (INTEGER.test(text)) {
    const big = BigInt(text);
    if (String(big) === text) return big;
  }
  return new LosslessNumber(text);
}

/** A JSON text as a JsonValue (numbers as described above). */
export function parseJson(text: string): JsonValue {
  return parse(text, null, parseNumber) as JsonValue;
}

/** A JsonValue as compact JSON text; UnrepresentableJsonError for what JSON cannot
 * carry exactly. `path` names the value in the error. */
export function stringifyJson(value: unknown, path = "$"): string {
  check(value, path, new Set());
  const text = stringify(value); // bigints and LosslessNumbers as their digits
  if (text === undefined) throw new UnrepresentableJsonError("not a JSON value", path);
  return text;
}

function check(value: unknown, path: string, open: Set<object>): void {
  switch (typeof value) {
    case "string":
    case "boolean":
      return;
    case "number":
      if (!Number.isFinite(value)) {
        throw new UnrepresentableJsonError(`${value} is not a JSON number`, path);
      }
      // Written as an integer (not 1e+300) past 2^53: the digits may be gone already.
      if (/^-?\d+$/.test(String(value)) && !Number.isSafeInteger(value)) {
        throw new UnrepresentableJsonError(
          `${value} is an integer past 2^53 held in a number, so its last digits may ` +
            "already be lost; pass it as a bigint (e.g. 9007199254740993n)",
          path,
        );
      }
      return;
    case "bigint":
      if (value > U64_MAX || value < I64_MIN) {
        throw new UnrepresentableJsonError(
          `${value} is outside the 64-bit range the store keeps exactly (-2^63 to 2^64-1)`,
          path,
        );
      }
      return;
    case "object":
      break;
    default:
      throw new UnrepresentableJsonError(`a ${typeof value} is not a JSON value`, path);
  }
  if (value === null) return;
  if (isLosslessNumber(value)) return; // its text was checked when it was made
  if (open.has(value)) throw new UnrepresentableJsonError("the value contains itself", path);
  open.add(value);
  if (Array.isArray(value)) {
    value.forEach((item, index) => check(item, `${path}[${index}]`, open));
  } else {
    const prototype = Object.getPrototypeOf(value);
    if (prototype !== Object.prototype && prototype !== null) {
      const kind = (value as object).constructor?.name ?? "object";
      throw new UnrepresentableJsonError(
        `a ${kind} is not a JSON value; convert it (e.g. a Date to a string) first`,
        path,
      );
    }
    for (const [key, item] of Object.entries(value)) {
      if (item === undefined) {
        throw new UnrepresentableJsonError(
          "undefined is not a JSON value; use null, or leave the key out",
          `${path}.${key}`,
        );
      }
      check(item, `${path}.${key}`, open);
    }
  }
  open.delete(value);
}
