"""Serving TLS (and mTLS) from certificate files that are rotated in place.

cert-manager and mesh agents replace certificate files while the server runs.
gRPC asks `_Rotating.fetch` for the configuration at each new connection's
handshake; it re-reads the files only when they changed (their inode, size or
modification time), so a rotation takes effect for new connections without a
restart, and connections and streams already up keep their session. A rotation
caught half-written (a file missing, unreadable, or not whole PEM: a certificate
chain, a private key that matches it, a client CA) keeps the last good files and
logs which file was bad. A server certificate that has expired, or expires within
a week, is logged when it is read.
"""

from __future__ import annotations

import datetime
import logging
import os
import ssl
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
        try:
            self.initial = self._configuration()
        except ValueError as exc:  # at start there is no last good file to keep
            raise OSError(f"cannot serve TLS: {exc}") from None

    def _stamp(self) -> tuple[tuple[int, int, int], ...]:
        return tuple(_identity(path) for path in self._files.paths())

    def _configuration(self) -> grpc.ServerCertificateConfiguration:
        """The configuration the files hold now; ValueError (naming the file) if one is
        not whole."""
        files = self._files
        key, chain = files.key.read_bytes(), files.cert.read_bytes()
        roots = files.client_ca.read_bytes() if files.client_ca else None
        _check(files, key, chain, roots)
        return grpc.ssl_server_certificate_configuration([(key, chain)], root_certificates=roots)

    def fetch(self) -> grpc.ServerCertificateConfiguration | None:
        """A new configuration if the files changed since last read, else None."""
        with self._lock:
            try:
                stamp = self._stamp()
                if stamp == self._seen:
                    return None
                configuration = self._configuration()
            except (OSError, ValueError) as exc:
                log.error("TLS files not used (%s); new connections keep the last good ones", exc)
                return None
            self._seen = stamp
            log.info("TLS certificate files changed: new connections use them")
            return configuration


def _check(files: TlsFiles, key: bytes, chain: bytes, roots: bytes | None) -> None:
    """Refuse files a rotation caught half-written, naming the file; log a certificate
    that expired or soon will."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    try:
        certificates = x509.load_pem_x509_certificates(chain)
    except ValueError as exc:
        raise ValueError(f"{files.cert} is not a PEM certificate chain ({exc})") from None
    try:
        private = serialization.load_pem_private_key(key, password=None)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"{files.key} is not a PEM private key ({exc})") from None
    public = serialization.PublicFormat.SubjectPublicKeyInfo
    encoding = serialization.Encoding.DER
    if private.public_key().public_bytes(encoding, public) != certificates[
        0
    ].public_key().public_bytes(encoding, public):
        raise ValueError(f"{files.key} is not the key of the certificate in {files.cert}")
    if roots is not None:
        try:
            x509.load_pem_x509_certificates(roots)
        except ValueError as exc:
            raise ValueError(f"{files.client_ca} is not a PEM CA certificate ({exc})") from None
    expires = certificates[0].not_valid_after_utc
    left = (expires - datetime.datetime.now(datetime.UTC)).total_seconds()
    if left <= 0:
        log.error(
            "%s expired at %s: clients will refuse this server's TLS handshake until it is renewed",
            files.cert,
            expires.isoformat(),
        )
    elif left < 7 * 86400:
        log.warning("%s expires at %s, in %.1f days", files.cert, expires.isoformat(), left / 86400)


def server_credentials(files: TlsFiles) -> grpc.ServerCredentials:
    """Credentials for `add_secure_port` that follow the files as they are rotated;
    with `client_ca`, clients must present a certificate that CA signed."""
    rotating = _Rotating(files)
    return grpc.dynamic_ssl_server_credentials(
        rotating.initial,
        rotating.fetch,  # type: ignore[arg-type]  # None means "unchanged" (grpc docs)
        require_client_authentication=files.client_ca is not None,
    )


class RotatingSslContext:
    """An `ssl.SSLContext` for the HTTP server that follows the same files: each
    handshake (its client hello) takes the context the files hold now, re-read only
    when they changed; a half-written rotation keeps the last good files."""

    def __init__(self, files: TlsFiles) -> None:
        self._files = files
        self._lock = threading.Lock()
        self._seen = self._stamp()
        try:
            self.context = self._load()
        except (OSError, ValueError, ssl.SSLError) as exc:
            raise OSError(f"cannot serve TLS over HTTP: {exc}") from None
        self._current = self.context
        self.context.sni_callback = self._on_hello

    def _stamp(self) -> tuple[tuple[int, int, int], ...]:
        return tuple(_identity(path) for path in self._files.paths())

    def _load(self) -> ssl.SSLContext:
        files = self._files
        key, chain = files.key.read_bytes(), files.cert.read_bytes()
        roots = files.client_ca.read_bytes() if files.client_ca else None
        _check(files, key, chain, roots)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.load_cert_chain(files.cert, files.key)
        if roots is not None:
            context.load_verify_locations(cadata=roots.decode())
            context.verify_mode = ssl.CERT_REQUIRED
        context.set_alpn_protocols(["http/1.1"])
        return context

    def _on_hello(self, connection: ssl.SSLObject, _name: str | None, _: ssl.SSLContext) -> None:
        with self._lock:
            try:
                stamp = self._stamp()
                if stamp != self._seen:
                    self._current = self._load()
                    self._seen = stamp
                    log.info("TLS certificate files changed: new HTTP connections use them")
            except (OSError, ValueError, ssl.SSLError) as exc:
                log.error("TLS files not used (%s); new connections keep the last good ones", exc)
        if self._current is not self.context:
            connection.context = self._current
