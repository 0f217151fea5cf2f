/** Every session's events as they are appended (SubscribeAll), filtered by session
 * prefix and event kind, with their feed positions; paused and resumed from the last
 * position seen, so nothing is missed or shown twice. */

import { recordFromMessage } from "../../typescript/src/records.js";
import { api, follow } from "./api.js";
import { summary } from "./conversation.js";
import { clock, h, sessionLink } from "./dom.js";
import type { Page, Report } from "./session.js";

const KINDS = [
  "run_started",
  "iteration_started",
  "model_output",
  "text_delta",
  "tool_call_requested",
  "tool_call_completed",
  "tool_call_failed",
  "state_patched",
  "context_compacted",
  "approval_requested",
  "approval_resolved",
  "run_errored",
  "run_finished",
];
const MAX_ROWS = 1000;

export function feedPage(query: URLSearchParams, report: Report): Page {
  let stop = new AbortController();
  const prefix = query.get("prefix") ?? "";
  const kinds = (query.get("kinds") ?? "").split(",").filter(Boolean);
  const prefixInput = h("input", {
    type: "search",
    "aria-label": "session id prefix",
    placeholder: "session id starts with…",
    value: prefix,
  });
  const boxes = KINDS.map((kind) =>
    h(
      "label",
      { class: "kind-box" },
      h("input", { type: "checkbox", value: kind, checked: kinds.includes(kind) }),
      ` ${kind}`,
    ),
  );
  const apply = h(
    "form",
    {
      class: "filters",
      onsubmit: (event: Event) => {
        event.preventDefault();
        const next = new URLSearchParams();
        if (prefixInput.value) next.set("prefix", prefixInput.value);
        const chosen = boxes
          .map((b) => b.querySelector("input") as HTMLInputElement)
          .filter((i) => i.checked);
        if (chosen.length) next.set("kinds", chosen.map((i) => i.value).join(","));
        location.hash = `#/feed?${next.toString()}`;
      },
    },
    prefixInput,
    h("details", {}, h("summary", {}, "event kinds"), ...boxes),
    h("button", { type: "submit" }, "Filter"),
  );
  const body = h("tbody", {});
  const state = h("span", { class: "live", "data-testid": "feed-state" }, "connecting…");
  const pause = h("button", { "data-testid": "pause" }, "Pause");
  let paused = false;
  let position: bigint | undefined;

  const start = (signal: AbortSignal): Promise<void> =>
    follow(
      () =>
        api.subscribeAll(
          {
            sessionIdPrefix: prefix,
            partTypes: kinds,
            ...(position !== undefined && { fromPosition: position + 1n }),
          },
          { signal },
        ),
      (message) => {
        report(null);
        const kind = message.kind;
        if (kind.case === "records") {
          for (const item of kind.value.records) {
            if (item.record === undefined) continue;
            position = item.position;
            const record = recordFromMessage(item.record);
            body.prepend(
              h(
                "tr",
                { class: record.event.part_type === "run_errored" ? "bad" : "" },
                h("td", { class: "number" }, item.position.toString()),
                h("td", {}, clock(record.timestamp)),
                h(
                  "td",
                  {},
                  h(
                    "a",
                    { href: sessionLink(record.sessionId, record.branchId, record.sequence) },
                    `${record.sessionId} #${record.sequence}`,
                  ),
                ),
                h("td", {}, record.event.part_type),
                h("td", { class: "summary" }, summary(record.event)),
              ),
            );
          }
          while (body.childElementCount > MAX_ROWS) body.lastElementChild?.remove();
        } else if (kind.case === "caughtUp" || kind.case === "checkpoint") {
          position =
            position === undefined || kind.value.position > position
              ? kind.value.position
              : position;
        } else if (kind.case === "deleted") {
          position = kind.value.position;
          body.prepend(
            h(
              "tr",
              { class: "muted" },
              h("td", { class: "number" }, kind.value.position.toString()),
              h(
                "td",
                { colspan: "4" },
                `session ${kind.value.sessionId} (branch ${kind.value.branchId || "main"}) deleted`,
              ),
            ),
          );
        } else if (kind.case === "gap") {
          position = kind.value.lastPosition;
        }
      },
      state,
      report,
      signal,
    );
  pause.addEventListener("click", () => {
    paused = !paused;
    pause.textContent = paused ? "Resume" : "Pause";
    if (paused) {
      stop.abort();
      state.textContent = "paused";
      state.className = "live off";
    } else {
      stop = new AbortController();
      void start(stop.signal);
    }
  });
  void start(stop.signal);
  const element = h(
    "div",
    { class: "feed-page" },
    h("h2", {}, "Feed ", state),
    h("p", { class: "muted" }, "Every session's events as they are appended, newest first."),
    apply,
    pause,
    h(
      "table",
      { class: "feed", "data-testid": "feed" },
      h(
        "thead",
        {},
        h(
          "tr",
          {},
          ...["Position", "Time", "Record", "Kind", "Summary"].map((t) =>
            h("th", { scope: "col" }, t),
          ),
        ),
      ),
      body,
    ),
  );
  return { element, close: () => stop.abort() };
}
