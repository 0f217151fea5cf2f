"""Makes a CA, a server certificate for 127.0.0.1 and a client certificate with the
Python tests' helper (the `cryptography` package), and prints their paths as JSON:
`python clients/typescript/test/certs.py DIR` from the repository root."""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, ".")

from tests.certs import CertificateAuthority

if __name__ == "__main__":
    directory = Path(sys.argv[1])
    ca = CertificateAuthority(directory, "ca")
    server = ca.issue("server", ips=("127.0.0.1",), dns=("localhost",))
    client = ca.issue("client", uris=("spiffe://agents.test/ts",), client=True)
    paths = {
        "ca": ca.pem,
        "serverCert": server.cert,
        "serverKey": server.key,
        "clientCert": client.cert,
        "clientKey": client.key,
    }
    print(json.dumps({name: str(path) for name, path in paths.items()}))
