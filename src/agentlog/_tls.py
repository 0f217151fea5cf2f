"""TLS settings for the clients: which CA to trust, and a client certificate for mTLS."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc


@dataclass(frozen=True, kw_only=True)
class TlsConfig:
    """How a client speaks TLS to the server.

    `ca`: the PEM file of the CA that signed the server's certificate (None: the
    system's roots). `cert` and `key`: the client's certificate chain and key, for a
    server that requires client certificates (mTLS). `server_name`: the name to check
    the server's certificate against, when it is not the target's host.
    """

    ca: str | Path | None = None
    cert: str | Path | None = None
    key: str | Path | None = None
    server_name: str | None = None

    def __post_init__(self) -> None:
        if (self.cert is None) != (self.key is None):
            raise ValueError("TlsConfig: give both cert and key (for mTLS), or neither")

    def credentials(self) -> grpc.ChannelCredentials:
        """The channel credentials; the files are read now."""

        def read(path: str | Path | None) -> bytes | None:
            return None if path is None else Path(path).read_bytes()

        return grpc.ssl_channel_credentials(
            root_certificates=read(self.ca),
            private_key=read(self.key),
            certificate_chain=read(self.cert),
        )

    def options(self) -> list[tuple[str, Any]]:
        if self.server_name is None:
            return []
        return [("grpc.ssl_target_name_override", self.server_name)]
