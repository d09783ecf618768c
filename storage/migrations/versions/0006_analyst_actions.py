"""Analyst actions: a tool run by hand on a case is stored with the run it was looked at beside
(investigation_id), who ran it and its output image's SHA-256; it never enters the agent's trajectory.

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-30
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "analyst_actions",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("investigation_id", sa.String(length=32), nullable=False),
        sa.Column("actor", sa.String(length=128), nullable=False),
        sa.Column("tool", sa.String(length=64), nullable=False),
        sa.Column("arguments", sa.JSON(), nullable=False),
        sa.Column("stats", sa.JSON(), nullable=False),
        sa.Column("expert_p_spoof", sa.Float(), nullable=True),
        sa.Column("image_sha256", sa.String(length=64), nullable=True),
        sa.Column("elapsed_ms", sa.Float(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["investigation_id"], ["investigations.id"], name=op.f("fk_analyst_actions_investigation_id_investigations")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_analyst_actions")),
    )
    with op.batch_alter_table("analyst_actions", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_analyst_actions_investigation_id"), ["investigation_id"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("analyst_actions", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_analyst_actions_investigation_id"))
    op.drop_table("analyst_actions")
