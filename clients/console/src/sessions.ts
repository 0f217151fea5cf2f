/** The sessions, a page at a time, filtered by id prefix and labels; the filters live
 * in the link, so a filtered list can be shared. */

import { sessionFromMessage } from "../../typescript/src/records.js";
import { api } from "./api.js";
import { ago, clock, h, sessionLink } from "./dom.js";
import type { Page, Report } from "./session.js";

const PAGE_SIZE = 50;

/** "team=a, env=prod" as labels; text that is not key=value is refused. */
export function parseLabels(text: string): Record<string, string> {
  const labels: Record<string, string> = {};
  for (const part of text
    .split(",")
    .map((p) => p.trim())
    .filter(Boolean)) {
    const at = part.indexOf("=");
    if (at <= 0) throw new Error(`"${part}" is not key=value`);
    labels[part.slice(0, at).trim()] = part.slice(at + 1).trim();
  }
  return labels;
}

export function sessionsPage(query: URLSearchParams, report: Report): Page {
  const stop = new AbortController();
  const prefix = h("input", {
    id: "prefix",
    type: "search",
    placeholder: "session id starts with…",
    "aria-label": "session id prefix",
    value: query.get("prefix") ?? "",
  });
  const labels = h("input", {
    id: "labels",
    type: "search",
    placeholder: "labels: team=a, env=prod",
    "aria-label": "labels",
    value: query.get("labels") ?? "",
  });
  const form = h(
    "form",
    {
      class: "filters",
      role: "search",
      onsubmit: (event: Event) => {
        event.preventDefault();
        const next = new URLSearchParams();
        if (prefix.value) next.set("prefix", prefix.value);
        if (labels.value) next.set("labels", labels.value);
        const text = next.toString();
        location.hash = `#/${text ? `?${text}` : ""}`;
      },
    },
    prefix,
    labels,
    h("button", { type: "submit" }, "Filter"),
  );
  const body = h("tbody", {});
  const table = h(
    "table",
    { class: "sessions", "data-testid": "sessions" },
    h(
      "thead",
      {},
      h(
        "tr",
        {},
        ...["Session", "Labels", "Branches", "Records", "Last update"].map((t) =>
          h("th", { scope: "col" }, t),
        ),
      ),
    ),
    body,
  );
  const previous = h("button", { disabled: true }, "← Previous");
  const next = h("button", { disabled: true, "data-testid": "next" }, "Next →");
  const status = h("span", { class: "muted" }, "");
  const tokens: string[] = [""]; // the token of each page seen, to go back
  let at = 0;

  const load = async (): Promise<void> => {
    status.textContent = "loading…";
    let filter: Record<string, string>;
    try {
      filter = parseLabels(labels.value);
    } catch (error) {
      status.textContent = (error as Error).message;
      return;
    }
    const answer = await api.listSessions(
      {
        pageSize: PAGE_SIZE,
        pageToken: tokens[at] ?? "",
        sessionIdPrefix: prefix.value,
        labels: filter,
      },
      { signal: stop.signal },
    );
    report(null);
    const rows = answer.sessions
      .map(sessionFromMessage)
      .map((s) =>
        h(
          "tr",
          {},
          h("td", {}, h("a", { href: sessionLink(s.sessionId) }, s.sessionId)),
          h(
            "td",
            {},
            ...Object.entries(s.labels).map(([k, v]) =>
              h("span", { class: "label-chip" }, `${k}=${v}`),
            ),
          ),
          h("td", {}, s.branches.map((b) => b.branchId).join(", ")),
          h("td", { class: "number" }, s.eventCount.toString()),
          h("td", { title: clock(s.lastTimestamp) }, ago(s.lastTimestamp)),
        ),
      );
    body.replaceChildren(
      ...(rows.length
        ? rows
        : [h("tr", {}, h("td", { colspan: "5", class: "muted" }, "No sessions match."))]),
    );
    if (answer.nextPageToken) tokens[at + 1] = answer.nextPageToken;
    next.disabled = !answer.nextPageToken;
    previous.disabled = at === 0;
    status.textContent = `page ${at + 1}`;
  };
  const run = (): void => {
    load().catch((error: unknown) => {
      if (!stop.signal.aborted) {
        status.textContent = "";
        report(error);
      }
    });
  };
  next.addEventListener("click", () => {
    at += 1;
    run();
  });
  previous.addEventListener("click", () => {
    at = Math.max(0, at - 1);
    run();
  });
  run();
  const element = h(
    "div",
    { class: "sessions-page" },
    h("h2", {}, "Sessions"),
    form,
    table,
    h("div", { class: "pager" }, previous, status, next),
  );
  return { element, close: () => stop.abort() };
}
