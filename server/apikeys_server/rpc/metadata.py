import grpc

from apikeys_server.domain.errors import Unauthenticated

CALLER_KEY_HEADER = "x-api-key"


def caller_key(context: grpc.ServicerContext) -> str | None:
    """The caller's own key, from the ``x-api-key`` metadata; several values are refused, or a
    proxy that appends a header could pair a valid key with one nobody checked."""
    found: str | bytes | None = None
    for name, value in context.invocation_metadata():
        if name == CALLER_KEY_HEADER:
            if found is not None:
                raise Unauthenticated(
                    "several x-api-key values: send exactly one x-api-key",
                    reason="DUPLICATE_CALLER_KEY",
                )
            found = value
    return found if isinstance(found, str) else None
