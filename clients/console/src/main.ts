/** The console's frame: the token form, the error banner, and the page the link names:
 * #/ (sessions), #/s/<id> (a session), #/feed (every session, live). */

import { savedToken, saveToken, trouble } from "./api.js";
import { h } from "./dom.js";
import { feedPage } from "./feed.js";
import { type Page, sessionPage } from "./session.js";
import { sessionsPage } from "./sessions.js";

const main = document.getElementById("main") as HTMLElement;
const banner = document.getElementById("banner") as HTMLElement;
let current: Page | null = null;

function report(error: unknown | null): void {
  if (error === null) {
    banner.hidden = true;
    return;
  }
  const found = trouble(error);
  banner.hidden = false;
  banner.className = `banner trouble-${found.kind}`;
  banner.replaceChildren(h("strong", {}, found.title), h("div", {}, found.detail));
}

function route(): void {
  current?.close();
  report(null);
  const hash = location.hash.replace(/^#/, "") || "/";
  const [path = "/", search = ""] = hash.split("?", 2);
  const query = new URLSearchParams(search);
  if (path.startsWith("/s/")) {
    current = sessionPage(decodeURIComponent(path.slice(3)), query, report);
  } else if (path === "/feed") {
    current = feedPage(query, report);
  } else {
    current = sessionsPage(query, report);
  }
  main.replaceChildren(current.element);
  for (const link of document.querySelectorAll("nav a")) {
    const target = link.getAttribute("href") === "#/feed" ? path === "/feed" : path !== "/feed";
    link.toggleAttribute("aria-current", target);
  }
}

const tokenInput = document.getElementById("token") as HTMLInputElement;
tokenInput.value = savedToken();
document.getElementById("token-form")?.addEventListener("submit", (event) => {
  event.preventDefault();
  saveToken(tokenInput.value.trim());
  route();
});

document.addEventListener("keydown", (event) => {
  const typing =
    event.target instanceof HTMLInputElement || event.target instanceof HTMLSelectElement;
  if (event.key === "/" && !typing) {
    event.preventDefault();
    (document.querySelector("main input[type=search]") as HTMLInputElement | null)?.focus();
  }
});

window.addEventListener("hashchange", route);
route();
