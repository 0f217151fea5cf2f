/** One event of every kind, with the JSON traps of the fixtures (as tests/samples.py). */

import { type AgentEvent, type JsonValue, LosslessNumber, type TokenUsage } from "../src/index.js";

export const TRICKY_JSON: { [key: string]: JsonValue } = {
  big: 9007199254740993n,
  u64_max: 18446744073709551615n,
  i64_min: -9223372036854775808n,
  exp: 1.5e300,
  ratio: 0.25,
  neg_zero: new LosslessNumber("-0.0"),
  nested_null: { depth: null },
  empty_object: {},
  empty_list: [],
  text: 'Héllo, wörld — "quoted" \\ back\\slash\n\ttab 🚀 中文 \u0001 end \u0000 \u2028 \u2029',
  flags: [true, false, null],
};

export function delta(sessionId: string, text: string): AgentEvent {
  return {
    part_type: "text_delta",
    run_id: "run-1",
    session_id: sessionId,
    iteration: 1,
    delta: text,
  };
}

export function everyEvent(s: string, r = "run-1"): AgentEvent[] {
  const usage: TokenUsage = {
    input_tokens: 1200n,
    output_tokens: 345n,
    cache_read_tokens: 2n ** 64n - 1n,
    cache_creation_tokens: 0n,
  };
  const zero: TokenUsage = {
    input_tokens: 0n,
    output_tokens: 0n,
    cache_read_tokens: 0n,
    cache_creation_tokens: 0n,
  };
  const run = { run_id: r, session_id: s };
  return [
    { part_type: "run_started", ...run, provider: "anthropic", max_iterations: 2 ** 32 - 1 },
    { part_type: "iteration_started", ...run, iteration: 1 },
    {
      part_type: "model_output",
      ...run,
      iteration: 1,
      stop_reason: "tool_use",
      directive_count: 3n,
    },
    {
      part_type: "model_output",
      ...run,
      iteration: 1,
      stop_reason: "max_tokens",
      directive_count: 0n,
      usage: zero,
    },
    { part_type: "text_delta", ...run, iteration: 1, delta: String(TRICKY_JSON.text) },
    { part_type: "text_delta", ...run, iteration: 2, delta: "" },
    {
      part_type: "tool_call_requested",
      ...run,
      iteration: 1,
      call: { call_id: "call_1", tool_name: "read_file", input: TRICKY_JSON },
    },
    {
      part_type: "tool_call_requested",
      ...run,
      iteration: 1,
      call: { call_id: "call_2", tool_name: "noop", input: null },
    },
    {
      part_type: "tool_call_completed",
      ...run,
      iteration: 1,
      result: { call_id: "call_1", tool_name: "read_file", output: "fn main() {}\n" },
    },
    {
      part_type: "tool_call_failed",
      ...run,
      iteration: 1,
      call_id: "call_1",
      tool_name: "read_file",
      error: "permission denied",
    },
    {
      part_type: "state_patched",
      ...run,
      iteration: 1,
      revision: 2n ** 64n - 1n,
      patch: {
        format: "json_patch",
        patch: [{ op: "add", path: "/files/0", value: "src/main.rs" }],
        source: "tool",
      },
    },
    {
      part_type: "state_patched",
      ...run,
      iteration: 1,
      revision: 0n,
      patch: {
        format: "merge_patch",
        patch: { cursor: { line: 3 }, removed: null },
        source: "system",
      },
    },
    {
      part_type: "context_compacted",
      ...run,
      iteration: 2,
      dropped_count: 14n,
      tokens_before: 180000n,
      tokens_after: 42000n,
    },
    {
      part_type: "approval_requested",
      ...run,
      approval_id: "appr-1",
      call_id: "call_9",
      tool_name: "bash",
      arguments: { command: "rm -rf build/", timeout: 30 },
      risk: "critical",
    },
    {
      part_type: "approval_resolved",
      ...run,
      approval_id: "appr-1",
      decision: "denied",
      reason: null,
    },
    {
      part_type: "approval_resolved",
      ...run,
      approval_id: "appr-2",
      decision: "approved",
      reason: "",
    },
    { part_type: "run_errored", ...run, error: "provider timeout after 30s" },
    {
      part_type: "run_finished",
      ...run,
      reason: "completed",
      total_iterations: 2,
      final_answer: "Done.",
      usage,
    },
    {
      part_type: "run_finished",
      ...run,
      reason: "cancelled",
      total_iterations: 0,
      final_answer: "",
    },
    { part_type: "run_finished", ...run, reason: "error", total_iterations: 0, final_answer: null },
  ];
}
