"""TLS and mTLS on real `serve` processes, with certificates made by openssl for the session."""

import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from apikeys_client import ApiKeysClient, tls_credentials
from tests.certs import Authority, Certificates
from tests.e2e.conftest import (
    ServerFactory,
    ServerProcess,
    free_port,
    grpcurl_path,
    run_cli,
    start_server,
)
from tests.e2e.test_readme import grpcurl_blocks, python_examples

pytestmark = pytest.mark.e2e

CALL_TIMEOUT_SECONDS = 5.0
# The server looks at its files at most once a second; new handshakes then get the new ones.
RELOAD_BOUND_SECONDS = 10.0


def tls_args(certs: Certificates, client_ca: Path | None = None) -> list[str]:
    args = ["--tls-cert-file", str(certs.server_cert), "--tls-key-file", str(certs.server_key)]
    return [*args, "--tls-client-ca-file", str(client_ca)] if client_ca else args


def serving(server: ServerProcess, credentials: grpc.ChannelCredentials | None) -> bool:
    """One health check on a new connection: True if answered, False if the connection
    (its TLS handshake) was refused."""
    with server.channel(credentials) as channel:
        try:
            answer = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=CALL_TIMEOUT_SECONDS
            )
        except grpc.RpcError as error:
            assert error.code() == grpc.StatusCode.UNAVAILABLE, error
            return False
    return bool(answer.status == health_pb2.HealthCheckResponse.SERVING)


@pytest.fixture(scope="module")
def tls_server(
    certificates: Certificates, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    """TLS without client certificates."""
    directory = tmp_path_factory.mktemp("tls")
    server = start_server(
        f"sqlite:///{directory / 'apikeys.db'}",
        directory,
        args=tls_args(certificates),
        credentials=tls_credentials(certificates.ca),
    )
    try:
        yield server
    finally:
        server.check_stopped_cleanly()


@pytest.fixture(scope="module")
def mtls_server(
    certificates: Certificates, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    """TLS that requires a client certificate from the test CA."""
    directory = tmp_path_factory.mktemp("mtls")
    certs = certificates
    server = start_server(
        f"sqlite:///{directory / 'apikeys.db'}",
        directory,
        args=tls_args(certs, client_ca=certs.ca),
        credentials=tls_credentials(certs.ca, certs.client_cert, certs.client_key),
    )
    try:
        yield server
    finally:
        server.check_stopped_cleanly()


class TestTls:
    def test_the_client_verifies_keys_over_tls(self, tls_server: ServerProcess) -> None:
        """ApiKeysClient with tls_credentials(ca_file): create and verify a key."""
        with tls_server.client() as client:
            created = client.create_key("tls", ["passes:read"], tenant_id="acme")
            tls_server.remember(created.secret)
            answer = client.verify(created.secret, ["passes:read"], tenant_id="acme")
        assert answer.http_status == 200
        assert f"(port {tls_server.port}, TLS)" in tls_server.log()

    def test_a_target_list_over_tls_checks_the_first_name(
        self, tls_server: ServerProcess, certificates: Certificates
    ) -> None:
        """ "localhost:P,localhost:P" becomes an ipv4: target; TLS still checks the certificate
        against the name given (the authority), which the test certificate holds."""
        target = f"localhost:{tls_server.port},localhost:{tls_server.port}"
        credentials = tls_credentials(certificates.ca)
        with ApiKeysClient(target, tls_server.admin_key, credentials=credentials) as client:
            assert client.list_scopes()

    def test_a_plaintext_client_is_refused(self, tls_server: ServerProcess) -> None:
        """No plaintext on a TLS port."""
        assert not serving(tls_server, None)

    def test_a_client_trusting_another_ca_is_refused(
        self, tls_server: ServerProcess, certificates: Certificates
    ) -> None:
        """The client checks the server's certificate against its CA."""
        assert not serving(tls_server, tls_credentials(certificates.other_ca))
        assert serving(tls_server, tls_credentials(certificates.ca))

    def test_grpcurl_with_cacert(
        self, tls_server: ServerProcess, certificates: Certificates
    ) -> None:
        """grpcurl -cacert lists the services (reflection) over TLS."""
        done = subprocess.run(
            [str(grpcurl_path()), "-cacert", str(certificates.ca), tls_server.target, "list"],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert done.returncode == 0, done.stderr
        assert "apikeys.v1.KeyVerifier" in done.stdout


class TestClientCertificates:
    def test_without_a_client_certificate_refused(
        self, mtls_server: ServerProcess, certificates: Certificates
    ) -> None:
        """The server trusts the client CA only for callers that present a certificate."""
        assert not serving(mtls_server, tls_credentials(certificates.ca))

    def test_a_certificate_of_another_ca_is_refused(
        self, mtls_server: ServerProcess, certificates: Certificates
    ) -> None:
        """A client certificate must chain to --tls-client-ca-file."""
        certs = certificates
        wrong = tls_credentials(certs.ca, certs.other_client_cert, certs.other_client_key)
        assert not serving(mtls_server, wrong)

    def test_the_right_certificate_is_accepted(
        self, mtls_server: ServerProcess, certificates: Certificates
    ) -> None:
        """With the CA's client certificate, calls work (the API key is still checked)."""
        certs = certificates
        assert serving(mtls_server, tls_credentials(certs.ca, certs.client_cert, certs.client_key))
        with mtls_server.client() as client:
            assert client.list_scopes()
        assert "TLS, client certificates required" in mtls_server.log()

    def test_grpcurl_with_client_certificate(
        self, mtls_server: ServerProcess, certificates: Certificates
    ) -> None:
        """grpcurl -cacert -cert -key calls a method with the admin key."""
        certs = certificates
        done = subprocess.run(
            [
                str(grpcurl_path()),
                *("-cacert", str(certs.ca), "-cert", str(certs.client_cert)),
                *("-key", str(certs.client_key), "-H", f"x-api-key: {mtls_server.admin_key}"),
                mtls_server.target,
                "apikeys.v1.KeyManager/ListScopes",
            ],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert done.returncode == 0, done.stderr
        assert "passes:read" in done.stdout


class TestReadme:
    def test_tls_examples_run_against_an_mtls_server(
        self,
        mtls_server: ServerProcess,
        certificates: Certificates,
        monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str],
    ) -> None:
        """The README's TLS grpcurl and Python examples, in a directory holding the files
        they name (ca.pem, client.pem, client.key)."""
        blocks = grpcurl_blocks(tls=True)
        assert blocks
        env = {**os.environ, "ADMIN": mtls_server.admin_key, "GRPCURL": str(grpcurl_path())}
        for block in blocks:
            script = block.replace("localhost:50051", mtls_server.target)
            done = subprocess.run(
                ["bash", "-euo", "pipefail", "-c", script],
                capture_output=True,
                text=True,
                env=env,
                cwd=certificates.directory,
                timeout=60,
                check=False,
            )
            assert done.returncode == 0, f"{script}\n---\n{done.stdout}\n{done.stderr}"
        monkeypatch.chdir(certificates.directory)
        [example] = [block for block in python_examples() if "tls_credentials" in block]
        code = example.replace("localhost:50051", mtls_server.target)
        exec(compile(code, "README.md", "exec"), {"ADMIN": mtls_server.admin_key})
        assert int(capsys.readouterr().out) > 0


class TestReload:
    @pytest.mark.parametrize("processes", [1, 2], ids=["one-process", "two-processes"])
    def test_a_rotated_certificate_is_served_without_restart(
        self,
        server_factory: ServerFactory,
        certificates: Certificates,
        tmp_path: Path,
        processes: int,
    ) -> None:
        """Overwrite the files with a certificate of a new CA: new connections get it (each
        worker builds its own credentials after the fork), and the old CA no longer verifies."""
        live = tmp_path / "live"
        live.mkdir()
        cert, key = live / "server.pem", live / "server.key"
        shutil.copy(certificates.server_cert, cert)
        shutil.copy(certificates.server_key, key)
        old = tls_credentials(certificates.ca)
        server = server_factory(
            args=[
                "--tls-cert-file", str(cert), "--tls-key-file", str(key),
                "--processes", str(processes),
            ],
            credentials=old,
        )  # fmt: skip
        assert serving(server, old)

        new_ca = Authority.make(tmp_path, "new-ca")
        new_cert, new_key = new_ca.issue(tmp_path, "new-server", server=True)
        # Key first, then certificate: in between the files disagree and are not taken.
        shutil.copy(new_key, key)
        shutil.copy(new_cert, cert)
        new = tls_credentials(new_ca.cert)
        deadline = time.monotonic() + RELOAD_BOUND_SECONDS
        # Every worker must serve the new certificate and refuse the old one: connections
        # land on workers as the kernel hashes them, and a worker re-reads the files only when
        # a handshake reaches it, so ask several in a row, each on a new connection.
        in_a_row = 0
        while in_a_row < 4 * processes:
            assert time.monotonic() < deadline, f"old certificate still served:\n{server.log()}"
            fresh = serving(server, new) and not serving(server, old)
            in_a_row = in_a_row + 1 if fresh else 0
        assert "new connections get the certificate" in server.log()


class TestBadFiles:
    @pytest.mark.parametrize(
        ("which", "named"),
        [
            ("missing-cert", "--tls-cert-file / APIKEYS_TLS_CERT_FILE"),
            ("key-of-another", "--tls-key-file / APIKEYS_TLS_KEY_FILE"),
            ("ca-not-pem", "--tls-client-ca-file / APIKEYS_TLS_CLIENT_CA_FILE"),
        ],
    )
    def test_unusable_files_exit_2_with_one_line(
        self, certificates: Certificates, tmp_path: Path, which: str, named: str
    ) -> None:
        """Named by flag, variable and file; nothing starts, no traceback."""
        certs = certificates
        cert, key, ca = certs.server_cert, certs.server_key, certs.ca
        if which == "missing-cert":
            cert = tmp_path / "missing.pem"
        elif which == "key-of-another":
            key = certs.client_key
        else:
            ca = tmp_path / "ca.txt"
            ca.write_text("not a certificate\n")
        bad = {"missing-cert": cert, "key-of-another": key, "ca-not-pem": ca}[which]
        env = {"APIKEYS_TLS_CLIENT_CA_FILE": str(ca)}
        url = f"sqlite:///{tmp_path / 'apikeys.db'}"
        done = run_cli(
            "serve", "--database-url", url, "--listen", f"127.0.0.1:{free_port()}",
            "--tls-cert-file", str(cert), "--tls-key-file", str(key), env=env,
        )  # fmt: skip
        assert done.returncode == 2, done.stderr
        lines = done.stderr.splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"apikeys-server: {named} {bad}: "), lines
        assert not (tmp_path / "apikeys.db").exists()


class TestPlaintextWarning:
    @pytest.mark.parametrize(("host", "warned"), [("0.0.0.0", True), ("127.0.0.1", False)])
    def test_plaintext_off_loopback_is_warned_once(self, host: str, warned: bool) -> None:
        """Logged at start, before the database is touched (here: one nobody answers on)."""
        url = f"postgresql://apikeys@127.0.0.1:{free_port()}/apikeys"
        done = run_cli("serve", "--database-url", url, "--listen", f"{host}:{free_port()}")
        assert done.returncode == 1, done.stderr
        assert done.stderr.count("serving plaintext on") == (1 if warned else 0), done.stderr
