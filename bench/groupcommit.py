#!/usr/bin/env python3
"""Issue 8's prototype, built as its text describes it, storing what wabhook stores: a reference.

    python bench/groupcommit.py --port 0 --db /tmp/prototype.db [--bare]

A thread per connection reads each request with a lean head parser (it looks
for Content-Length and validates nothing), parses the JSON body and hands the
event to a leader/follower group commit under one Condition: the first thread
to find no commit running takes every event queued so far and commits them in
one transaction, WAL with synchronous=FULL, while the others wait for theirs.
Each 200 is sent after its event's COMMIT.

The file gets wabhook's own tables and indexes (its DDL is imported), and the
batch is stored by wabhook's own Inbox._insert_events: the dedup keys looked up,
the events inserted with their keys, in the same statements. The disk work per
event is the same as wabhook's; what is left out is everything else: checks of
the request, metrics, handlers, dispatch. So this is an upper bound for a
Python receiver that stores what the SPEC asks, not a server to run.

--bare stores into a lone events table instead: no dedup key, no index.

Prints `listening on http://127.0.0.1:PORT/hook` once it accepts connections,
and serves until SIGTERM.
"""

import argparse
import json
import os
import signal
import socket
import sqlite3
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import wabhook  # noqa: E402  (the repository's wabhook.py, for its tables and its batch insert)

PATH = "/hook"
RETENTION = 7 * 86400.0  # wabhook's default dedup window


class GroupCommit:
    """Events queued by the connection threads, committed in batches by whichever thread leads."""

    def __init__(self, path, bare):
        self.db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        for pragma in ("journal_mode=WAL", "synchronous=FULL", "temp_store=MEMORY"):
            self.db.execute("PRAGMA " + pragma)
        tables = (wabhook.DDL_EVENTS,) if bare else (
            (wabhook.DDL_EVENTS, wabhook.DDL_DELIVERIES) + wabhook.DDL_INDEXES)
        for ddl in tables:
            self.db.execute(ddl)
        self.condition = threading.Condition()
        self.queue = []
        self.committing = False

    def store(self, event):
        """(inbox id, duplicate) once the event is committed; the exception if its batch failed.

        `event` is a list: the columns _insert_events takes, then a None the
        result replaces.
        """
        with self.condition:
            self.queue.append(event)
            while event[-1] is None:
                if self.committing:
                    self.condition.wait()
                    continue
                batch, self.queue, self.committing = self.queue, [], True
                self.condition.release()
                try:
                    results = self.commit([item[:-1] for item in batch])
                except Exception as exc:  # the whole batch failed: no 200 for any of it
                    results = [exc] * len(batch)
                finally:
                    self.condition.acquire()
                    self.committing = False
                for item, result in zip(batch, results):
                    item[-1] = result
                self.condition.notify_all()
        return event[-1]

    def commit(self, events):
        self.db.execute("BEGIN IMMEDIATE")
        try:
            results = wabhook.Inbox._insert_events(self.db, time.time(), events)
            self.db.execute("COMMIT")
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        return results


def content_length(head):
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return int(value)
    return 0


def serve_connection(sock, inbox, bare):
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    buffer = b""
    with sock:
        while True:
            end = buffer.find(b"\r\n\r\n")
            if end < 0:
                data = sock.recv(65536)
                if not data:
                    return
                buffer += data
                continue
            length = content_length(buffer[:end])
            buffer = buffer[end + 4:]
            while len(buffer) < length:
                data = sock.recv(65536)
                if not data:
                    return
                buffer += data
            text, buffer = buffer[:length].decode("utf-8"), buffer[length:]
            payload = json.loads(text)
            key = None if bare else wabhook.identity_key(payload, None)
            result = inbox.store([text, payload.get("event"), None, wabhook.lane_of(payload, None),
                                  key, RETENTION, None])
            if isinstance(result, Exception):
                return  # closed without a 200: the sender sends again
            reply = b'{"ok": true, "id": %d, "duplicate": %s}' % (
                result[0], b"true" if result[1] else b"false")
            sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                         b"Content-Length: %d\r\n\r\n%s" % (len(reply), reply))


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--port", type=int, default=0, help="TCP port (0 picks a free one)")
    parser.add_argument("--db", default="prototype.db", help="SQLite file to write the events to")
    parser.add_argument("--bare", action="store_true", help="a lone events table: no dedup, no index")
    args = parser.parse_args()
    inbox = GroupCommit(args.db, args.bare)
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", args.port))
    listener.listen(1024)
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(0))
    print("listening on http://127.0.0.1:%d%s" % (listener.getsockname()[1], PATH), flush=True)
    with listener:
        while True:
            sock, _address = listener.accept()
            threading.Thread(target=serve_connection, args=(sock, inbox, args.bare),
                             daemon=True).start()


if __name__ == "__main__":
    main()
