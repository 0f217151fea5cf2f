/** TLS, mTLS and bearer tokens against a real server with certificates made here. */

import assert from "node:assert/strict";
import { createHash } from "node:crypto";
import { readFileSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { after, before, describe, test } from "node:test";

import {
  AgentlogClient,
  PermissionDeniedError,
  UnauthenticatedError,
  UnavailableError,
} from "../src/index.js";
import { delta } from "./samples.js";
import { python, type Served, startServer, temporaryDirectory } from "./server.js";

interface Certificates {
  ca: string;
  serverCert: string;
  serverKey: string;
  clientCert: string;
  clientKey: string;
}

function sha256(text: string): string {
  return createHash("sha256").update(text).digest("hex");
}

describe("TLS, mTLS and tokens", () => {
  let served: Served;
  let certs: Certificates;
  const tokens = { writer: "w-secret", reader: "r-secret" };

  before(async () => {
    const directory = temporaryDirectory("agentlog-certs-");
    certs = JSON.parse(python("certs.py", directory)) as Certificates;
    const access = join(directory, "access.json");
    writeFileSync(
      access,
      JSON.stringify({
        callers: [
          {
            name: "writer",
            token_sha256: sha256(tokens.writer),
            permissions: ["read", "append"],
            sessions: ["team-a-"],
          },
          {
            name: "reader",
            token_sha256: sha256(tokens.reader),
            permissions: ["read"],
            sessions: [""],
          },
        ],
      }),
    );
    served = await startServer({
      args: [
        "--tls-cert",
        certs.serverCert,
        "--tls-key",
        certs.serverKey,
        "--tls-client-ca",
        certs.ca,
        "--auth-file",
        access,
      ],
    });
  });

  after(async () => {
    await served.stop();
  });

  function client(token?: string | (() => string)): AgentlogClient {
    return new AgentlogClient(served.target, {
      retries: 0,
      tls: {
        ca: readFileSync(certs.ca),
        cert: readFileSync(certs.clientCert),
        key: readFileSync(certs.clientKey),
      },
      ...(token !== undefined && { token }),
    });
  }

  test("with the CA, a client certificate and a token, calls go through", async () => {
    const writer = client(tokens.writer);
    try {
      const record = await writer.append({ sessionId: "team-a-1", event: delta("team-a-1", "x") });
      assert.equal(record.sequence, 1n);
    } finally {
      writer.close();
    }
  });

  test("a token function is asked on every call, subscriptions included", async () => {
    let asked = 0;
    const reader = client(() => {
      asked += 1;
      return tokens.reader;
    });
    try {
      await reader.head("team-a-1");
      const items = reader.subscribeSession("team-a-1", { fromSequence: 1 });
      await items.next();
      await items.return(undefined);
      assert.equal(asked, 2);
    } finally {
      reader.close();
    }
  });

  test("no token is UNAUTHENTICATED, a forbidden session PERMISSION_DENIED", async () => {
    const nobody = client();
    const writer = client(tokens.writer);
    const reader = client(tokens.reader);
    try {
      const refused = await nobody.head("team-a-1").catch((error: unknown) => error);
      assert.ok(refused instanceof UnauthenticatedError);
      assert.equal(refused.reason, "MISSING_CREDENTIAL");
      await assert.rejects(
        writer.append({ sessionId: "team-b-1", event: delta("team-b-1", "x") }),
        PermissionDeniedError,
      );
      await assert.rejects(
        reader.append({ sessionId: "team-a-1", event: delta("team-a-1", "x") }),
        PermissionDeniedError,
      );
      const stranger = client("wrong");
      await assert.rejects(stranger.head("x"), UnauthenticatedError);
      stranger.close();
    } finally {
      nobody.close();
      writer.close();
      reader.close();
    }
  });

  test("plaintext, or TLS without a client certificate, does not get through", async () => {
    const plain = new AgentlogClient(served.target, { retries: 0, token: tokens.reader });
    const noCert = new AgentlogClient(served.target, {
      retries: 0,
      token: tokens.reader,
      tls: { ca: readFileSync(certs.ca) },
    });
    try {
      await assert.rejects(plain.head("team-a-1"), UnavailableError);
      await assert.rejects(noCert.head("team-a-1"), UnavailableError);
    } finally {
      plain.close();
      noCert.close();
    }
  });
});
