"""Leaked keys: when a key was reported leaked, by whom and where (RevokeLeakedKeys); and the
tripwire: when and how often a key was presented after it stopped working.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-28
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # batch_alter_table: SQLite adds columns in place; the defaults fill existing rows.
    with op.batch_alter_table("api_keys") as batch:
        batch.add_column(sa.Column("leak_time", sa.DateTime(timezone=True), nullable=True))
        batch.add_column(sa.Column("leak_source", sa.String(64), nullable=False, server_default=""))
        batch.add_column(sa.Column("leak_url", sa.String(2048), nullable=False, server_default=""))
        # The tripwire: presented after it stopped working (revoked, leaked, expired).
        batch.add_column(
            sa.Column("presented_after_revocation_time", sa.DateTime(timezone=True), nullable=True)
        )
        batch.add_column(
            sa.Column(
                "presented_after_revocation_count", sa.Integer(), nullable=False, server_default="0"
            )
        )


def downgrade() -> None:
    with op.batch_alter_table("api_keys") as batch:
        batch.drop_column("presented_after_revocation_count")
        batch.drop_column("presented_after_revocation_time")
        batch.drop_column("leak_url")
        batch.drop_column("leak_source")
        batch.drop_column("leak_time")
