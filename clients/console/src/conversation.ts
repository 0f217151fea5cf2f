/** A session's events as a person reads them: runs and iterations as groups, text
 * deltas joined, tool calls as cards with their result and duration, approvals with
 * their decision, state patches, model outputs with their usage, errors in red.
 * Records are added in sequence order; a later record completes an earlier card. */

import type { AgentEvent, TokenUsage } from "../../typescript/src/events.js";
import type { EventRecord } from "../../typescript/src/records.js";
import { between, clock, duration, h, jsonText } from "./dom.js";

/** What a block's "raw" button opens: the records it was made of. */
export type Inspect = (records: EventRecord[]) => void;
/** Shows the state after a patch (computed from the session's start). */
export type ShowState = (record: EventRecord, into: HTMLElement) => void;

interface Open {
  records: EventRecord[];
  element: HTMLElement;
  update: () => void;
}

export class Conversation {
  readonly element = h("div", { class: "conversation", "data-testid": "conversation" });
  private run: HTMLElement | null = null;
  private body: HTMLElement = this.element;
  private text: (Open & { key: string }) | null = null;
  private readonly tools = new Map<string, Open>();
  private readonly approvals = new Map<string, Open>();
  readonly sequences = new Set<bigint>();

  constructor(
    private readonly inspect: Inspect,
    private readonly showState: ShowState,
  ) {}

  clear(): void {
    this.element.replaceChildren();
    this.run = null;
    this.body = this.element;
    this.text = null;
    this.tools.clear();
    this.approvals.clear();
    this.sequences.clear();
  }

  /** Add the next record (in sequence order); one already shown is ignored. */
  add(record: EventRecord): void {
    if (this.sequences.has(record.sequence)) return;
    this.sequences.add(record.sequence);
    const event = record.event;
    if (event.part_type !== "text_delta") this.text = null;
    switch (event.part_type) {
      case "run_started":
        this.startRun(record, event);
        return;
      case "iteration_started":
        this.place(
          this.block(record, "iteration", [
            h("span", { class: "tag" }, `iteration ${event.iteration}`),
          ]),
        );
        return;
      case "text_delta":
        this.addText(record, event);
        return;
      case "tool_call_requested":
        this.addTool(record, event.call.call_id);
        return;
      case "tool_call_completed":
        this.finishTool(record, event.result.call_id);
        return;
      case "tool_call_failed":
        this.finishTool(record, event.call_id);
        return;
      case "approval_requested":
        this.addApproval(record, event.approval_id);
        return;
      case "approval_resolved": {
        const open = this.approvals.get(event.approval_id);
        if (open !== undefined) {
          open.records.push(record);
          open.update();
        } else {
          this.place(this.approvalCard([record]));
        }
        return;
      }
      default:
        this.place(this.simple(record, event));
    }
  }

  private place(element: HTMLElement): void {
    this.body.append(element);
  }

  private block(
    record: EventRecord,
    kind: string,
    content: (Node | string | null)[],
    records = [record],
  ): HTMLElement {
    return h(
      "div",
      { class: `block ${kind}`, "data-kind": kind, "data-sequence": record.sequence.toString() },
      ...content,
      this.rawButton(records),
    );
  }

  private rawButton(records: EventRecord[]): HTMLElement {
    return h(
      "button",
      {
        class: "raw",
        title: "the stored record(s), exactly",
        "aria-label": "show the raw record",
        onclick: () => this.inspect(records),
      },
      "{ }",
    );
  }

  private startRun(
    record: EventRecord,
    event: Extract<AgentEvent, { part_type: "run_started" }>,
  ): void {
    const body = h("div", { class: "run-body" });
    const header = this.block(record, "run-start", [
      h("strong", {}, "Run "),
      h("code", {}, event.run_id),
      ` · ${event.provider} · up to ${event.max_iterations} iterations · ${clock(record.timestamp)}`,
    ]);
    this.run = h("section", { class: "run", "data-run": event.run_id }, header, body);
    this.element.append(this.run);
    this.body = body;
  }

  private addText(
    record: EventRecord,
    event: Extract<AgentEvent, { part_type: "text_delta" }>,
  ): void {
    const key = `${event.run_id}/${event.iteration}`;
    if (this.text !== null && this.text.key === key) {
      this.text.records.push(record);
      this.text.update();
      return;
    }
    const records = [record];
    const paragraph = h("div", { class: "text-body" });
    const element = this.block(record, "text", [paragraph], records);
    const update = (): void => {
      paragraph.textContent = records
        .map((r) => (r.event.part_type === "text_delta" ? r.event.delta : ""))
        .join("");
      element.title = `${records.length} text deltas`;
    };
    update();
    this.text = { key, records, element, update };
    this.place(element);
  }

  private addTool(record: EventRecord, callId: string): void {
    const records = [record];
    const element = h("div", {
      class: "block tool",
      "data-kind": "tool",
      "data-sequence": record.sequence.toString(),
    });
    const update = (): void => element.replaceChildren(...this.toolCard(records));
    update();
    this.tools.set(callId, { records, element, update });
    this.place(element);
  }

  private finishTool(record: EventRecord, callId: string): void {
    const open = this.tools.get(callId);
    if (open === undefined) {
      // its request is earlier than what is loaded, or it never came
      const records = [record];
      const element = h("div", { class: "block tool", "data-kind": "tool" });
      element.replaceChildren(...this.toolCard(records));
      this.place(element);
      return;
    }
    open.records.push(record);
    open.update();
  }

  private toolCard(records: EventRecord[]): Node[] {
    const request = records.find((r) => r.event.part_type === "tool_call_requested");
    const end = records.find(
      (r) =>
        r.event.part_type === "tool_call_completed" || r.event.part_type === "tool_call_failed",
    );
    const first = request ?? end;
    const event = first?.event;
    let name = "tool";
    if (event?.part_type === "tool_call_requested") name = event.call.tool_name;
    if (event?.part_type === "tool_call_completed") name = event.result.tool_name;
    if (event?.part_type === "tool_call_failed") name = event.tool_name;
    const status =
      end === undefined
        ? "running"
        : end.event.part_type === "tool_call_failed"
          ? "failed"
          : "done";
    const parts: Node[] = [
      h(
        "div",
        { class: "card-head" },
        h("span", { class: `status ${status}` }, status),
        h("strong", {}, name),
        request !== undefined && end !== undefined
          ? h("span", { class: "muted" }, ` · ${duration(between(request, end))}`)
          : null,
      ),
    ];
    if (request?.event.part_type === "tool_call_requested") {
      parts.push(
        h("div", { class: "label" }, "input"),
        h("pre", { class: "json" }, jsonText(request.event.call.input)),
      );
    }
    if (end?.event.part_type === "tool_call_completed") {
      parts.push(
        h("div", { class: "label" }, "output"),
        h("pre", { class: "json" }, jsonText(end.event.result.output)),
      );
    }
    if (end?.event.part_type === "tool_call_failed") {
      parts.push(h("div", { class: "error-text" }, end.event.error));
    }
    parts.push(this.rawButton(records));
    return parts;
  }

  private addApproval(record: EventRecord, approvalId: string): void {
    const records = [record];
    const element = this.approvalCard(records);
    const update = (): void => element.replaceChildren(...this.approvalCard(records).childNodes);
    this.approvals.set(approvalId, { records, element, update });
    this.place(element);
  }

  private approvalCard(records: EventRecord[]): HTMLElement {
    const asked = records.find((r) => r.event.part_type === "approval_requested");
    const decided = records.find((r) => r.event.part_type === "approval_resolved");
    const request = asked?.event.part_type === "approval_requested" ? asked.event : null;
    const resolution = decided?.event.part_type === "approval_resolved" ? decided.event : null;
    const decision = resolution?.decision ?? "pending";
    const element = h(
      "div",
      {
        class: `block approval ${decision}`,
        "data-kind": "approval",
        "data-sequence": (asked ?? decided)?.sequence.toString(),
      },
      h(
        "div",
        { class: "card-head" },
        h("span", { class: `status ${decision}` }, decision),
        h("strong", {}, `Approval: ${request?.tool_name ?? "tool call"}`),
        request !== null
          ? h("span", { class: `risk ${request.risk}` }, `${request.risk} risk`)
          : null,
      ),
      request !== null ? h("pre", { class: "json" }, jsonText(request.arguments)) : null,
      resolution?.reason ? h("div", { class: "muted" }, `reason: ${resolution.reason}`) : null,
    );
    element.append(this.rawButton(records));
    return element;
  }

  private simple(record: EventRecord, event: AgentEvent): HTMLElement {
    switch (event.part_type) {
      case "model_output":
        return this.block(record, "model", [
          h("span", { class: "tag" }, "model output"),
          ` stop: ${event.stop_reason} · ${event.directive_count} directive(s)`,
          usage(event.usage),
        ]);
      case "state_patched": {
        const state = h("pre", { class: "json state-after", hidden: true });
        const button = h(
          "button",
          {
            class: "link",
            onclick: () => {
              state.hidden = !state.hidden;
              if (!state.hidden) this.showState(record, state);
            },
          },
          "state after",
        );
        return this.block(record, "state", [
          h("span", { class: "tag" }, `state r${event.revision}`),
          ` ${event.patch.format} from ${event.patch.source} `,
          button,
          h("pre", { class: "json" }, jsonText(event.patch.patch)),
          state,
        ]);
      }
      case "context_compacted":
        return this.block(record, "compacted", [
          h("span", { class: "tag" }, "context compacted"),
          ` dropped ${event.dropped_count} · tokens ${event.tokens_before} → ${event.tokens_after}`,
        ]);
      case "run_errored":
        return this.block(record, "error", [h("strong", {}, "Run error: "), event.error]);
      case "run_finished":
        return this.block(record, `run-end ${event.reason === "error" ? "error" : ""}`, [
          h("strong", {}, `Run ${event.reason}`),
          ` after ${event.total_iterations} iteration(s)`,
          usage(event.usage),
          event.final_answer !== null ? h("div", { class: "final" }, event.final_answer) : null,
        ]);
      default:
        return this.block(record, "other", [h("span", { class: "tag" }, event.part_type)]);
    }
  }
}

function usage(value: TokenUsage | undefined): Node | null {
  if (value === undefined) return null;
  return h(
    "span",
    { class: "usage" },
    ` · tokens in ${value.input_tokens}, out ${value.output_tokens}, cache read ${value.cache_read_tokens}, cache write ${value.cache_creation_tokens}`,
  );
}

/** One line about an event, for the event log and the feed. */
export function summary(event: AgentEvent): string {
  switch (event.part_type) {
    case "run_started":
      return `${event.provider}, up to ${event.max_iterations} iterations`;
    case "iteration_started":
      return `iteration ${event.iteration}`;
    case "model_output":
      return `stop ${event.stop_reason}${event.usage ? `, ${event.usage.output_tokens} tokens out` : ""}`;
    case "text_delta":
      return JSON.stringify(event.delta);
    case "tool_call_requested":
      return `${event.call.tool_name} (${event.call.call_id})`;
    case "tool_call_completed":
      return `${event.result.tool_name} done (${event.result.call_id})`;
    case "tool_call_failed":
      return `${event.tool_name} failed: ${event.error}`;
    case "state_patched":
      return `revision ${event.revision}, ${event.patch.format}`;
    case "context_compacted":
      return `dropped ${event.dropped_count}`;
    case "approval_requested":
      return `${event.tool_name}, ${event.risk} risk`;
    case "approval_resolved":
      return `${event.decision}${event.reason ? `: ${event.reason}` : ""}`;
    case "run_errored":
      return event.error;
    case "run_finished":
      return `${event.reason}, ${event.total_iterations} iteration(s)`;
  }
}
