"""The change feed: key_changes (one row per committed change) and its pruning horizon.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-28
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "key_changes",
        sa.Column(
            "position",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            primary_key=True,
            autoincrement=True,
        ),
        sa.Column("time", sa.DateTime(timezone=True), nullable=False),
        sa.Column("tenant_id", sa.String(64), nullable=False),
        sa.Column("key_id", sa.String(40), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("digest", sa.LargeBinary(32), nullable=False),
        sqlite_autoincrement=True,
    )
    op.create_index("ix_key_changes_time", "key_changes", ["time"])
    horizon = op.create_table(
        "key_changes_horizon",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=False),
        sa.Column("pruned_through", sa.BigInteger(), nullable=False),
    )
    op.bulk_insert(horizon, [{"id": 1, "pruned_through": 0}])


def downgrade() -> None:
    op.drop_table("key_changes_horizon")
    op.drop_table("key_changes")
