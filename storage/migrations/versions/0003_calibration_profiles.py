"""Calibration profiles (core.calibration) kept in the workbench: calibration_profiles (the profile's JSON
under its content hash) and calibration_activations (which profile new investigations use, from when, by
whom; the latest row is the active one). Investigations get the id of the profile they were calibrated
with and a note when an active profile was not applied; runs recorded before keep NULL in both.

Profiles and activations are never changed or deleted: the same triggers as the audit log's refuse it.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-30
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

FK_RUN_PROFILE = "fk_investigations_calibration_profile_id_calibration_profiles"
APPEND_ONLY = ("calibration_profiles", "calibration_activations")
_PG_FUNCTION = "calibration_append_only"


def upgrade() -> None:
    op.create_table(
        "calibration_profiles",
        sa.Column("id", sa.String(length=12), nullable=False),
        sa.Column("name", sa.Text(), nullable=False),
        sa.Column("policy", sa.String(length=64), nullable=False),
        sa.Column("policy_version", sa.String(length=128), nullable=False),
        sa.Column("profile", sa.JSON(), nullable=False),
        sa.Column("created_by", sa.String(length=128), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_calibration_profiles")),
    )
    op.create_table(
        "calibration_activations",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("profile_id", sa.String(length=12), nullable=True),
        sa.Column("activated_by", sa.String(length=128), nullable=False),
        sa.Column("activated_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["profile_id"],
            ["calibration_profiles.id"],
            name=op.f("fk_calibration_activations_profile_id_calibration_profiles"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_calibration_activations")),
    )
    op.create_index(
        op.f("ix_calibration_activations_profile_id"), "calibration_activations", ["profile_id"], unique=False
    )

    if op.get_bind().dialect.name == "sqlite":
        # SQLite adds a column with a REFERENCES clause in place. Batch mode would copy the investigations
        # table instead, and dropping the old copy fails under foreign keys once turns and reviews point to it.
        op.execute(
            "ALTER TABLE investigations ADD COLUMN calibration_profile_id VARCHAR(12) "
            f"CONSTRAINT {FK_RUN_PROFILE} REFERENCES calibration_profiles (id)"
        )
    else:
        op.add_column("investigations", sa.Column("calibration_profile_id", sa.String(length=12), nullable=True))
        op.create_foreign_key(
            op.f(FK_RUN_PROFILE), "investigations", "calibration_profiles", ["calibration_profile_id"], ["id"]
        )
    op.add_column("investigations", sa.Column("calibration_note", sa.Text(), nullable=True))
    op.create_index(
        op.f("ix_investigations_calibration_profile_id"), "investigations", ["calibration_profile_id"], unique=False
    )
    _append_only()


def downgrade() -> None:
    _drop_append_only_guards()
    op.drop_index(op.f("ix_investigations_calibration_profile_id"), table_name="investigations")
    if op.get_bind().dialect.name == "sqlite":
        # In place (SQLite 3.35+), for the reason given in upgrade(): a batch copy fails once runs exist.
        op.execute("ALTER TABLE investigations DROP COLUMN calibration_profile_id")
    else:
        op.drop_constraint(op.f(FK_RUN_PROFILE), "investigations", type_="foreignkey")
        op.drop_column("investigations", "calibration_profile_id")
    op.drop_column("investigations", "calibration_note")
    op.drop_index(op.f("ix_calibration_activations_profile_id"), table_name="calibration_activations")
    op.drop_table("calibration_activations")
    op.drop_table("calibration_profiles")


# As for the audit log (0001): the ORM refuses changes (storage/calibration.py), these triggers refuse raw SQL.
def _guards(table: str) -> dict[str, str]:
    return {"UPDATE": f"{table}_no_update", "DELETE": f"{table}_no_delete"}


def _append_only() -> None:
    dialect = op.get_bind().dialect.name
    message = "calibration profiles and their activations are append-only"
    if dialect == "postgresql":
        op.execute(
            f"CREATE FUNCTION {_PG_FUNCTION}() RETURNS trigger AS $$ "
            f"BEGIN RAISE EXCEPTION '{message}' USING ERRCODE = 'restrict_violation'; END; "
            "$$ LANGUAGE plpgsql"
        )
    for table in APPEND_ONLY:
        for verb, name in _guards(table).items():
            if dialect == "sqlite":
                op.execute(
                    f"CREATE TRIGGER {name} BEFORE {verb} ON {table} BEGIN SELECT RAISE(ABORT, '{message}'); END"
                )
            elif dialect == "postgresql":
                op.execute(
                    f"CREATE TRIGGER {name} BEFORE {verb} ON {table} FOR EACH ROW EXECUTE FUNCTION {_PG_FUNCTION}()"
                )
        if dialect == "postgresql":
            op.execute(
                f"CREATE TRIGGER {table}_no_truncate BEFORE TRUNCATE ON {table} "
                f"FOR EACH STATEMENT EXECUTE FUNCTION {_PG_FUNCTION}()"
            )


def _drop_append_only_guards() -> None:
    dialect = op.get_bind().dialect.name
    for table in APPEND_ONLY:
        names = list(_guards(table).values())
        if dialect == "sqlite":
            for name in names:
                op.execute(f"DROP TRIGGER IF EXISTS {name}")
        elif dialect == "postgresql":
            for name in [*names, f"{table}_no_truncate"]:
                op.execute(f"DROP TRIGGER IF EXISTS {name} ON {table}")
    if dialect == "postgresql":
        op.execute(f"DROP FUNCTION IF EXISTS {_PG_FUNCTION}()")
