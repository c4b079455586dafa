"""Who may watch the change feed, from where, and which changes they are sent."""

from collections.abc import Callable, Iterator
from dataclasses import replace

from apikeys_server.domain import scopes as reserved
from apikeys_server.domain.access import Caller
from apikeys_server.domain.errors import InvalidArgument
from apikeys_server.domain.ports import ChangeSource, FeedUpdate

# The watch contract promises a message at least every second.
HEARTBEAT_SECONDS = 0.5


def watch_changes(
    caller: Caller,
    tenant_id: str,
    after_position: int,
    source: ChangeSource,
    active: Callable[[], bool],
) -> Iterator[FeedUpdate]:
    """The changes of the tenant(s) the caller may see, after ``after_position`` (0: from now)."""
    caller.require(reserved.VERIFY)
    # Platform keys may watch every tenant at once; anyone else acts on one tenant.
    tenant = None if caller.is_platform and not tenant_id else caller.resolve_tenant(tenant_id)
    if after_position < 0:
        raise InvalidArgument(
            "after_position must not be negative",
            reason="NEGATIVE_AFTER_POSITION",
            field="after_position",
        )
    if after_position == 0:
        after_position = source.position
    else:
        head = source.head()
        if after_position > head:
            raise InvalidArgument(
                f"after_position {after_position} is beyond the feed's head ({head}); "
                "was it given by another deployment? Watch from 0",
                reason="AFTER_POSITION_BEYOND_HEAD",
                field="after_position",
            )
    for update in source.updates(after_position, HEARTBEAT_SECONDS, active):
        if tenant is not None and update.changes:
            update = replace(update, changes=[c for c in update.changes if c.tenant_id == tenant])
        yield update
