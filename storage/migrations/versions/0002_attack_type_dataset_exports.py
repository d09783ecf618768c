"""Cases get an attack type (set by the analyst; the queue filters on it) and an index on created_at
(the queue's order). Dataset exports are recorded: dataset_exports (who, when, where, the manifest and
file hashes) and dataset_export_items (which investigations, at which review version, with which label).

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-22
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "dataset_exports",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("folder", sa.Text(), nullable=False),
        sa.Column("format", sa.String(length=64), nullable=False),
        sa.Column("manifest_sha256", sa.String(length=64), nullable=False),
        sa.Column("files", sa.JSON(), nullable=False),
        sa.Column("counts", sa.JSON(), nullable=False),
        sa.Column("created_by", sa.String(length=128), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_dataset_exports")),
    )
    op.create_table(
        "dataset_export_items",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("dataset_export_id", sa.Integer(), nullable=False),
        sa.Column("investigation_id", sa.String(length=32), nullable=False),
        sa.Column("review_version", sa.Integer(), nullable=False),
        sa.Column("label", sa.String(length=16), nullable=False),
        sa.ForeignKeyConstraint(
            ["dataset_export_id"],
            ["dataset_exports.id"],
            name=op.f("fk_dataset_export_items_dataset_export_id_dataset_exports"),
        ),
        sa.ForeignKeyConstraint(
            ["investigation_id"],
            ["investigations.id"],
            name=op.f("fk_dataset_export_items_investigation_id_investigations"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_dataset_export_items")),
        sa.UniqueConstraint(
            "dataset_export_id", "investigation_id", name=op.f("uq_dataset_export_items_dataset_export_id")
        ),
    )
    with op.batch_alter_table("dataset_export_items", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_dataset_export_items_investigation_id"), ["investigation_id"], unique=False
        )

    with op.batch_alter_table("cases", schema=None) as batch_op:
        batch_op.add_column(sa.Column("attack_type", sa.String(length=32), nullable=True))
        batch_op.create_index(batch_op.f("ix_cases_attack_type"), ["attack_type"], unique=False)
        batch_op.create_index(batch_op.f("ix_cases_created_at"), ["created_at"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("cases", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_cases_created_at"))
        batch_op.drop_index(batch_op.f("ix_cases_attack_type"))
        batch_op.drop_column("attack_type")

    with op.batch_alter_table("dataset_export_items", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_dataset_export_items_investigation_id"))

    op.drop_table("dataset_export_items")
    op.drop_table("dataset_exports")
