/** Real agentlog servers for the tests: `python -m agentlog.server serve` from the
 * repository's .venv, on a free loopback port, over a temporary directory. */

import { type ChildProcess, execFileSync, spawn } from "node:child_process";
import { cpSync, mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";

/** The repository's root (this file runs from clients/typescript/dist/test). */
export const ROOT = resolve(dirname(fileURLToPath(import.meta.url)), "../../../..");
export const PYTHON = process.env.AGENTLOG_PYTHON ?? join(ROOT, ".venv/bin/python");

export interface Served {
  target: string;
  port: number;
  /** "host:port" of the same service over HTTP (Connect, gRPC-Web), if asked for. */
  httpTarget: string;
  httpPort: number;
  /** How `target` is reached (absent: gRPC). */
  protocol?: Protocol;
  dataDir: string;
  stop(): Promise<void>;
}

export function temporaryDirectory(prefix = "agentlog-ts-"): string {
  return mkdtempSync(join(tmpdir(), prefix));
}

/** A server on `dataDir` (a new temporary one by default); `port` 0 picks one. */
export async function startServer(
  options: {
    dataDir?: string;
    port?: number;
    args?: string[];
    http?: boolean;
    httpPort?: number;
  } = {},
): Promise<Served> {
  const dataDir = options.dataDir ?? temporaryDirectory();
  const child = spawn(
    PYTHON,
    [
      "-m",
      "agentlog.server",
      "serve",
      "--addr",
      `127.0.0.1:${options.port ?? 0}`,
      "--data-dir",
      dataDir,
      ...(options.http === true ? ["--http-addr", `127.0.0.1:${options.httpPort ?? 0}`] : []),
      ...(options.args ?? []),
    ],
    { cwd: ROOT, stdio: ["ignore", "ignore", "pipe"] },
  );
  const [port, httpPort] = await new Promise<[number, number]>((resolvePort, reject) => {
    let seen = "";
    const onData = (chunk: Buffer): void => {
      seen += chunk.toString();
      const found = /serving on 127\.0\.0\.1:(\d+)/.exec(seen);
      const http = /web console on https?:\/\/127\.0\.0\.1:(\d+)/.exec(seen);
      if (found?.[1] !== undefined && (options.http !== true || http?.[1] !== undefined)) {
        child.stderr?.off("data", onData);
        child.stderr?.resume(); // keep draining, so the server never blocks on a full pipe
        resolvePort([Number(found[1]), Number(http?.[1] ?? 0)]);
      }
    };
    child.stderr?.on("data", onData);
    child.once("exit", (code) => reject(new Error(`the server exited (${code}): ${seen}`)));
  });
  return {
    target: `127.0.0.1:${port}`,
    port,
    httpTarget: `127.0.0.1:${httpPort}`,
    httpPort,
    dataDir,
    stop: () => stopProcess(child),
  };
}

function stopProcess(child: ChildProcess): Promise<void> {
  if (child.exitCode !== null || child.signalCode !== null) return Promise.resolve();
  return new Promise((done) => {
    child.once("exit", () => done());
    child.kill("SIGTERM");
  });
}

export type Protocol = "grpc" | "connect" | "grpc-web";
/** Every way the client reaches a server; suites run over each. */
export const PROTOCOLS: readonly Protocol[] = ["grpc", "connect", "grpc-web"];

/** A copy of a fixture directory of `../shared/fixtures/arcan-jsonl`. */
export function fixtureCopy(name: string): string {
  const copy = temporaryDirectory("agentlog-fixture-");
  cpSync(join(ROOT, "..", "shared", "fixtures", "arcan-jsonl", name), copy, { recursive: true });
  return copy;
}

/** Run the Python bridge (test/bridge.py) and give its standard output. */
export function python(script: string, ...args: string[]): string {
  return execFileSync(PYTHON, [join("clients/typescript/test", script), ...args], {
    cwd: ROOT,
    encoding: "utf8",
  });
}

export function removeDirectory(path: string): void {
  rmSync(path, { recursive: true, force: true });
}

/** A server on a new PostgreSQL database (dropped when it stops). */
export async function postgres(http = false): Promise<Served> {
  const url = python("pgdb.py", "create").trim();
  const served = await startServer({ args: ["--store", url], http });
  return {
    ...served,
    stop: async () => {
      await served.stop();
      python("pgdb.py", "drop", url);
    },
  };
}

/** `served` reached over HTTP with `protocol` instead of gRPC. */
function overHttp(served: Served, protocol: Protocol): Served {
  return { ...served, target: served.httpTarget, protocol };
}

/** A server of each kind the contract cases run against, started and stopped by
 * `describe` blocks: the JSONL store in either layout, or PostgreSQL (a database made
 * for it, and dropped after); and two of them over HTTP rather than gRPC. */
export const STORES = {
  "JSONL, seed layout": (): Promise<Served> => startServer(),
  "JSONL, branch layout": (): Promise<Served> => startServer({ args: ["--layout", "branches"] }),
  PostgreSQL: (): Promise<Served> => postgres(),
  "JSONL, branch layout, over Connect": async (): Promise<Served> =>
    overHttp(await startServer({ args: ["--layout", "branches"], http: true }), "connect"),
  "PostgreSQL, over gRPC-Web": async (): Promise<Served> =>
    overHttp(await postgres(true), "grpc-web"),
} as const;
