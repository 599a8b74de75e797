#!/usr/bin/env python3
"""The naive durable receiver: the stdlib ceiling plus one fsync'd SQLite commit per request.

    python bench/naive.py --port 0 --db /tmp/naive.db

Everything as in ceiling.py, and before the 200 each event is inserted in its
own transaction (`BEGIN IMMEDIATE; INSERT ...; COMMIT`) on one connection
guarded by a lock, WAL with synchronous=FULL, no batching: the simplest
receiver that keeps "a 200 only after a durable commit". A duplicate
message_id is ignored (INSERT OR IGNORE on a unique column), as any durable
receiver must dedup. The benchmark checks its row count against the 200s.
"""

import argparse
import sqlite3
import threading
import time

from ceiling import Handler, serve

SCHEMA = """
CREATE TABLE IF NOT EXISTS events (
    id          INTEGER PRIMARY KEY,
    message_id  TEXT UNIQUE,
    received_at REAL NOT NULL,
    body        TEXT NOT NULL
)"""


class NaiveHandler(Handler):
    db = None  # one connection for every request thread, set by configure()
    lock = threading.Lock()  # sqlite3 connections are not safe to share without one

    @classmethod
    def configure(cls, args):
        # Autocommit mode (isolation_level=None): the transactions below are exactly the SQL sent.
        cls.db = sqlite3.connect(args.db, isolation_level=None, check_same_thread=False)
        cls.db.execute("PRAGMA journal_mode=WAL")
        cls.db.execute("PRAGMA synchronous=FULL")  # every COMMIT fsyncs the WAL
        cls.db.execute(SCHEMA)

    def store(self, event, raw):
        message_id = event.get("message_id") if isinstance(event, dict) else None
        with self.lock:
            self.db.execute("BEGIN IMMEDIATE")
            try:
                self.db.execute(
                    "INSERT OR IGNORE INTO events (message_id, received_at, body) VALUES (?, ?, ?)",
                    (message_id, time.time(), raw.decode("utf-8", "replace")))
            except BaseException:
                self.db.execute("ROLLBACK")
                raise
            self.db.execute("COMMIT")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--db", default="naive.db", help="SQLite file to write the events to")
    serve(NaiveHandler, parser=parser)
