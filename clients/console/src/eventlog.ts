/** A branch's records as a table of fixed-height rows, only those in view in the
 * page: rows are read in ranges as they scroll into view, and at most `MAX_CHUNKS`
 * ranges are kept, so a session of any length opens at once and scrolls. */

import type { EventRecord } from "../../typescript/src/records.js";
import { summary } from "./conversation.js";
import { clock, h } from "./dom.js";

export const ROW_PX = 28;
const CHUNK = 250;
const MAX_CHUNKS = 40; // 10,000 records at most in memory
const OVERSCAN = 10;

export type LoadRange = (fromSequence: bigint, limit: number) => Promise<EventRecord[]>;

export class EventLog {
  readonly element: HTMLDivElement;
  private readonly spacer: HTMLDivElement;
  private readonly rows: HTMLDivElement;
  private readonly chunks = new Map<number, EventRecord[]>();
  private readonly loading = new Set<number>();
  private total = 0;
  private selected = 0;
  private frame = 0;

  constructor(
    private readonly load: LoadRange,
    private readonly inspect: (record: EventRecord) => void,
    private readonly failed: (error: unknown) => void,
  ) {
    this.spacer = h("div", { class: "log-spacer" });
    this.rows = h("div", { class: "log-rows", role: "rowgroup" });
    this.spacer.append(this.rows);
    this.element = h(
      "div",
      {
        class: "event-log",
        tabindex: "0",
        role: "grid",
        "aria-label": "event log: j and k (or the arrow keys) move, Enter shows the raw record",
        "data-testid": "event-log",
        onscroll: () => this.schedule(),
        onkeydown: (event: Event) => this.key(event as KeyboardEvent),
      },
      this.spacer,
    );
  }

  setTotal(total: number): void {
    this.total = total;
    this.spacer.style.height = `${total * ROW_PX}px`;
    this.schedule();
  }

  /** A record appended live: shown if its range is loaded, and followed when the view
   * is at the bottom. */
  append(record: EventRecord): void {
    const index = Number(record.sequence) - 1;
    const chunk = this.chunks.get(Math.floor(index / CHUNK));
    if (chunk !== undefined && chunk.length === index % CHUNK) chunk.push(record);
    const atBottom =
      this.element.scrollTop + this.element.clientHeight >= this.total * ROW_PX - ROW_PX * 2;
    this.setTotal(Math.max(this.total, index + 1));
    if (atBottom) this.element.scrollTop = this.total * ROW_PX;
  }

  scrollToSequence(sequence: number): void {
    this.selected = sequence;
    this.element.scrollTop = Math.max(0, (sequence - 1) * ROW_PX - this.element.clientHeight / 3);
    this.schedule();
  }

  private schedule(): void {
    if (this.frame) return;
    this.frame = requestAnimationFrame(() => {
      this.frame = 0;
      this.render();
    });
  }

  render(): void {
    const height = this.element.clientHeight || 600;
    const first = Math.max(0, Math.floor(this.element.scrollTop / ROW_PX) - OVERSCAN);
    const last = Math.min(this.total, first + Math.ceil(height / ROW_PX) + OVERSCAN * 2);
    const rows: HTMLElement[] = [];
    for (let index = first; index < last; index++) {
      const chunkIndex = Math.floor(index / CHUNK);
      const record = this.chunks.get(chunkIndex)?.[index % CHUNK];
      if (record === undefined) this.fetch(chunkIndex);
      rows.push(this.row(index, record));
    }
    this.rows.style.transform = `translateY(${first * ROW_PX}px)`;
    this.rows.replaceChildren(...rows);
  }

  private row(index: number, record: EventRecord | undefined): HTMLElement {
    const sequence = index + 1;
    if (record === undefined) {
      return h(
        "div",
        { class: "log-row loading", role: "row" },
        h("span", { class: "seq" }, `${sequence}`),
        "…",
      );
    }
    const kind = record.event.part_type;
    const bad = kind === "run_errored" || kind === "tool_call_failed";
    return h(
      "div",
      {
        class: `log-row${bad ? " bad" : ""}${sequence === this.selected ? " selected" : ""}`,
        role: "row",
        "data-sequence": String(sequence),
        onclick: () => {
          this.selected = sequence;
          this.inspect(record);
          this.render();
        },
      },
      h("span", { class: "seq" }, String(sequence)),
      h("span", { class: "time" }, clock(record.timestamp)),
      h("span", { class: `kind k-${kind}` }, kind),
      h("span", { class: "summary" }, summary(record.event)),
    );
  }

  private fetch(chunkIndex: number): void {
    if (this.loading.has(chunkIndex)) return;
    this.loading.add(chunkIndex);
    this.load(BigInt(chunkIndex * CHUNK + 1), CHUNK)
      .then((records) => {
        this.chunks.delete(chunkIndex); // re-inserted: the newest is last (evicted last)
        this.chunks.set(chunkIndex, records);
        while (this.chunks.size > MAX_CHUNKS) {
          const oldest = this.chunks.keys().next().value as number;
          this.chunks.delete(oldest);
        }
        this.schedule();
      })
      .catch(this.failed)
      .finally(() => this.loading.delete(chunkIndex));
  }

  private key(event: KeyboardEvent): void {
    const moves: Record<string, number> = {
      j: 1,
      ArrowDown: 1,
      k: -1,
      ArrowUp: -1,
      PageDown: 20,
      PageUp: -20,
    };
    const move = moves[event.key];
    if (move !== undefined) {
      event.preventDefault();
      this.selected = Math.min(this.total, Math.max(1, (this.selected || 0) + move));
      const top = (this.selected - 1) * ROW_PX;
      if (
        top < this.element.scrollTop ||
        top > this.element.scrollTop + this.element.clientHeight - ROW_PX
      ) {
        this.element.scrollTop = top - this.element.clientHeight / 2;
      }
      this.render();
    } else if (event.key === "Enter" && this.selected) {
      event.preventDefault();
      const index = this.selected - 1;
      const record = this.chunks.get(Math.floor(index / CHUNK))?.[index % CHUNK];
      if (record !== undefined) this.inspect(record);
    }
  }
}
