/** One session: its conversation (the last records, earlier ones on request), its
 * event log (every record, windowed), its state, the raw records with their place in
 * the event tree, and what is appended live, resumed without loss or doubling after
 * the server restarts. */

import { ReadDirection } from "../../typescript/src/gen/agentlog/v1/session_pb.js";
import type { JsonValue } from "../../typescript/src/json.js";
import {
  type EventRecord,
  recordFromMessage,
  type SessionInfo,
  sessionFromMessage,
} from "../../typescript/src/records.js";
import { api, follow, trouble } from "./api.js";
import { Conversation } from "./conversation.js";
import { ago, h, jsonText, rawRecord, sessionLink } from "./dom.js";
import { EventLog } from "./eventlog.js";
import { applyPatch } from "./patch.js";

const TAIL = 300;

export interface Page {
  element: HTMLElement;
  close(): void;
}

export type Report = (error: unknown | null) => void;

async function findSession(sessionId: string): Promise<SessionInfo | null> {
  const page = await api.listSessions({ sessionIdPrefix: sessionId, pageSize: 1 });
  const first = page.sessions[0];
  return first !== undefined && first.sessionId === sessionId ? sessionFromMessage(first) : null;
}

export function sessionPage(sessionId: string, query: URLSearchParams, report: Report): Page {
  const stop = new AbortController();
  const element = h("div", { class: "session-page" }, h("p", { class: "muted" }, "Loading…"));
  // Nothing of this page is reported once another page has replaced it.
  const said: Report = (error) => {
    if (!stop.signal.aborted) report(error);
  };
  void open(sessionId, query, element, stop.signal, said).catch((error: unknown) => {
    if (!stop.signal.aborted) {
      element.replaceChildren(h("p", { class: "muted" }, trouble(error).title));
      report(error);
    }
  });
  return { element, close: () => stop.abort() };
}

async function open(
  sessionId: string,
  query: URLSearchParams,
  element: HTMLElement,
  signal: AbortSignal,
  report: Report,
): Promise<void> {
  const info = await findSession(sessionId);
  if (info === null) {
    element.replaceChildren(
      h("h2", {}, "No such session"),
      h(
        "p",
        { "data-testid": "missing" },
        `There is no session ${JSON.stringify(sessionId)} (or it was deleted).`,
      ),
      h("a", { href: "#/" }, "All sessions"),
    );
    return;
  }
  report(null);
  const names = info.branches.map((b) => b.branchId);
  const branchId = query.get("branch") ?? (names.includes("main") ? "main" : (names[0] ?? "main"));
  const branch = info.branches.find((b) => b.branchId === branchId);
  let last = Number(branch?.eventCount ?? 0n);
  const wire = branchId === "main" ? "" : branchId;

  const detail = h("aside", { class: "detail", "data-testid": "detail", hidden: true });
  const inspect = (records: EventRecord[]): void => showRecords(detail, records);
  const states = new StateReader(sessionId, wire);
  const conversation = new Conversation(inspect, (record, into) => {
    into.textContent = "computing…";
    states
      .at(record.sequence)
      .then((state) => (into.textContent = jsonText(state)))
      .catch((error: unknown) => (into.textContent = trouble(error).detail));
  });
  const loadRange = async (fromSequence: bigint, limit: number): Promise<EventRecord[]> => {
    const records: EventRecord[] = [];
    for await (const chunk of api.loadSession(
      { sessionId, branchId: wire, fromSequence, limit: BigInt(limit) },
      { signal },
    )) {
      for (const message of chunk.records) records.push(recordFromMessage(message));
    }
    return records;
  };
  const log = new EventLog(loadRange, (record) => inspect([record]), report);
  log.setTotal(last);

  // The conversation starts with the last records; earlier ones come on request.
  let loadedFrom = Math.max(1, last - TAIL + 1);
  const earlier = h("button", { class: "earlier", "data-testid": "earlier" }, "");
  const shown: EventRecord[] = last > 0 ? await loadRange(BigInt(loadedFrom), TAIL) : [];
  const redraw = (): void => {
    conversation.clear();
    for (const record of shown) conversation.add(record);
    earlier.hidden = loadedFrom <= 1;
    earlier.textContent = `Show ${Math.min(TAIL, loadedFrom - 1)} earlier records (${loadedFrom - 1} before these)`;
  };
  earlier.addEventListener("click", () => {
    const from = Math.max(1, loadedFrom - TAIL);
    loadRange(BigInt(from), loadedFrom - from)
      .then((records) => {
        shown.unshift(...records);
        loadedFrom = from;
        redraw();
      })
      .catch(report);
  });
  redraw();

  const live = h("span", { class: "live", "data-testid": "live" }, "live");
  const tabs = tabBar(
    {
      Conversation: h("div", { class: "pane" }, earlier, conversation.element),
      "Event log": log.element,
      State: stateTab(states, () => BigInt(last)),
    },
    () => log.render(),
  );
  element.replaceChildren(
    h(
      "header",
      { class: "session-head" },
      h(
        "h2",
        {},
        h("span", { class: "muted" }, "Session "),
        h("code", { "data-testid": "session-id" }, sessionId),
      ),
      h(
        "div",
        { class: "facts" },
        branchPicker(info, branchId),
        h("span", { "data-testid": "count" }, `${last} records`),
        ` · last ${ago(info.lastTimestamp)} · `,
        live,
        ...Object.entries(info.labels).map(([k, v]) =>
          h("span", { class: "label-chip" }, `${k}=${v}`),
        ),
      ),
    ),
    h("div", { class: "session-body" }, tabs, detail),
  );

  const seq = query.get("seq");
  if (seq !== null) {
    tabs.select("Event log");
    log.scrollToSequence(Number(seq));
  }

  // Live: from the record after the last one read; resumed from the last one seen.
  let next = BigInt(last + 1);
  const count = element.querySelector("[data-testid=count]");
  await follow(
    () => api.subscribeSession({ sessionId, branchId: wire, fromSequence: next }, { signal }),
    (message) => {
      if (message.kind.case !== "records") return;
      for (const item of message.kind.value.records) {
        const record = recordFromMessage(item);
        if (record.sequence < next) continue; // already shown
        next = record.sequence + 1n;
        last = Number(record.sequence);
        shown.push(record);
        conversation.add(record);
        log.append(record);
      }
      if (count) count.textContent = `${last} records`;
    },
    live,
    report,
    signal,
  );
}

/** Tabs over panes; `shown` runs when a pane comes into view (sizes known). */
function tabBar(
  panes: Record<string, HTMLElement>,
  shown: () => void,
): HTMLElement & { select(name: string): void } {
  const bar = h("div", { class: "tabs", role: "tablist" });
  const box = h("div", { class: "tab-panes" });
  const buttons = new Map<string, HTMLButtonElement>();
  const select = (name: string): void => {
    for (const [key, pane] of Object.entries(panes)) {
      pane.hidden = key !== name;
      buttons.get(key)?.setAttribute("aria-selected", String(key === name));
    }
    shown();
  };
  for (const [name, pane] of Object.entries(panes)) {
    const button = h("button", { role: "tab", onclick: () => select(name) }, name);
    buttons.set(name, button);
    bar.append(button);
    box.append(pane);
  }
  const element = Object.assign(h("div", { class: "tabbed" }, bar, box), { select });
  select(Object.keys(panes)[0] ?? "");
  return element;
}

function branchPicker(info: SessionInfo, current: string): HTMLElement {
  if (info.branches.length <= 1) return h("span", {}, `branch ${current} · `);
  const select = h(
    "select",
    {
      "aria-label": "branch",
      onchange: (event: Event) => {
        location.hash = sessionLink(info.sessionId, (event.target as HTMLSelectElement).value);
      },
    },
    ...info.branches.map((b) =>
      h(
        "option",
        { value: b.branchId, selected: b.branchId === current },
        `${b.branchId} (${b.eventCount})`,
      ),
    ),
  );
  return h("label", {}, "branch ", select, " · ");
}

/** The raw records, exactly as stored, with their parent and their children (in any
 * session: a sub-agent's session opens from here). */
function showRecords(detail: HTMLElement, records: EventRecord[]): void {
  detail.hidden = false;
  const close = h(
    "button",
    { class: "close", "aria-label": "close", onclick: () => (detail.hidden = true) },
    "×",
  );
  const title = h(
    "h3",
    { tabindex: "-1" },
    records.length === 1 ? "Record" : `${records.length} records`,
  );
  detail.replaceChildren(close, title);
  for (const record of records) {
    const children = h("ul", { class: "children" });
    const find = h(
      "button",
      {
        class: "link",
        onclick: () => {
          children.replaceChildren(h("li", {}, "looking…"));
          void listChildren(record.id, children);
        },
      },
      "children",
    );
    detail.append(
      h(
        "div",
        { class: "muted" },
        `#${record.sequence} · `,
        find,
        record.parentId ? ` · parent ${record.parentId}` : " · a root",
      ),
      children,
      h("pre", { class: "json raw-json", "data-testid": "raw" }, rawRecord(record)),
    );
  }
  title.focus(); // a reader of the page is taken to what opened
}

async function listChildren(id: string, into: HTMLElement): Promise<void> {
  const items: HTMLElement[] = [];
  try {
    for await (const chunk of api.loadChildren({ parentId: id })) {
      for (const message of chunk.records) {
        const child = recordFromMessage(message);
        items.push(
          h(
            "li",
            {},
            h(
              "a",
              { href: sessionLink(child.sessionId, child.branchId, child.sequence) },
              `${child.sessionId} #${child.sequence}`,
            ),
            ` ${child.event.part_type}`,
          ),
        );
      }
    }
  } catch (error) {
    items.push(h("li", { class: "error-text" }, trouble(error).detail));
  }
  into.replaceChildren(...(items.length ? items : [h("li", { class: "muted" }, "no children")]));
}

/** The agent's state at a sequence: its patches applied from the session's start,
 * read in ranges and continued from the last state computed (nothing else kept). */
class StateReader {
  private sequence = 0n;
  private state: JsonValue = null;
  private revision: bigint | null = null;
  private busy: Promise<unknown> = Promise.resolve();

  constructor(
    private readonly sessionId: string,
    private readonly branchId: string,
  ) {}

  at(sequence: bigint): Promise<JsonValue> {
    const run = this.busy.then(() => this.advance(sequence));
    this.busy = run.catch(() => undefined);
    return run;
  }

  get lastRevision(): bigint | null {
    return this.revision;
  }

  private async advance(sequence: bigint): Promise<JsonValue> {
    if (sequence < this.sequence) {
      this.sequence = 0n;
      this.state = null;
    }
    if (sequence > this.sequence) {
      const limit = sequence - this.sequence;
      const read = api.loadSession({
        sessionId: this.sessionId,
        branchId: this.branchId,
        fromSequence: this.sequence + 1n,
        limit,
        direction: ReadDirection.FORWARDS,
      });
      for await (const chunk of read) {
        for (const message of chunk.records) {
          const record = recordFromMessage(message);
          if (record.event.part_type === "state_patched") {
            this.state = applyPatch(this.state, record.event.patch);
            this.revision = record.event.revision;
          }
          this.sequence = record.sequence;
        }
      }
      this.sequence = sequence;
    }
    return this.state;
  }
}

function stateTab(states: StateReader, last: () => bigint): HTMLElement {
  const out = h("pre", { class: "json", "data-testid": "state" }, "");
  const heading = h("p", { class: "muted" }, "");
  const refresh = h(
    "button",
    {
      onclick: () => {
        out.textContent = "computing…";
        states
          .at(last())
          .then((state) => {
            const revision = states.lastRevision;
            heading.textContent =
              revision === null ? "No state patches yet." : `State at revision ${revision}:`;
            out.textContent = jsonText(state);
          })
          .catch((error: unknown) => (out.textContent = trouble(error).detail));
      },
    },
    "Compute the current state",
  );
  return h("div", { class: "pane" }, refresh, heading, out);
}
