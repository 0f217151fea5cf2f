/** The console's one way to the server: the Connect protocol (binary protobuf) to the
 * page's own origin, with the token typed in once and kept for the tab. */

import { type Client, createClient, type Interceptor } from "@connectrpc/connect";
import { createConnectTransport } from "@connectrpc/connect-web";

import {
  AgentlogError,
  NotFoundError,
  PermissionDeniedError,
  toAgentlogError,
  UnauthenticatedError,
  UnavailableError,
} from "../../typescript/src/errors.js";
import { SessionRepository } from "../../typescript/src/gen/agentlog/v1/session_pb.js";

const TOKEN_KEY = "agentlog.token";

export function savedToken(): string {
  return sessionStorage.getItem(TOKEN_KEY) ?? "";
}

export function saveToken(token: string): void {
  if (token) sessionStorage.setItem(TOKEN_KEY, token);
  else sessionStorage.removeItem(TOKEN_KEY);
}

const bearer: Interceptor = (next) => (request) => {
  const token = savedToken();
  if (token) request.header.set("authorization", `Bearer ${token}`);
  return next(request);
};

export const api: Client<typeof SessionRepository> = createClient(
  SessionRepository,
  createConnectTransport({
    baseUrl: location.origin,
    useBinaryFormat: true,
    interceptors: [bearer],
  }),
);

/** What went wrong, said so a person can act on it. */
export interface Trouble {
  kind: "unreachable" | "token" | "forbidden" | "missing" | "other";
  title: string;
  detail: string;
}

export function trouble(error: unknown): Trouble {
  const failure: AgentlogError = toAgentlogError(error);
  if (failure instanceof UnauthenticatedError) {
    return {
      kind: "token",
      title: savedToken() ? "The server refused this token" : "This server needs a token",
      detail: `${failure.message}. Enter a token at the top of the page.`,
    };
  }
  if (failure instanceof PermissionDeniedError) {
    return { kind: "forbidden", title: "Not allowed with this token", detail: failure.message };
  }
  if (failure instanceof NotFoundError) {
    return { kind: "missing", title: "Not found", detail: failure.message };
  }
  if (failure instanceof UnavailableError || /fetch|network/i.test(failure.message)) {
    return {
      kind: "unreachable",
      title: "The server does not answer",
      detail: `${location.origin} did not answer (${failure.message}). Is agentlog running? The page retries.`,
    };
  }
  return { kind: "other", title: `${failure.status}`, detail: failure.message };
}

/** Whether a failed stream is worth opening again (the server went away). */
export function retryable(error: unknown): boolean {
  return trouble(error).kind === "unreachable";
}

/** Read a server stream, and open it again after the server went away (with backoff,
 * from where `open` says: the caller keeps its place), until `signal` aborts or a
 * failure that is not the server's absence (reported). `pill` says which it is. */
export async function follow<T>(
  open: () => AsyncIterable<T>,
  each: (message: T) => void,
  pill: HTMLElement,
  report: (error: unknown) => void,
  signal: AbortSignal,
): Promise<void> {
  const say = (text: string, live: boolean): void => {
    pill.textContent = text;
    pill.className = live ? "live" : "live off";
  };
  let attempt = 0;
  while (!signal.aborted) {
    try {
      for await (const message of open()) {
        attempt = 0;
        say("live", true);
        each(message);
      }
    } catch (error) {
      if (signal.aborted) return;
      if (!retryable(error)) {
        say("stopped", false);
        report(error);
        return;
      }
      say("reconnecting…", false);
    }
    await new Promise((done) => setTimeout(done, Math.min(5000, 200 * 2 ** attempt++)));
  }
}
