"""Queued runs survive a crash: queued_runs holds every run asked for (an upload or a re-run) from the
moment it is acknowledged, with the settings it runs with; a run is still queued while no investigation
has its id, so a restarted workbench runs it (or records it interrupted, with the reason).

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-14
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "queued_runs",
        sa.Column("id", sa.String(length=32), nullable=False),
        sa.Column("case_id", sa.String(length=32), nullable=False),
        sa.Column("rerun_of", sa.String(length=32), nullable=True),
        sa.Column("policy", sa.String(length=64), nullable=False),
        sa.Column("settings", sa.JSON(), nullable=False),
        sa.Column("source", sa.Text(), nullable=True),
        sa.Column("queued_by", sa.String(length=128), nullable=False),
        sa.Column("runner", sa.String(length=255), nullable=True),
        sa.Column("queued_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["case_id"], ["cases.id"], name=op.f("fk_queued_runs_case_id_cases")),
        sa.ForeignKeyConstraint(
            ["rerun_of"], ["investigations.id"], name=op.f("fk_queued_runs_rerun_of_investigations")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_queued_runs")),
    )
    with op.batch_alter_table("queued_runs", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_queued_runs_case_id"), ["case_id"], unique=False)
        batch_op.create_index(batch_op.f("ix_queued_runs_queued_at"), ["queued_at"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("queued_runs", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_queued_runs_queued_at"))
        batch_op.drop_index(batch_op.f("ix_queued_runs_case_id"))
    op.drop_table("queued_runs")
