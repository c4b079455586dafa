"""The tripwire's event time: when the last PRESENTED_AFTER_REVOCATION event of a key was
written, so that every process and replica on one database agrees on "at most one a minute".

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-28
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Null on existing rows: their next presentation writes an event, as a first one would.
    with op.batch_alter_table("api_keys") as batch:
        batch.add_column(
            sa.Column("presented_event_time", sa.DateTime(timezone=True), nullable=True)
        )


def downgrade() -> None:
    with op.batch_alter_table("api_keys") as batch:
        batch.drop_column("presented_event_time")
