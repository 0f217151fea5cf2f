import assert from "node:assert/strict";
import { describe, test } from "node:test";

import { type AgentEvent, eventToJson, InvalidEventError, PART_TYPES } from "../src/index.js";
import { eventFromMessage, eventToMessage } from "../src/events.js";
import { everyEvent } from "./samples.js";

describe("events", () => {
  test("every kind of the contract has a sample, and each survives the protobuf form", () => {
    const samples = everyEvent("s");
    assert.deepEqual(new Set(samples.map((e) => e.part_type)), new Set(PART_TYPES));
    for (const event of samples) {
      assert.deepEqual(eventFromMessage(eventToMessage(event)), event);
    }
  });

  test("enums are arcan's strings on both sides", () => {
    const event: AgentEvent = {
      part_type: "model_output",
      run_id: "r",
      session_id: "s",
      iteration: 1,
      stop_reason: "end_turn",
      directive_count: 0n,
    };
    assert.equal(eventToMessage(event).kind.case, "modelOutput");
    assert.equal((eventFromMessage(eventToMessage(event)) as typeof event).stop_reason, "end_turn");
    assert.match(eventToJson(event), /"stop_reason":"end_turn"/);
  });

  test("a wrong enum spelling is refused with the spellings that work", () => {
    const event = {
      part_type: "run_finished",
      run_id: "r",
      session_id: "s",
      reason: "finished",
      total_iterations: 1,
      final_answer: null,
    } as unknown as AgentEvent;
    assert.throws(
      () => eventToMessage(event),
      (error: unknown) =>
        error instanceof InvalidEventError &&
        error.message.includes("run_finished.reason") &&
        error.message.includes('"completed"'),
    );
  });

  test("an unknown part_type or field is refused before sending", () => {
    assert.throws(
      () => eventToMessage({ part_type: "nope" } as unknown as AgentEvent),
      /one of: run_started/,
    );
    const typo = {
      part_type: "text_delta",
      run_id: "r",
      session_id: "s",
      iteration: 1,
      delta: "x",
      detla: "y",
    };
    assert.throws(() => eventToMessage(typo as unknown as AgentEvent), /no field "detla"/);
  });

  test("counts out of range are refused, u64 counts take numbers or bigints", () => {
    const base = { part_type: "iteration_started", run_id: "r", session_id: "s" } as const;
    assert.throws(() => eventToMessage({ ...base, iteration: -1 }), InvalidEventError);
    assert.throws(() => eventToMessage({ ...base, iteration: 2 ** 32 }), InvalidEventError);
    const patched = {
      part_type: "state_patched",
      run_id: "r",
      session_id: "s",
      iteration: 1,
      patch: { format: "merge_patch", patch: {}, source: "tool" },
      revision: 7,
    } as unknown as AgentEvent;
    assert.equal((eventFromMessage(eventToMessage(patched)) as { revision: bigint }).revision, 7n);
    assert.throws(
      () =>
        eventToMessage({ ...(patched as object), revision: 2n ** 64n } as unknown as AgentEvent),
      InvalidEventError,
    );
  });

  test("null and absent optional fields stay apart", () => {
    const finished: AgentEvent = {
      part_type: "run_finished",
      run_id: "r",
      session_id: "s",
      reason: "completed",
      total_iterations: 2,
      final_answer: null,
    };
    assert.equal(eventToJson(finished).includes('"final_answer":null'), true);
    assert.equal(eventToJson(finished).includes("usage"), false);
    const empty = { ...finished, final_answer: "" };
    assert.equal(eventToJson(empty).includes('"final_answer":""'), true);
  });
});
