"""The README's grpcurl examples, run as written against a real server process."""

import os
import re
import subprocess
from pathlib import Path

import pytest

from tests.e2e.conftest import ServerFactory, grpcurl_path

README = Path(__file__).resolve().parents[2] / "README.md"
SHELL_BLOCK = re.compile(r"```sh\n(.*?)```", re.DOTALL)
# Lines that set up the reader's shell; the test provides these variables itself.
SETUP_LINE = re.compile(r"^(ADMIN|GRPCURL|KEY)=")


def grpcurl_blocks(tls: bool = False) -> list[str]:
    """The README's grpcurl blocks: plaintext ones, or (``tls``) those with ``-cacert``."""
    blocks = [
        block
        for block in SHELL_BLOCK.findall(README.read_text())
        if "$GRPCURL" in block and ("-cacert" in block) == tls
    ]
    return [
        "\n".join(line for line in block.splitlines() if not SETUP_LINE.match(line))
        for block in blocks
    ]


def python_examples() -> list[str]:
    """The client example first; then the asyncio, several-servers, caching and TLS ones."""
    return re.findall(r"```python\n(.*?)```", README.read_text(), re.DOTALL)


@pytest.mark.e2e
class TestReadmeExamples:
    def test_readme_has_grpcurl_examples(self) -> None:
        """The README shows grpcurl for the first key, Verify and the lifecycle."""
        assert len(grpcurl_blocks()) >= 3

    def test_every_grpcurl_example_runs(self, server_factory: ServerFactory) -> None:
        """Each README grpcurl block exits 0 against a live server, with its placeholders filled."""
        server = server_factory()
        with server.client() as client:
            created = client.create_key("crm-sync-prod", ["passes:read"], tenant_id="acme")
        key_id, secret = created.key.id, server.remember(created.secret)
        env = {
            **os.environ,
            "ADMIN": server.admin_key,
            "GRPCURL": str(grpcurl_path()),
            "KEY": secret,
        }
        for block in grpcurl_blocks():
            script = block.replace("localhost:50051", server.target).replace("key_…", key_id)
            result = subprocess.run(
                ["bash", "-euo", "pipefail", "-c", script],
                capture_output=True,
                text=True,
                env=env,
                timeout=60,
                check=False,
            )
            assert result.returncode == 0, f"{script}\n---\n{result.stdout}\n{result.stderr}"
            assert "ERROR" not in result.stderr

    def test_python_client_example_runs(
        self, server_factory: ServerFactory, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """The README's Python client example runs as written and prints 200 for its key."""
        server = server_factory()
        example = python_examples()[0]
        code = example.replace("localhost:50051", server.target)
        exec(compile(code, "README.md", "exec"), {"ADMIN": server.admin_key})
        printed = capsys.readouterr().out.splitlines()
        assert printed[0] == "200"
        assert "crm-sync-prod" in printed[1]

    @pytest.mark.parametrize(
        ("marker", "expected"),
        [
            ("AsyncApiKeysClient(", "200"),
            ("localhost:50052", "True"),
            ("CachingVerifier(client", "200"),
        ],
    )
    def test_client_feature_examples_run(
        self,
        server_factory: ServerFactory,
        capsys: pytest.CaptureFixture[str],
        marker: str,
        expected: str,
    ) -> None:
        """The asyncio, several-servers and caching examples run as written (both addresses
        of the list pointed at the test server) and print what their comments say."""
        server = server_factory()
        [example] = [block for block in python_examples() if marker in block]
        code = example.replace("localhost:50051", server.target).replace(
            "localhost:50052", server.target
        )
        exec(compile(code, "README.md", "exec"), {"ADMIN": server.admin_key})
        assert capsys.readouterr().out.splitlines()[0] == expected
