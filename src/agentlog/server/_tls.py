"""Serving TLS (and mTLS) from certificate files that are rotated in place.

cert-manager and mesh agents replace certificate files while the server runs.
gRPC asks `_Rotating.fetch` for the configuration at each new connection's
handshake; it re-reads the files only when they changed (their inode, size or
modification time), so a rotation takes effect for new connections without a
restart, and connections and streams already up keep their session. A rotation
caught half-written (a file missing or unreadable) keeps the last good files.
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path

import grpc

log = logging.getLogger("agentlog.server")


@dataclass(frozen=True)
class TlsFiles:
    """The server's certificate chain and key (PEM), and, for mTLS, the CA whose
    client certificates it requires."""

    cert: Path
    key: Path
    client_ca: Path | None = None

    def paths(self) -> list[Path]:
        return [self.cert, self.key] + ([self.client_ca] if self.client_ca else [])


def _identity(path: Path) -> tuple[int, int, int]:
    info = os.stat(path)
    return info.st_ino, info.st_size, info.st_mtime_ns


class _Rotating:
    def __init__(self, files: TlsFiles) -> None:
        self._files = files
        self._lock = threading.Lock()  # gRPC may ask from several of its threads
        self._seen = self._stamp()
        self.initial = self._configuration()

    def _stamp(self) -> tuple[tuple[int, int, int], ...]:
        return tuple(_identity(path) for path in self._files.paths())

    def _configuration(self) -> grpc.ServerCertificateConfiguration:
        files = self._files
        pair = (files.key.read_bytes(), files.cert.read_bytes())
        roots = files.client_ca.read_bytes() if files.client_ca else None
        return grpc.ssl_server_certificate_configuration([pair], root_certificates=roots)

    def fetch(self) -> grpc.ServerCertificateConfiguration | None:
        """A new configuration if the files changed since last read, else None."""
        with self._lock:
            try:
                stamp = self._stamp()
                if stamp == self._seen:
                    return None
                configuration = self._configuration()
            except OSError as exc:
                log.warning("TLS files are not readable (%s); keeping the last ones", exc)
                return None
            self._seen = stamp
            log.info("TLS certificate files changed: new connections use them")
            return configuration


def server_credentials(files: TlsFiles) -> grpc.ServerCredentials:
    """Credentials for `add_secure_port` that follow the files as they are rotated;
    with `client_ca`, clients must present a certificate that CA signed."""
    rotating = _Rotating(files)
    return grpc.dynamic_ssl_server_credentials(
        rotating.initial,
        rotating.fetch,  # type: ignore[arg-type]  # None means "unchanged" (grpc docs)
        require_client_authentication=files.client_ca is not None,
    )
