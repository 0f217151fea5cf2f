/** Agent state from its patches: RFC 6902 JSON Patch and RFC 7386 JSON Merge Patch,
 * on values whose numbers stay exact (lossless-json's numbers are left as they are). */

import type { StatePatch } from "../../typescript/src/events.js";
import type { JsonValue } from "../../typescript/src/json.js";

type Json = JsonValue;

function isObject(value: unknown): value is Record<string, Json> {
  return (
    typeof value === "object" &&
    value !== null &&
    !Array.isArray(value) &&
    !("isLosslessNumber" in value)
  );
}

function copy(value: Json): Json {
  if (Array.isArray(value)) return value.map(copy);
  if (isObject(value)) {
    return Object.fromEntries(Object.entries(value).map(([k, v]) => [k, copy(v)]));
  }
  return value;
}

/** The state after `patch`, from `state` (which is not changed). Throws with a
 * message when the patch does not apply. */
export function applyPatch(state: Json, patch: StatePatch): Json {
  return patch.format === "merge_patch"
    ? mergePatch(state, patch.patch)
    : jsonPatch(copy(state), patch.patch);
}

function mergePatch(target: Json, patch: Json): Json {
  if (!isObject(patch)) return copy(patch);
  const result: Record<string, Json> = isObject(target) ? { ...target } : {};
  for (const [key, value] of Object.entries(patch)) {
    if (value === null) delete result[key];
    else result[key] = mergePatch(result[key] ?? null, value);
  }
  return result;
}

function pointer(path: string): string[] {
  if (path === "") return [];
  if (!path.startsWith("/")) throw new Error(`"${path}" is not a JSON pointer`);
  return path
    .slice(1)
    .split("/")
    .map((part) => part.replaceAll("~1", "/").replaceAll("~0", "~"));
}

function get(document: Json, parts: string[]): Json {
  let at: Json = document;
  for (const part of parts) {
    if (Array.isArray(at)) at = at[Number(part)] as Json;
    else if (isObject(at)) at = at[part] as Json;
    else throw new Error(`no value at /${parts.join("/")}`);
    if (at === undefined) throw new Error(`no value at /${parts.join("/")}`);
  }
  return at;
}

function put(document: Json, parts: string[], value: Json, insert: boolean): Json {
  if (parts.length === 0) return value;
  const parent = get(document, parts.slice(0, -1));
  const last = parts.at(-1) as string;
  if (Array.isArray(parent)) {
    const index = last === "-" ? parent.length : Number(last);
    if (insert) parent.splice(index, 0, value);
    else parent[index] = value;
  } else if (isObject(parent)) {
    parent[last] = value;
  } else {
    throw new Error(`cannot set /${parts.join("/")}`);
  }
  return document;
}

function remove(document: Json, parts: string[]): Json {
  const parent = get(document, parts.slice(0, -1));
  const last = parts.at(-1) as string;
  if (Array.isArray(parent)) parent.splice(Number(last), 1);
  else if (isObject(parent)) delete parent[last];
  return document;
}

function jsonPatch(document: Json, operations: Json): Json {
  if (!Array.isArray(operations)) throw new Error("a JSON patch is an array of operations");
  let result = document;
  for (const operation of operations) {
    if (!isObject(operation)) throw new Error("a JSON patch operation is an object");
    const path = pointer(String(operation.path ?? ""));
    switch (operation.op) {
      case "add":
        result = put(result, path, copy(operation.value ?? null), true);
        break;
      case "replace":
        result = put(result, path, copy(operation.value ?? null), false);
        break;
      case "remove":
        result = remove(result, path);
        break;
      case "copy":
      case "move": {
        const from = pointer(String(operation.from ?? ""));
        const value = copy(get(result, from));
        if (operation.op === "move") result = remove(result, from);
        result = put(result, path, value, true);
        break;
      }
      case "test":
        break; // the store kept it; the console shows state, it does not judge it
      default:
        throw new Error(`unknown JSON patch operation ${JSON.stringify(operation.op)}`);
    }
  }
  return result;
}
