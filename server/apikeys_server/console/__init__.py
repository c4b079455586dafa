"""The admin console: ``apikeys-server console``, a web page beside the gRPC server.

It is a client of the service like any other (``ApiKeysClient`` with the operator's key), so
authorization, validation, audit events and "the secret is shown once" stay in the service.
Starlette routes (``app.py``), Jinja2 templates, htmx (``static/htmx.min.js``, vendored), a
server-side session store (``session.py``) and CSRF tokens (``csrf.py``); served by uvicorn.
"""

import contextlib
import logging
import signal
from collections.abc import Iterator

import grpc
import uvicorn

from apikeys_client import tls_credentials
from apikeys_server.config import ConsoleSettings, host_port, is_loopback
from apikeys_server.console.app import Console, build

log = logging.getLogger(__name__)

__all__ = ["Console", "build", "credentials_for", "serve"]


def credentials_for(settings: ConsoleSettings) -> grpc.ChannelCredentials | None:
    """The channel credentials the operator command would use for the same TLS options."""
    if not settings.grpc_tls:
        return None
    return tls_credentials(settings.tls_ca_file, settings.tls_cert_file, settings.tls_key_file)


def serve(settings: ConsoleSettings) -> int:
    """Serves until SIGINT/SIGTERM (uvicorn's own handlers)."""
    parts = host_port(settings.listen)
    assert parts is not None  # ConsoleSettings checked it
    host, port = parts
    if not settings.https and not is_loopback(settings.listen):
        log.warning(
            "console on plain HTTP at %s: operators' keys cross the network readable; give "
            "--https-cert-file and --https-key-file, or put it behind a TLS proxy",
            settings.listen,
        )
    app = build(settings, credentials_for(settings))
    config = uvicorn.Config(
        app,
        host=host,
        port=int(port),
        ssl_certfile=settings.https_cert_file,
        ssl_keyfile=settings.https_key_file,
        log_config=None,  # the root logger, as apikeys_server.logs configured it
        server_header=False,
        proxy_headers=False,
    )
    log.info("console on %s for the service at %s", settings.listen, settings.target)
    _Server(config).run()
    return 0


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        """SIGTERM/SIGINT start the graceful shutdown, as uvicorn's own handlers do, but are
        not raised again afterwards: a console that stopped cleanly when asked exits 0, like
        ``serve``."""
        stops = (signal.SIGINT, signal.SIGTERM)
        previous = {stop: signal.signal(stop, self.handle_exit) for stop in stops}
        try:
            yield
        finally:
            for stop, handler in previous.items():
                signal.signal(stop, handler)
