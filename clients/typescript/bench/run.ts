/**
 * The TypeScript client's figures for `make bench` (bench/typescript.py runs this):
 * `node dist/bench/run.js TARGET append CALLS IN_FLIGHT` prints appends per second;
 * `node dist/bench/run.js TARGET load SESSION` prints records per second read.
 * A last argument `connect` or `grpc-web` makes the calls over HTTP (TARGET is then the
 * server's --http-addr).
 */

import { AgentlogClient, type AgentEvent } from "../src/index.js";

const DELTA_TEXT =
  "token of a longer streamed answer, with some text to give each line a realistic size.";

function delta(session: string, n: number): AgentEvent {
  return {
    part_type: "text_delta",
    run_id: "bench",
    session_id: session,
    iteration: n % 1000,
    delta: DELTA_TEXT,
  };
}

async function appendRate(
  client: AgentlogClient,
  calls: number,
  inFlight: number,
): Promise<number> {
  let next = 0;
  const caller = async (): Promise<void> => {
    for (let n = next++; n < calls; n = next++) {
      const session = `ts-${n % 64}`;
      await client.append({ sessionId: session, event: delta(session, n) });
    }
  };
  const started = performance.now();
  await Promise.all(Array.from({ length: inFlight }, caller));
  return calls / ((performance.now() - started) / 1000);
}

async function loadRate(client: AgentlogClient, session: string): Promise<number> {
  const started = performance.now();
  let count = 0;
  for await (const _ of client.readSession(session)) count++;
  return count / ((performance.now() - started) / 1000);
}

async function main(): Promise<void> {
  const [target, mode, ...rest] = process.argv.slice(2);
  const protocol = rest.at(-1) === "connect" || rest.at(-1) === "grpc-web" ? rest.pop() : "grpc";
  const client = new AgentlogClient(target, {
    timeoutMs: 600_000,
    protocol: protocol as "grpc" | "connect" | "grpc-web",
  });
  try {
    if (mode === "append") {
      const [calls, inFlight] = rest.map(Number);
      await appendRate(client, Math.min(200, calls ?? 0), inFlight ?? 1); // warm up
      console.log(await appendRate(client, calls ?? 1000, inFlight ?? 1));
    } else if (mode === "load") {
      console.log(await loadRate(client, rest[0] ?? "load"));
    } else {
      throw new Error(`unknown mode ${mode}`);
    }
  } finally {
    client.close();
  }
}

await main();
