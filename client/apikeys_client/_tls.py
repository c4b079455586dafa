"""Channel credentials for a TLS (or mTLS) apikeys server, from PEM files."""

from pathlib import Path

import grpc


def tls_credentials(
    ca_file: str | Path | None = None,
    cert_file: str | Path | None = None,
    key_file: str | Path | None = None,
) -> grpc.ChannelCredentials:
    """For ``ApiKeysClient(..., credentials=...)``.

    ``ca_file``: the CA(s) that signed the server's certificate (None: the system's roots).
    ``cert_file`` and ``key_file``: this client's certificate and key, for a server that
    requires client certificates; both or neither.
    """
    if (cert_file is None) != (key_file is None):
        raise ValueError("cert_file and key_file go together: give both or neither")
    return grpc.ssl_channel_credentials(
        root_certificates=_read(ca_file),
        private_key=_read(key_file),
        certificate_chain=_read(cert_file),
    )


def _read(path: str | Path | None) -> bytes | None:
    return None if path is None else Path(path).read_bytes()
