#!/usr/bin/env python3
"""The fuzz campaign of tests/test_fuzz.py, at scale: python bench/fuzz.py [--requests 100000] [--seed N]

Starts `python wabhook.py serve` on 127.0.0.1 in a temp dir, sends the seeded mutated requests over
raw sockets (one connection each, 1 to 3 requests pipelined), and prints the statuses received, the
server's peak RSS, and the checks: no 5xx but 505, every acknowledged id in the inbox, every stored
event parseable. Exits 1 if a check fails. Traffic goes to 127.0.0.1 only.
"""

import argparse
import json
import os
import random
import re
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from tests.support import load_samples  # noqa: E402
from tests.test_fuzz import exchange, request, responses  # noqa: E402

import wabhook  # noqa: E402


def start(tmp):
    log_path = os.path.join(tmp, "server.log")
    with open(log_path, "wb") as log:
        process = subprocess.Popen([sys.executable, os.path.join(ROOT, "wabhook.py"), "serve", "--host",
                                    "127.0.0.1", "--port", "0", "--db", os.path.join(tmp, "wabhook.db"),
                                    "--handlers", os.path.join(tmp, "handlers"), "--max-body", "64KiB",
                                    "--timeout", "2s"], stdout=log, stderr=log)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        with open(log_path, errors="replace") as handle:
            match = re.search(r"listening on http://[^:]+:(\d+)", handle.read())
        if match:
            return process, int(match.group(1))
        time.sleep(0.05)
    process.kill()
    raise SystemExit("the server did not start")


def peak_rss_mb(pid):
    with open("/proc/%d/status" % pid) as status:
        return int(re.search(r"VmHWM:\s+(\d+)", status.read()).group(1)) / 1024


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=100000, help="connections to open (default 100000)")
    parser.add_argument("--seed", type=int, default=20261125)
    args = parser.parse_args()
    tmp = tempfile.mkdtemp(prefix="wabhook-fuzz-")
    os.mkdir(os.path.join(tmp, "handlers"))
    process, port = start(tmp)
    rng, samples = random.Random(args.seed), load_samples()
    acked, statuses, started = set(), {}, time.monotonic()
    try:
        for _ in range(args.requests):
            payload = b"".join(request(rng, samples) for _ in range(rng.choice([1, 1, 1, 2, 3])))
            received = exchange(port, payload)
            for status, body in responses(received):
                statuses[status] = statuses.get(status, 0) + 1
                if status == 200 and body.startswith(b'{"ok": true, "id"'):
                    acked.add(json.loads(body)["id"])
        alive = process.poll() is None
        rss = peak_rss_mb(process.pid) if alive else float("nan")
    finally:
        process.terminate()
        process.wait(timeout=30)
    connection = sqlite3.connect(os.path.join(tmp, "wabhook.db"))
    rows = dict(connection.execute("SELECT id, body FROM events"))
    connection.close()
    unparseable = 0
    for event_id, body in rows.items():
        try:
            wabhook.parse_event(json.loads(body), None, event_id)
        except Exception:
            unparseable += 1
    faults = sorted(status for status in statuses if status >= 500 and status != 505)
    print("%d connections in %.1f s, seed %d; statuses: %s" % (
        args.requests, time.monotonic() - started, args.seed,
        ", ".join("%d x%d" % item for item in sorted(statuses.items()))))
    print("server alive at the end: %s; peak RSS %.1f MB" % (alive, rss))
    print("acknowledged %d, missing from the inbox %d, stored %d, unparseable %d, 5xx other than 505: %s" % (
        len(acked), len(acked - set(rows)), len(rows), unparseable, faults or "none"))
    shutil.rmtree(tmp, ignore_errors=True)
    return 0 if alive and not faults and not (acked - set(rows)) and not unparseable else 1


if __name__ == "__main__":
    sys.exit(main())
