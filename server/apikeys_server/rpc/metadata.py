import grpc

CALLER_KEY_HEADER = "x-api-key"


def caller_key(context: grpc.ServicerContext) -> str | None:
    """The caller's own key, from the ``x-api-key`` metadata."""
    for name, value in context.invocation_metadata():
        if name == CALLER_KEY_HEADER:
            return value if isinstance(value, str) else None
    return None
