"""The fault-injection suite (issue 15): real processes killed, a full disk, a locked database, a broken
model server, reviewers racing, hostile files. Every test is marked ``faults`` (``pytest tests/faults`` or
``pytest -m faults`` runs the suite alone); the figures of every family are printed as one table at the end
of the session, and a test fails when anything was lost or wrongly written."""

from __future__ import annotations

import numpy as np
import pytest
import skimage.data
from PIL import Image

from faults.support import BATCH, LEDGER


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.nodeid.startswith("tests/faults/") or "/faults/" in str(item.path):
            item.add_marker(pytest.mark.faults)


def pytest_terminal_summary(terminalreporter):
    if not LEDGER:
        return
    cols = ["fault", "rounds", "acked", "cases lost", "turns lost", "wrong rows", "note"]
    rows = [
        [f.family, f.rounds, f.acknowledged, f.cases_lost, f.turns_lost, f.wrong_rows, f.note] for f in LEDGER.values()
    ]
    total = ["total", *(sum(r[i] for r in rows) for i in range(1, 6)), ""]
    widths = [max(len(str(r[i])) for r in [cols, *rows, total]) for i in range(len(cols))]
    tr = terminalreporter
    tr.section("fault injection: lost and wrongly written (all must be 0)")
    for r in [cols, *rows, total]:
        tr.write_line(
            "  ".join(str(v).ljust(w) if i in (0, 6) else str(v).rjust(w) for i, (v, w) in enumerate(zip(r, widths)))
        )


@pytest.fixture(scope="session")
def batch_folder(tmp_path_factory):
    """40 distinct PNG uploads of a face (the astronaut, a few pixels changed per file: 40 different files)."""
    folder = tmp_path_factory.mktemp("batch")
    base = skimage.data.astronaut()
    rng = np.random.default_rng(15)
    for i in range(BATCH):
        img = base.copy()
        img[:4, :16] = rng.integers(0, 256, size=(4, 16, 3), dtype=np.uint8)
        Image.fromarray(img).save(folder / f"upload-{i:02d}.png")
    return folder
