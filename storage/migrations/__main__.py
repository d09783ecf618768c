"""Write a new migration after changing ``storage/models.py``::

    python -m storage.migrations revision "add case labels"

It migrates a scratch SQLite database to the newest revision and lets Alembic autogenerate the
difference into ``storage/migrations/versions``. Read and edit the file it writes (renames look like
drop + add), then run the storage tests: one of them checks that migrations and models agree.
"""

from __future__ import annotations

import sys
import tempfile

from alembic import command

from storage.db import alembic_config, init_db, make_engine


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] != "revision":
        print(__doc__, file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as scratch:
        engine = make_engine(data_dir=scratch)
        init_db(engine)
        cfg = alembic_config(engine)
        with engine.begin() as conn:
            cfg.attributes["connection"] = conn
            command.revision(cfg, message=argv[1], autogenerate=True)
        engine.dispose()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
