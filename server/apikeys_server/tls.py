"""Server TLS from PEM files that are re-read when they change, so a renewed certificate is
served to new connections without a restart.

gRPC asks ``ReloadingCertificates.fetch`` before every TLS handshake; it looks at the files'
stat at most once a CHECK_INTERVAL_SECONDS and hands gRPC a new configuration only when their
contents changed and are valid together. A half-written renewal (a new certificate beside the
old key) is refused and the current certificate kept until the files agree again.
"""

import logging
import os
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import grpc

from apikeys_server.config import Settings, named

log = logging.getLogger(__name__)

CHECK_INTERVAL_SECONDS = 1.0

Stamp = tuple[tuple[int, int, int], ...]


class InvalidTlsFile(ValueError):
    """A TLS file that cannot be read or used; the message is one line naming its flag,
    its variable and the file."""


@dataclass(frozen=True)
class TlsFiles:
    cert: Path
    key: Path
    client_ca: Path | None

    @classmethod
    def of(cls, settings: Settings) -> "TlsFiles | None":
        if settings.tls_cert_file is None or settings.tls_key_file is None:
            return None
        return cls(settings.tls_cert_file, settings.tls_key_file, settings.tls_client_ca_file)

    def paths(self) -> tuple[Path, ...]:
        return (
            (self.cert, self.key)
            if self.client_ca is None
            else (self.cert, self.key, self.client_ca)
        )

    def stamp(self) -> Stamp:
        """Cheap change detection: one stat per file."""
        stamps = []
        for path in self.paths():
            status = os.stat(path)
            stamps.append((status.st_mtime_ns, status.st_size, status.st_ino))
        return tuple(stamps)


@dataclass(frozen=True)
class Certificates:
    """One consistent reading of the files."""

    cert_chain: bytes
    key: bytes
    client_ca: bytes | None

    def configuration(self) -> grpc.ServerCertificateConfiguration:
        return grpc.ssl_server_certificate_configuration(
            [(self.key, self.cert_chain)], root_certificates=self.client_ca
        )


def load(files: TlsFiles) -> Certificates:
    """Reads and checks the files (certificates parse, the key matches the certificate)."""
    cert_chain = _read(files.cert, "tls_cert_file")
    _check_certificates(files.cert, cert_chain, "tls_cert_file")
    key = _read(files.key, "tls_key_file")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        # An encrypted key gets no prompt: the empty password fails and says so.
        context.load_cert_chain(files.cert, files.key, password=lambda: b"")
    except (ssl.SSLError, OSError) as error:
        raise _invalid(
            "tls_key_file", files.key, f"not the unencrypted private key of {files.cert} ({error})"
        ) from None
    if _read(files.cert, "tls_cert_file") != cert_chain or _read(files.key, "tls_key_file") != key:
        raise _invalid("tls_cert_file", files.cert, "changed while being read")
    client_ca = None
    if files.client_ca is not None:
        client_ca = _read(files.client_ca, "tls_client_ca_file")
        _check_certificates(files.client_ca, client_ca, "tls_client_ca_file")
    return Certificates(cert_chain, key, client_ca)


def _read(path: Path, setting: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as error:
        raise _invalid(setting, path, f"cannot be read ({error.strerror or error})") from None


def _check_certificates(path: Path, pem: bytes, setting: str) -> None:
    try:
        ssl.create_default_context(cadata=pem.decode("ascii"))
    except (ssl.SSLError, UnicodeDecodeError, ValueError) as error:
        raise _invalid(setting, path, f"holds no valid PEM certificate ({error})") from None


def _invalid(setting: str, path: Path, problem: str) -> InvalidTlsFile:
    return InvalidTlsFile(f"{named(setting)} {path}: {' '.join(problem.split())}")


class ReloadingCertificates:
    """The server's TLS credentials over ``files``, re-read when they change."""

    def __init__(
        self,
        files: TlsFiles,
        interval: float = CHECK_INTERVAL_SECONDS,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._files = files
        self._interval = interval
        self._monotonic = monotonic
        self._lock = threading.Lock()
        try:
            stamp = files.stamp()
        except OSError:
            stamp = ()  # load says which file, in one line
        self._current = load(files)
        self._stamp: Stamp = stamp
        self._next_check = monotonic() + interval
        self._refused: Stamp | None = None

    def server_credentials(self) -> grpc.ServerCredentials:
        return grpc.dynamic_ssl_server_credentials(
            self._current.configuration(),
            self.fetch,  # type: ignore[arg-type]  # grpc-stubs omit the documented None
            require_client_authentication=self._files.client_ca is not None,
        )

    def fetch(self) -> grpc.ServerCertificateConfiguration | None:
        """A new configuration if the files changed (None: keep the current one). Called by
        gRPC before each handshake; never raises, or the handshake would fail."""
        try:
            with self._lock:
                return self._reload_if_changed()
        except Exception:
            log.exception("checking the TLS files failed; keeping the current certificate")
            return None

    def _reload_if_changed(self) -> grpc.ServerCertificateConfiguration | None:
        now = self._monotonic()
        if now < self._next_check:
            return None
        self._next_check = now + self._interval
        try:
            stamp = self._files.stamp()
        except OSError as error:
            self._refuse(None, f"cannot stat a TLS file: {error}")
            return None
        if stamp == self._stamp:
            return None
        try:
            loaded = load(self._files)
        except InvalidTlsFile as error:
            self._refuse(stamp, str(error))
            return None
        self._stamp, self._refused = stamp, None
        if loaded == self._current:
            return None
        self._current = loaded
        log.info("TLS files changed: new connections get the certificate in %s", self._files.cert)
        return loaded.configuration()

    def _refuse(self, stamp: Stamp | None, reason: str) -> None:
        """Logged once per state of the files, not on every handshake."""
        if stamp is None or stamp != self._refused:
            log.warning("keeping the current TLS certificate: %s", reason)
        self._refused = stamp
