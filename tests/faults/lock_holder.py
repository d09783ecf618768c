"""Another writer: ``lock_holder.py DB SECONDS`` takes SQLite's exclusive lock on DB (BEGIN EXCLUSIVE),
says ``locked``, holds it for SECONDS, then commits and says ``released``."""

import sqlite3
import sys
import time

conn = sqlite3.connect(sys.argv[1], isolation_level=None)
conn.execute("BEGIN EXCLUSIVE")
print("locked", flush=True)
time.sleep(float(sys.argv[2]))
conn.execute("COMMIT")
print("released", flush=True)
