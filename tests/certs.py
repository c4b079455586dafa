"""Test certificates made by the ``openssl`` command: CAs, and server/client certificates
signed by them (no network, nothing checked in)."""

import secrets
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

DAYS = "2"
SERVER_NAMES = "subjectAltName=IP:127.0.0.1,IP:::1,DNS:localhost"


def _openssl(*args: str | Path) -> None:
    subprocess.run(["openssl", *map(str, args)], check=True, capture_output=True, timeout=60)


def _key_and_request(directory: Path, name: str, subject: str) -> tuple[Path, Path]:
    key, request = directory / f"{name}.key", directory / f"{name}.csr"
    _openssl("ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", key)
    _openssl("req", "-new", "-key", key, "-subj", subject, "-out", request)
    return key, request


@dataclass(frozen=True)
class Authority:
    cert: Path
    key: Path

    @classmethod
    def make(cls, directory: Path, name: str) -> "Authority":
        key, request = _key_and_request(directory, name, f"/CN={name}")
        extensions = directory / f"{name}.ext"
        extensions.write_text(
            "basicConstraints=critical,CA:TRUE\nkeyUsage=critical,keyCertSign,cRLSign\n"
        )
        cert = directory / f"{name}.pem"
        _openssl(
            "x509", "-req", "-in", request, "-signkey", key, "-days", DAYS,
            "-extfile", extensions, "-out", cert,
        )  # fmt: skip
        return cls(cert, key)

    def issue(self, directory: Path, name: str, server: bool) -> tuple[Path, Path]:
        """A certificate signed by this CA: (cert, key), for 127.0.0.1/localhost if ``server``."""
        key, request = _key_and_request(directory, name, f"/CN={name}")
        extensions = directory / f"{name}.ext"
        usage = "serverAuth" if server else "clientAuth"
        names = f"{SERVER_NAMES}\n" if server else ""
        extensions.write_text(f"basicConstraints=CA:FALSE\nextendedKeyUsage={usage}\n{names}")
        cert = directory / f"{name}.pem"
        _openssl(
            "x509", "-req", "-in", request, "-CA", self.cert, "-CAkey", self.key,
            "-set_serial", str(secrets.randbits(63)), "-days", DAYS,
            "-extfile", extensions, "-out", cert,
        )  # fmt: skip
        return cert, key


@dataclass(frozen=True)
class Certificates:
    """Named as the README's TLS examples name them (``ca.pem``, ``client.pem``, ``client.key``)."""

    directory: Path
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    other_ca: Path  # unrelated to everything above
    other_client_cert: Path  # signed by other_ca
    other_client_key: Path


def make_certificates(directory: Path) -> Certificates:
    if shutil.which("openssl") is None:
        raise RuntimeError("the openssl command is needed to make test certificates")
    ca = Authority.make(directory, "ca")
    server_cert, server_key = ca.issue(directory, "server", server=True)
    client_cert, client_key = ca.issue(directory, "client", server=False)
    other = Authority.make(directory, "other-ca")
    other_cert, other_key = other.issue(directory, "other-client", server=False)
    return Certificates(
        directory, ca.cert, server_cert, server_key, client_cert, client_key,
        other.cert, other_cert, other_key,
    )  # fmt: skip
