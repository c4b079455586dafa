"""Rules for the names and identifiers callers send."""

import re
from typing import Final

from apikeys_server.domain.errors import InvalidArgument

NAME_PATTERN: Final = re.compile(r"[A-Za-z0-9._-]{1,64}")
# Tenant ids start with a letter or digit, so the platform tenant "_platform" cannot collide.
TENANT_PATTERN: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
PLATFORM_TENANT: Final = "_platform"
KEY_ID_PATTERN: Final = re.compile(r"key_[a-z0-9]{1,40}")
MAX_REASON_LENGTH: Final = 256
# AIP-155 request ids: a UUID, or any client-chosen printable ASCII string.
REQUEST_ID_PATTERN: Final = re.compile(r"[\x20-\x7e]{1,64}")


def shown(text: str) -> str:
    """A caller's value quoted for an error message, cut short so a huge input is not echoed."""
    return repr(text if len(text) <= 64 else text[:64] + "…")


def validate_name(name: str) -> str:
    if not NAME_PATTERN.fullmatch(name):
        raise InvalidArgument(
            f"name {shown(name)} must be 1-64 letters, digits, '.', '_' or '-' "
            "and say the owning system and environment, e.g. 'crm-sync-prod'",
            reason="INVALID_NAME",
            field="name",
        )
    return name


def validate_tenant(tenant_id: str) -> str:
    if tenant_id == PLATFORM_TENANT:
        return tenant_id
    if not tenant_id:
        raise InvalidArgument("tenant_id is required", reason="TENANT_REQUIRED", field="tenant_id")
    if not TENANT_PATTERN.fullmatch(tenant_id):
        raise InvalidArgument(
            f"tenant_id {shown(tenant_id)} must be 1-64 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit",
            reason="INVALID_TENANT_ID",
            field="tenant_id",
        )
    return tenant_id


def validate_key_id(key_id: str) -> str:
    if not key_id:
        raise InvalidArgument("key_id is required", reason="KEY_ID_REQUIRED", field="key_id")
    if not KEY_ID_PATTERN.fullmatch(key_id):
        raise InvalidArgument(
            f"key_id {shown(key_id)} is not a key id (e.g. 'key_0f3k…')",
            reason="INVALID_KEY_ID",
            field="key_id",
        )
    return key_id


def validate_reason(reason: str) -> str:
    if len(reason) > MAX_REASON_LENGTH:
        raise InvalidArgument(
            f"reason is at most {MAX_REASON_LENGTH} characters",
            reason="REASON_TOO_LONG",
            field="reason",
        )
    return reason


def validate_request_id(request_id: str) -> str | None:
    """None for an empty request_id (no deduplication), else the id itself."""
    if not request_id:
        return None
    if not REQUEST_ID_PATTERN.fullmatch(request_id):
        raise InvalidArgument(
            f"request_id {shown(request_id)} must be 1-64 printable ASCII characters, e.g. a UUID"
        )
    return request_id
