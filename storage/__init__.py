"""Persistence of cases, investigations, reviews and the audit log (SQLite by default, any SQLAlchemy URL).

- :mod:`storage.db` opens (and migrates) the database and the file store: ``open_storage(data_dir)``.
- :mod:`storage.filestore` keeps uploaded images and tool images once, named by their SHA-256.
- :mod:`storage.models` are the tables; :mod:`storage.migrations` makes them (Alembic).
- :mod:`storage.cases` opens cases, sets their attack type and records exports (reports, datasets).
- :mod:`storage.queries` lists the case queue (latest run + review per case) in one query.
- :mod:`storage.investigations` records the agent's events turn by turn, marks crashed runs, loads
  trajectories back for replay and re-runs.
- :mod:`storage.reviews` saves analyst reviews with a version check.
- :mod:`storage.calibration` keeps calibration profiles and which one new investigations use
  (activations, rollback), append-only and audited.
- :mod:`storage.audit` writes the append-only audit log.

Storage persists events; it never calls the model.
"""
