"""The append-only tables refuse a row's replacement, and the audit log becomes tamper-evident.

- A BEFORE INSERT trigger on audit_events, calibration_profiles and calibration_activations refuses an
  INSERT whose id is already there. The UPDATE and DELETE triggers (0001, 0003) do not see SQLite's
  ``INSERT OR REPLACE``: its implicit delete fires no trigger unless ``recursive_triggers`` is on. The new
  trigger runs before the conflict is resolved, so REPLACE, ``INSERT OR IGNORE`` and ``ON CONFLICT``
  (SQLite and PostgreSQL) all fail on an existing id, whatever the pragma.
- audit_events.chain_hash (storage.audit.chain_hash), filled in id order for the rows already there.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-07
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from storage.audit import GENESIS, row_hash

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

MESSAGES = {  # the message of each table's existing guards (0001, 0003)
    "audit_events": "the audit log is append-only",
    "calibration_profiles": "calibration profiles and their activations are append-only",
    "calibration_activations": "calibration profiles and their activations are append-only",
}
_PG_FUNCTION = "append_only_no_replace"
_AUDIT_GUARDS = {"UPDATE": "audit_events_no_update", "DELETE": "audit_events_no_delete"}  # as made in 0001


def upgrade() -> None:
    dialect = op.get_bind().dialect.name
    # The backfill updates audit rows: the update guard steps aside inside this transaction only.
    if dialect == "sqlite":
        op.execute(f"DROP TRIGGER {_AUDIT_GUARDS['UPDATE']}")
    elif dialect == "postgresql":
        op.execute(f"ALTER TABLE audit_events DISABLE TRIGGER {_AUDIT_GUARDS['UPDATE']}")
    op.add_column("audit_events", sa.Column("chain_hash", sa.String(length=64), nullable=True))
    _backfill()
    if dialect == "sqlite":
        # NOT NULL needs a copy of the table in SQLite; the copy has no triggers: make 0001's again.
        with op.batch_alter_table("audit_events", recreate="always") as batch_op:
            batch_op.alter_column("chain_hash", existing_type=sa.String(length=64), nullable=False)
        for verb, name in _AUDIT_GUARDS.items():
            op.execute(
                f"CREATE TRIGGER {name} BEFORE {verb} ON audit_events "
                f"BEGIN SELECT RAISE(ABORT, '{MESSAGES['audit_events']}'); END"
            )
    else:
        if dialect == "postgresql":
            op.execute(f"ALTER TABLE audit_events ENABLE TRIGGER {_AUDIT_GUARDS['UPDATE']}")
        op.alter_column("audit_events", "chain_hash", existing_type=sa.String(length=64), nullable=False)
    _no_replace()


def downgrade() -> None:
    dialect = op.get_bind().dialect.name
    for table in MESSAGES:
        if dialect == "sqlite":
            op.execute(f"DROP TRIGGER IF EXISTS {table}_no_replace")
        elif dialect == "postgresql":
            op.execute(f"DROP TRIGGER IF EXISTS {table}_no_replace ON {table}")
    if dialect == "postgresql":
        op.execute(f"DROP FUNCTION IF EXISTS {_PG_FUNCTION}()")
    if dialect == "sqlite":
        op.execute("ALTER TABLE audit_events DROP COLUMN chain_hash")  # in place (SQLite 3.35+): keeps the triggers
    else:
        op.drop_column("audit_events", "chain_hash")


def _backfill() -> None:
    bind = op.get_bind()
    # The columns with the models' types, so values read back as storage.audit hashes them (UTC times, JSON).
    from storage.models import AuditEvent

    table = AuditEvent.__table__
    prev, hashes = GENESIS, []
    for row in bind.execute(sa.select(table).order_by(table.c.id)):
        prev = row_hash(prev, row)
        hashes.append({"rid": row.id, "h": prev})
    if hashes:
        bind.execute(
            sa.update(table).where(table.c.id == sa.bindparam("rid")).values(chain_hash=sa.bindparam("h")), hashes
        )


def _no_replace() -> None:
    dialect = op.get_bind().dialect.name
    if dialect == "postgresql":
        # One function for the three tables: TG_ARGV[0] is the table's message. restrict_violation, as the
        # update and delete guards raise.
        op.execute(
            f"CREATE FUNCTION {_PG_FUNCTION}() RETURNS trigger AS $$ "
            "DECLARE found boolean; "
            "BEGIN "
            "EXECUTE format('SELECT EXISTS (SELECT 1 FROM %I.%I WHERE id = $1)', TG_TABLE_SCHEMA, TG_TABLE_NAME) "
            "INTO found USING NEW.id; "
            "IF found THEN RAISE EXCEPTION '%: row % cannot be replaced', TG_ARGV[0], NEW.id "
            "USING ERRCODE = 'restrict_violation'; END IF; "
            "RETURN NEW; "
            "END; $$ LANGUAGE plpgsql"
        )
    for table, message in MESSAGES.items():
        if dialect == "sqlite":
            op.execute(
                f"CREATE TRIGGER {table}_no_replace BEFORE INSERT ON {table} "
                f"WHEN EXISTS (SELECT 1 FROM {table} WHERE id = NEW.id) "
                f"BEGIN SELECT RAISE(ABORT, '{message}: a row cannot be replaced'); END"
            )
        elif dialect == "postgresql":
            op.execute(
                f"CREATE TRIGGER {table}_no_replace BEFORE INSERT ON {table} "
                f"FOR EACH ROW EXECUTE FUNCTION {_PG_FUNCTION}('{message}')"
            )
