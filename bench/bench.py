#!/usr/bin/env python3
"""wabhook benchmark: ack latency and throughput on 127.0.0.1, standard library only.

    python bench/bench.py [--runs 3] [--requests 3000] [--clients 8]

Each scenario starts a real `python wabhook.py serve` in a temp dir, posts
distinct message events from keep-alive client threads, and prints the median
over the runs (and the spread) of:

- hung:  every handler blocked; ack latency p50/p99 and requests/s (the ack
         must not wait for handlers; the backlog goes to SQLite)
- noop:  a handler that returns at once; ack rate and the time until every
         event is delivered (end-to-end events/s)
- backlog: --backlog events pile up behind hung handlers, then the handler is
         fixed (hot reload) and the backlog drains; ack latency of --requests
         posted during the drain, and the drain rate (claiming must not slow
         down as the backlog grows)

Traffic goes to 127.0.0.1 only and is bounded by --requests.
"""

import argparse
import http.client
import json
import os
import re
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "wabhook.py")

HANDLERS = {
    "hung": "import time\n\ndef handle(event):\n    time.sleep(3600)\n",
    "noop": "def handle(event):\n    pass\n",
    "backlog": "import os, time\n\ndef handle(event):\n"
               "    while not os.path.exists(os.path.join(os.path.dirname(__file__), 'release')):\n"
               "        time.sleep(0.05)\n",
}


def start_server(tmp, handler_source, extra_args=()):
    handlers = os.path.join(tmp, "handlers")
    os.mkdir(handlers)
    with open(os.path.join(handlers, "message.py"), "w") as handle:
        handle.write(handler_source)
    log_path = os.path.join(tmp, "server.log")
    log = open(log_path, "wb")
    process = subprocess.Popen([sys.executable, SCRIPT, "serve", "--host", "127.0.0.1", "--port", "0",
                                "--db", os.path.join(tmp, "wabhook.db"), "--handlers", handlers,
                                "--shutdown-timeout", "1", "--script-timeout", "3600"] + list(extra_args),
                               stdout=log, stderr=subprocess.STDOUT)
    log.close()
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        with open(log_path) as handle:
            match = re.search(r"listening on http://[^:]+:(\d+)", handle.read())
        if match:
            return process, int(match.group(1))
        if process.poll() is not None:
            break
        time.sleep(0.05)
    process.kill()
    raise SystemExit("server did not start:\n" + open(log_path).read())


def post_all(port, requests, clients, run_id, chats=50):
    latencies = []
    lock = threading.Lock()
    errors = []

    def client(index):
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        mine = []
        for n in range(index, requests, clients):
            body = json.dumps({"event": "message", "message_id": "bench-%s-%d" % (run_id, n),
                               "chat_id": "chat-%d@s.whatsapp.net" % (n % chats), "name": "Bench",
                               "body": "hello %d" % n, "from_me": False, "timestamp": 1777180605})
            started = time.perf_counter()
            connection.request("POST", "/hook", body, {"Content-Type": "application/json"})
            response = connection.getresponse()
            response.read()
            mine.append(time.perf_counter() - started)
            if response.status != 200:
                errors.append(response.status)
        connection.close()
        with lock:
            latencies.extend(mine)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - started
    if errors:
        raise SystemExit("non-200 replies: %s" % errors[:10])
    return latencies, elapsed


def percentile(values, fraction):
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def delivered_count(db):
    connection = sqlite3.connect(db, timeout=10)
    try:
        return connection.execute("SELECT COUNT(*) FROM events WHERE status = 'done'").fetchone()[0]
    finally:
        connection.close()


def wait_delivered(db, count, timeout=300):
    deadline = time.monotonic() + timeout
    while delivered_count(db) < count and time.monotonic() < deadline:
        time.sleep(0.05)
    if delivered_count(db) < count:
        raise SystemExit("only %d of %d events delivered within %d s" % (delivered_count(db), count, timeout))


def run_backlog(tmp, port, requests, clients, run_id, backlog, chats):
    """Pile up `backlog` events, release the handler, and post `requests` more while it drains."""
    post_all(port, backlog, clients, run_id + "-pile", chats)
    with open(os.path.join(tmp, "handlers", "message.py"), "w") as handle:
        handle.write(HANDLERS["noop"])
    open(os.path.join(tmp, "handlers", "release"), "w").close()
    started = time.monotonic()
    latencies, elapsed = post_all(port, requests, clients, run_id, chats)
    wait_delivered(os.path.join(tmp, "wabhook.db"), backlog + requests)
    return {"p50_ms": percentile(latencies, 0.50) * 1000, "p99_ms": percentile(latencies, 0.99) * 1000,
            "max_ms": max(latencies) * 1000, "acks_per_s": requests / elapsed,
            "drained_per_s": (backlog + requests) / (time.monotonic() - started)}


def run_scenario(name, requests, clients, run_id, backlog=0, chats=50):
    tmp = tempfile.mkdtemp(prefix="wabhook-bench-")
    process, port = start_server(tmp, HANDLERS[name])
    try:
        if name == "backlog":
            return run_backlog(tmp, port, requests, clients, run_id, backlog, chats)
        started = time.monotonic()
        latencies, elapsed = post_all(port, requests, clients, run_id, chats)
        result = {"p50_ms": percentile(latencies, 0.50) * 1000, "p99_ms": percentile(latencies, 0.99) * 1000,
                  "max_ms": max(latencies) * 1000, "acks_per_s": requests / elapsed}
        if name == "noop":
            wait_delivered(os.path.join(tmp, "wabhook.db"), requests)
            result["delivered_per_s"] = requests / (time.monotonic() - started)
        return result
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        shutil.rmtree(tmp, ignore_errors=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--backlog", type=int, default=20000, help="events piled up in the backlog scenario")
    parser.add_argument("--chats", type=int, default=50, help="chats the events are spread over")
    parser.add_argument("--scenario", choices=sorted(HANDLERS), action="append")
    args = parser.parse_args()
    print("python %s, %d cores, %d requests x %d runs, %d keep-alive clients, %d chats" % (
        sys.version.split()[0], os.cpu_count(), args.requests, args.runs, args.clients, args.chats))
    for name in args.scenario or ["hung", "noop", "backlog"]:
        runs = [run_scenario(name, args.requests, args.clients, "%s-%d" % (name, i), args.backlog, args.chats)
                for i in range(args.runs)]
        keys = list(runs[0])
        summary = ", ".join("%s %.2f (%.2f-%.2f)" % (key, statistics.median(r[key] for r in runs),
                                                     min(r[key] for r in runs), max(r[key] for r in runs))
                            for key in keys)
        print("%-5s median (min-max): %s" % (name, summary))


if __name__ == "__main__":
    main()
