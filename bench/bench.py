#!/usr/bin/env python3
"""wabhook benchmark (issue 8): one command, one run, every target, standard library only.

    python bench/bench.py [--duration 5] [--runs 1] [--scenario NAME ...] [--wabhook PATH]
                          [--against PATH]

Baselines (each concurrency runs them, then wabhook's scenarios, back to back, so a ratio
compares figures measured a minute apart; --baselines picks, --no-baselines skips):
- ceiling:   bench/ceiling.py, ThreadingHTTPServer that parses the JSON and stores nothing;
             every `x ceiling` is a ratio to it
- naive:     bench/naive.py, the same plus one fsync'd SQLite commit per request
References, to read the targets by:
- stdlib:    bench/stdlib.py, the ceiling with its 200 written as http.server's documentation
             does (the speed issue's table measured its ceiling at about this figure)
- prototype: bench/groupcommit.py, the speed issue's prototype (thread per connection,
             leader/follower group commit) storing exactly what wabhook stores, and nothing
             else done: the most a Python receiver with this storage gets here
- prototype bare: the same into a lone events table, no dedup key, no index
wabhook scenarios (`python wabhook.py serve` in a fresh temp dir per point):
- hung:      every handler hangs (acks only: the events pile up in the inbox)
- page:      hung, while one open inbox page polls its API as the page does (each second
             /api/stats, /api/events and one event's detail); its ratio to hung at the same c
- noop:      handlers/message.py does nothing: acks/s, deliveries/s, backlog at the end
- noop-exec: an executable handlers/message.sh that reads stdin: the same figures
- backlog:   --backlog events pile up behind the hung handler, a hot reload fixes it;
             drain rate, ack p50/p99 at c=16 during the drain, RSS start/peak/end
- cold:      Popen to the first 200 of a POST, median of 5 starts; beside it what the same
             interpreter takes to start bare and to compile the script
- forward:   --forward-backlog events pile up behind bench/sink.py holding its answers, then
             drain through handlers/message.forward: events/s, connections, resends

Each point runs --duration seconds at 1, 16 and 64 keep-alive connections
(--connections) with wrk when installed, else a multi-process stdlib client.
Every request is the documented `message` sample with a unique message_id,
over 100 chats. The table shows req/s, the ratio to the ceiling at the same c,
p50/p99 and errors; for wabhook the inbox's row count is checked against the
200s received (FAIL when a 200 has no row). With --runs N the whole set runs
N times and each figure is the median (min-max). 127.0.0.1 only, bounded in time.

--against PATH runs a second wabhook.py (another commit's) at every wabhook load point (hung,
page, noop, noop-exec; backlog, cold and forward run --wabhook alone), right beside
--wabhook's, the one going first alternating from run to run: its rows are
`wabhook:B <scenario>`, each with its ratio to the same row of --wabhook (`x A`). For a
change's paired measurement: `--runs 6 --against /tmp/before/wabhook.py`.
"""

import argparse
import http.client
import json
import multiprocessing
import os
import queue
import re
import selectors
import shutil
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
CHATS = 100
CONNECTIONS = (1, 16, 64)
# The servers wabhook is compared with: their command lines, with {db} for a temp file
# (whose rows are then checked against the 200s).
BASELINES = {
    "ceiling": ["ceiling.py"],
    "naive": ["naive.py", "--db", "{db}"],
    "stdlib": ["stdlib.py"],
    "prototype": ["groupcommit.py", "--db", "{db}"],
    "prototype bare": ["groupcommit.py", "--db", "{db}", "--bare"],
}
SCENARIOS = ("hung", "page", "noop", "noop-exec", "backlog", "cold", "forward")
# The first line of the documented samples (the `message` event); message_id and chat_id
# are replaced per request.
SAMPLE = ('{"event":"message","message_id":"ACE41E...","contact_id":"15550001234@s.whatsapp.net",'
          '"phone":"15550001234","chat_id":"15550001234@s.whatsapp.net","name":"Alice",'
          '"body":"Hello!","type":"text","media_type":"","is_group":false,"from_me":false,'
          '"timestamp":1777180605}')
# The sample with %s where the message id goes and %d for the chat number: the same
# format string drives the Lua script and the stdlib client.
BODY_FORMAT = (SAMPLE.replace("%", "%%").replace('"ACE41E..."', '"%s"')
               .replace('"chat_id":"15550001234@s.whatsapp.net"',
                        '"chat_id":"chat-%d@s.whatsapp.net"'))

HUNG_HANDLER = ("import os\nimport time\n\n\ndef handle(event):\n"
                "    while not os.path.exists(%r):  # hangs until the benchmark releases it\n"
                "        time.sleep(0.05)\n")
NOOP_HANDLER = "def handle(event):\n    pass\n"
EXEC_HANDLER = "#!/bin/sh\ncat >/dev/null\n"
# The forward scenario's handlers/message.forward: POST each event to bench/sink.py. The timeout
# outlasts the pile-up, during which the sink holds the requests in flight.
FORWARD_FILE = "url http://127.0.0.1:%d/hook\ntimeout 3600\n"


STARTED = time.monotonic()


def log(message):
    """Progress goes to stderr, so stdout holds only the report; timed, to spot outside noise."""
    elapsed = int(time.monotonic() - STARTED)
    print("[%d:%02d] %s" % (elapsed // 60, elapsed % 60, message), file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------
# Load generators: wrk, or the multi-process stdlib fallback. Both give back
# {rps, p50, p99 (ms), ok (200s), non2xx, sock (socket errors + timeouts)}.
# ---------------------------------------------------------------------------

LUA = r"""
-- Written by bench/bench.py. Each request: the documented message sample with a unique
-- message_id (<tag>-<wrk thread>-<n>), chat_id chat-<n % CHATS>.
local body_format = [==[@BODY@]==]
local headers = {["Content-Type"] = "application/json"}
local threads = 0

function setup(thread)
  threads = threads + 1
  thread:set("tid", threads)  -- a prefix per thread keeps ids unique across threads
end

function init(args)
  prefix = args[1] .. "-" .. tid .. "-"
  n = 0
end

function request()
  n = n + 1
  return wrk.format("POST", "/hook", headers, string.format(body_format, prefix .. n, n % @CHATS@))
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format("BENCH requests=%.0f duration_us=%.0f p50_us=%.0f p99_us=%.0f "
    .. "non2xx=%.0f connect=%.0f read=%.0f write=%.0f timeout=%.0f\n",
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(99),
    e.status, e.connect, e.read, e.write, e.timeout))
end
"""


class Wrk:
    """wrk with a Lua script: unique ids per request, exact percentiles from done()."""

    def __init__(self, path, tmp):
        self.path = path
        self.script = os.path.join(tmp, "bench.lua")
        with open(self.script, "w") as handle:
            handle.write(LUA.replace("@BODY@", BODY_FORMAT).replace("@CHATS@", str(CHATS)))
        version = subprocess.run([path, "--version"], capture_output=True, text=True).stdout
        self.name = (version.split(" [")[0] or "wrk").strip()

    def start(self, port, c, duration, tag):
        argv = [self.path, "--latency", "-t", str(min(c, 2)), "-c", str(c), "-d", "%ds" % duration,
                "--timeout", "10s", "-s", self.script, "http://127.0.0.1:%d/hook" % port, "--", tag]
        return WrkJob(subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                       text=True), duration)


class WrkJob:
    """A running wrk: poll it, stop it early (SIGINT), read its summary."""

    def __init__(self, process, duration):
        self.process = process
        self.duration = duration

    def running(self):
        return self.process.poll() is None

    def stop(self):
        # wrk stops on SIGINT like at the end of -d, and still prints its summary.
        self.process.send_signal(signal.SIGINT)

    def result(self):
        try:
            out, err = self.process.communicate(timeout=self.duration + 30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            raise SystemExit("wrk did not finish")
        match = re.search(r"^BENCH (.*)$", out, re.M)
        if not match:
            raise SystemExit("wrk gave no summary:\n%s\n%s" % (out, err))
        # wrk counts a status >= 400 as an error, so "ok" is every 2xx/3xx: wabhook sends 200.
        f = {k: float(v) for k, v in (item.split("=") for item in match.group(1).split())}
        return {"rps": f["requests"] / (f["duration_us"] / 1e6), "p50": f["p50_us"] / 1000,
                "p99": f["p99_us"] / 1000, "ok": int(f["requests"] - f["non2xx"]),
                "non2xx": int(f["non2xx"]),
                "sock": int(f["connect"] + f["read"] + f["write"] + f["timeout"])}

    def kill(self):
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


class StdlibClient:
    """Processes, each driving its share of the connections with a selector: no client GIL."""
    name = "stdlib fallback client (multi-process)"

    def start(self, port, c, duration, tag):
        ctx = multiprocessing.get_context("spawn")  # no fork of a parent that has threads
        count = min(c, os.cpu_count() or 1)
        results, stop, ready = ctx.Queue(), ctx.Event(), ctx.Barrier(count + 1)
        procs = [ctx.Process(target=fallback_worker, daemon=True,
                             args=(port, c // count + (i < c % count), duration, "%s-%d" % (tag, i),
                                   ready, stop, results)) for i in range(count)]
        for proc in procs:
            proc.start()
        ready.wait(timeout=30)
        return FallbackJob(procs, results, stop, duration)


class FallbackJob:
    """Running client processes: poll them, stop them early, merge their results."""

    def __init__(self, procs, results, stop_event, duration):
        self.procs, self.results, self.stop_event = procs, results, stop_event
        self.duration = duration
        self.parts = []

    def running(self):
        # A child with a big result cannot exit before it is read: collect, do not wait for exits.
        try:
            while len(self.parts) < len(self.procs):
                self.parts.append(self.results.get_nowait())
        except queue.Empty:
            pass
        return len(self.parts) < len(self.procs)

    def stop(self):
        self.stop_event.set()

    def result(self):
        # Read the results before joining: a child blocks on exit until its queue is drained.
        while len(self.parts) < len(self.procs):
            self.parts.append(self.results.get(timeout=self.duration + 30))
        latencies = sorted(x for part in self.parts for x in part["lat"])
        elapsed = max(p["end"] for p in self.parts) - min(p["start"] for p in self.parts)
        return {"rps": len(latencies) / elapsed, "p50": percentile(latencies, 50) * 1000,
                "p99": percentile(latencies, 99) * 1000,
                "ok": sum(p["ok"] for p in self.parts),
                "non2xx": sum(p["non2xx"] for p in self.parts),
                "sock": sum(p["sock"] for p in self.parts)}

    def kill(self):
        for proc in self.procs:
            proc.join(timeout=5)
            if proc.is_alive():
                proc.kill()


def percentile(ordered, pct):
    if not ordered:
        return float("nan")
    return ordered[min(len(ordered) - 1, int(len(ordered) * pct / 100))]


class Conn:
    """One keep-alive connection of the fallback client, with at most one request in flight."""

    def __init__(self, port):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = b""
        self.sent_at = None

    def send(self, port, message_id, chat):
        body = (BODY_FORMAT % (message_id, chat)).encode()
        head = ("POST /hook HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nContent-Type: application/json\r\n"
                "Content-Length: %d\r\n\r\n" % (port, len(body))).encode()
        self.sent_at = time.monotonic()
        self.sock.sendall(head + body)

    def take_response(self):
        """(status, keep_alive) once self.buf holds a whole response, else None."""
        end = self.buf.find(b"\r\n\r\n")
        if end < 0:
            return None
        head = self.buf[:end].decode("latin-1")
        length = re.search(r"(?im)^content-length:\s*(\d+)", head)
        total = end + 4 + (int(length.group(1)) if length else 0)
        if len(self.buf) < total:
            return None
        self.buf = self.buf[total:]
        return int(head.split(" ", 2)[1]), not re.search(r"(?im)^connection:\s*close", head)


def fallback_worker(port, conns, duration, tag, ready, stop, results):
    """A client process: `conns` connections, requests until the deadline or `stop`."""
    sel = selectors.DefaultSelector()
    stats = {"ok": 0, "non2xx": 0, "sock": 0, "lat": []}
    counter = iter(range(1, 1 << 62))

    def send(conn):
        n = next(counter)
        conn.send(port, "%s-%d" % (tag, n), n % CHATS)

    def reopen(conn):
        sel.unregister(conn.sock)
        conn.sock.close()
        fresh = Conn(port)
        sel.register(fresh.sock, selectors.EVENT_READ, fresh)
        return fresh

    for _ in range(conns):
        conn = Conn(port)
        sel.register(conn.sock, selectors.EVENT_READ, conn)
    ready.wait(timeout=30)
    start = time.monotonic()
    deadline = start + duration
    for key in list(sel.get_map().values()):
        send(key.data)
    while sel.get_map() and time.monotonic() < deadline + 10:  # in-flight replies get 10 s
        for key, _ in sel.select(timeout=0.2):
            handle_readable(key.data, stats, sel, send, reopen,
                            more=time.monotonic() < deadline and not stop.is_set())
    stats["sock"] += len(sel.get_map())  # still waiting for a reply: a timeout
    stats["start"] = start
    stats.setdefault("end", time.monotonic())
    results.put(stats)


def handle_readable(conn, stats, sel, send, reopen, more):
    """Read what arrived; on a whole reply count it and send the next request while `more`."""
    try:
        data = conn.sock.recv(65536)
    except OSError:
        data = b""
    if not data:  # the server closed the connection under a request
        stats["sock"] += 1
        if more:
            send(reopen(conn))
        else:
            sel.unregister(conn.sock)
            conn.sock.close()
        return
    conn.buf += data
    reply = conn.take_response()
    if reply is None:
        return
    status, keep_alive = reply
    stats["end"] = time.monotonic()  # the rate is over the replies, however the run stopped
    stats["lat"].append(stats["end"] - conn.sent_at)
    stats["ok" if status == 200 else "non2xx"] += 1
    if not more:
        sel.unregister(conn.sock)
        conn.sock.close()
        return
    send(conn if keep_alive else reopen(conn))


def run_load(generator, port, c, duration, tag, until=None):
    """Load for `duration` s, or until `until()` is true (polled every 0.1 s)."""
    job = generator.start(port, c, duration, tag)
    try:
        while job.running():
            if until and until():
                job.stop()
                break
            time.sleep(0.1)
        return job.result()
    finally:
        job.kill()


# ---------------------------------------------------------------------------
# Servers under test
# ---------------------------------------------------------------------------

class Server:
    """A server process logging to a file (a pipe nobody reads could fill and stall it)."""

    def __init__(self, argv, tmp, name="server"):
        self.argv, self.name = argv, name
        self.log_path = os.path.join(tmp, name + ".log")
        self.process = None
        self.port = None

    def start(self, wait=True):
        with open(self.log_path, "wb") as out:
            self.process = subprocess.Popen(self.argv, stdout=out, stderr=subprocess.STDOUT,
                                            cwd=ROOT)
        if wait:
            self.port = self.wait_listening()
        return self

    def wait_listening(self, timeout=30):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.process.poll() is None:
            with open(self.log_path, errors="replace") as handle:
                match = re.search(r"listening on http://[^:/]+:(\d+)", handle.read())
            if match:
                return int(match.group(1))
            time.sleep(0.02)
        self.stop()
        raise SystemExit("%s did not start:\n%s" % (self.name, self.log_tail()))

    def log_tail(self, lines=20):
        with open(self.log_path, errors="replace") as handle:
            return "".join(handle.readlines()[-lines:])

    def memory_mb(self, field="VmRSS"):
        """VmRSS (now) or VmHWM (peak) from /proc, in MB; NaN once the process is gone."""
        kb = self.memory_kb(field)
        return kb / 1024 if kb else float("nan")

    def memory_kb(self, field="VmRSS"):
        """VmRSS (now) or VmHWM (peak) from /proc, in kB; None once the process is gone."""
        try:
            with open("/proc/%d/status" % self.process.pid) as handle:
                for line in handle:
                    if line.startswith(field + ":"):
                        return int(line.split()[1])
        except OSError:
            return None
        return None

    def stop(self):
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            log("%s ignored SIGTERM for 15 s: killed" % self.name)
            self.process.kill()
            self.process.wait()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


def baseline_argv(target, tmp):
    script, *rest = BASELINES[target]
    db = os.path.join(tmp, "baseline.db") if "{db}" in rest else None
    return [sys.executable, os.path.join(HERE, script), "--port", "0"] + [
        db if arg == "{db}" else arg for arg in rest], db


def wabhook_argv(script, tmp, handler, port=0, sink_port=None):
    """Write the scenario's handler into tmp/handlers; the serve command line, and the db."""
    handlers = os.path.join(tmp, "handlers")
    os.makedirs(handlers, exist_ok=True)
    if handler == "forward":
        write(os.path.join(handlers, "message.forward"), FORWARD_FILE % sink_port)
    elif handler == "noop-exec":
        path = os.path.join(handlers, "message.sh")
        write(path, EXEC_HANDLER)
        os.chmod(path, 0o755)
    else:
        write(os.path.join(handlers, "message.py"),
              HUNG_HANDLER % release_path(tmp) if handler == "hung" else NOOP_HANDLER)
    db = os.path.join(tmp, "wabhook.db")
    # --script-timeout: a hung handler must stay hung for the whole run, not be failed and retried.
    # --shutdown-timeout: stopping the server must not wait long for the handlers.
    return [sys.executable, script, "serve", "--host", "127.0.0.1", "--port", str(port),
            "--db", db, "--handlers", handlers, "--script-timeout", "3600",
            "--shutdown-timeout", "1"], db


def release_path(tmp):
    """The file whose appearance ends the hung handler (outside handlers/: it is no handler)."""
    return os.path.join(tmp, "release")


def write(path, text):
    with open(path, "w") as handle:
        handle.write(text)


def inbox(db):
    """{'rows': n, 'pending': n, 'done': n, ...} of the events table; a read-only look."""
    connection = sqlite3.connect(db, timeout=30)
    try:
        rows = connection.execute("SELECT COUNT(*) FROM events").fetchone()[0]
        counts = {"rows": rows}
        try:
            counts.update(connection.execute("SELECT status, COUNT(*) FROM events GROUP BY status"))
        except sqlite3.OperationalError:
            pass  # naive.py's table has no status column
        return counts
    finally:
        connection.close()


def check_rows(figures, counts, label):
    """Every 200 must be a row; rows beyond the 200s are requests cut off in flight."""
    figures["rows"] = counts["rows"]
    figures["row_excess"] = counts["rows"] - figures["ok"]
    figures["row_fail"] = int(counts["rows"] < figures["ok"])
    if figures["row_fail"]:
        message = "FAIL %s: %d rows in the inbox < %d 200s received" % (
            label, counts["rows"], figures["ok"])
        log("!" * 72 + "\n" + message + "\n" + "!" * 72)
        FAILURES.append(message)


FAILURES = []
AGAINST = "wabhook:B "  # the rows of --against: "wabhook:B noop" beside "wabhook noop"


# ---------------------------------------------------------------------------
# Scenarios
# ---------------------------------------------------------------------------

def measure_point(args, generator, target, c, tag):
    """One target at c connections for --duration s, in a fresh temp dir and a fresh server."""
    tmp = tempfile.mkdtemp(prefix="wabhook-bench-")
    try:
        scenario = target.split()[-1]
        if target in BASELINES:
            argv, db = baseline_argv(target, tmp)
        else:
            path = args.against if target.startswith(AGAINST) else args.wabhook
            argv, db = wabhook_argv(path, tmp, "hung" if scenario == "page" else scenario)
        with Server(argv, tmp, target).start() as server:
            before = inbox(db) if db else None
            tab = PagePoller(server.port) if scenario == "page" else None
            started = time.monotonic()
            figures = run_load(generator, server.port, c, args.duration, tag)
            elapsed = time.monotonic() - started
            if tab is not None:
                figures["polls"] = tab.stop()
            if db:
                after = inbox(db)
                check_rows(figures, after, "%s c=%d" % (target, c))
            if target.startswith("wabhook"):
                figures["rss"] = server.memory_mb("VmHWM")
                figures["backlog"] = after.get("pending", 0) - before.get("pending", 0)
                figures["dead"] = after.get("dead", 0)
                if scenario not in ("hung", "page"):
                    figures["deliveries"] = (after.get("done", 0) - before.get("done", 0)) / elapsed
                    # Events in flight (one per connection, one per handler run) are no growth.
                    figures["grew"] = int(figures["backlog"] > c + 100)
            write(release_path(tmp), "")  # lets a hung handler return, so the stop is quick
        return figures
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


class PagePoller(threading.Thread):
    """One open inbox page: every POLL_SECONDS what ui.js asks for, over one keep-alive connection."""

    POLL_SECONDS = 1.0

    def __init__(self, port):
        super().__init__(daemon=True)
        self.port, self.polls, self.failed = port, 0, 0
        self._stop_event = threading.Event()
        self.start()

    def run(self):
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        newest = None
        while not self._stop_event.wait(self.POLL_SECONDS):
            paths = ["/api/stats", "/api/events?limit=50"] + (["/api/events/%d" % newest] if newest else [])
            try:
                for path in paths:
                    connection.request("GET", path)
                    response = connection.getresponse()
                    body = response.read()
                    if response.status != 200:
                        self.failed += 1
                    elif path.startswith("/api/events?"):
                        events = json.loads(body)["events"]
                        newest = events[0]["id"] if events else None
                self.polls += 1
            except (OSError, http.client.HTTPException, ValueError):
                self.failed += 1
                connection.close()
        connection.close()

    def stop(self):
        self._stop_event.set()
        self.join(timeout=15)
        if self.failed:
            FAILURES.append("the page poller saw %d failed polls" % self.failed)
        return self.polls


class RssSampler(threading.Thread):
    """VmRSS every 0.5 s, so a backlog's memory curve (flat or not) can be seen."""

    def __init__(self, server):
        super().__init__(daemon=True)
        self.server, self.samples, self.done = server, [], threading.Event()

    def run(self):
        while not self.done.wait(0.5):
            kb = self.server.memory_kb()
            if kb:
                self.samples.append(kb / 1024)


def measure_backlog(args, generator, tag):
    """Pile up --backlog events behind the hung handler, fix it by a hot reload, time the drain."""
    tmp = tempfile.mkdtemp(prefix="wabhook-bench-")
    argv, db = wabhook_argv(args.wabhook, tmp, "hung")
    try:
        with Server(argv, tmp, "wabhook backlog").start() as server:
            sampler = RssSampler(server)
            figures = {"rss_start": server.memory_mb()}
            sampler.start()
            try:
                pile_up(args, generator, server, db, tag, figures)
                figures["rss_piled"] = server.memory_mb()
                drain(args, generator, server, db, tmp, tag, figures)
                figures["rss_end"] = server.memory_mb()
                figures["rss_peak"] = server.memory_mb("VmHWM")
            finally:
                sampler.done.set()
                sampler.join()
            figures["rss_max_sampled"] = max(sampler.samples, default=0)
            write(release_path(tmp), "")
        return figures
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def pile_up(args, generator, server, db, tag, figures):
    """c=64 until the inbox holds --backlog events (bounded by --pile-timeout)."""
    started = time.monotonic()
    load = run_load(generator, server.port, 64, args.pile_timeout, tag + "-pile",
                    until=lambda: inbox_rows(db) >= args.backlog)
    counts = inbox(db)
    check_rows(load, counts, "backlog pile-up")
    figures.update(piled=counts["rows"], pile_rps=load["rps"], pile_p99=load["p99"],
                   pile_seconds=time.monotonic() - started, row_fail=load["row_fail"])
    if counts["rows"] < args.backlog:
        log("backlog: only %d of %d events piled up in %d s" % (counts["rows"], args.backlog,
                                                                 args.pile_timeout))


def inbox_rows(db):
    connection = sqlite3.connect(db, timeout=30)
    try:
        return connection.execute("SELECT COUNT(*) FROM events").fetchone()[0]
    finally:
        connection.close()


def drain(args, generator, server, db, tmp, tag, figures):
    """Hot-reload a no-op handler and release the hung runs; post at c=16 while it drains."""
    before = inbox(db)
    write(os.path.join(tmp, "handlers", "message.py"), NOOP_HANDLER)
    write(release_path(tmp), "")
    started = time.monotonic()
    load = run_load(generator, server.port, 16, min(args.duration, 5), tag + "-drain")
    deadline = started + args.drain_timeout
    counts = inbox(db)
    while counts.get("pending", 0) and time.monotonic() < deadline:
        time.sleep(0.25)
        counts = inbox(db)
    elapsed = time.monotonic() - started
    check_rows(load, {"rows": counts["rows"] - before["rows"]}, "backlog drain")
    figures.update(drain_rate=(counts.get("done", 0) - before.get("done", 0)) / elapsed,
                   drain_seconds=elapsed, left=counts.get("pending", 0), dead=counts.get("dead", 0),
                   drain_ack_rps=load["rps"], drain_p50=load["p50"], drain_p99=load["p99"],
                   drain_errors=load["non2xx"] + load["sock"],
                   row_fail=figures["row_fail"] + load["row_fail"])
    if figures["left"]:
        log("backlog: %d events still pending after %d s" % (figures["left"], args.drain_timeout))


def measure_forward(args, generator, tag):
    """Forwarding: --forward-backlog events pile up in wabhook while bench/sink.py holds the requests
    in flight, then the sink lets go; the drain rate is events forwarded (and recorded done) per second.

    The sink is the ceiling (ThreadingHTTPServer, keep-alive) in its own process, counting the
    connections it accepted and the POSTs it answered: more POSTs than events are resends.
    """
    tmp = tempfile.mkdtemp(prefix="wabhook-bench-")
    hold = release_path(tmp)
    sink_argv = [sys.executable, os.path.join(HERE, "sink.py"), "--port", "0", "--hold", hold]
    pile_args = argparse.Namespace(**dict(vars(args), backlog=args.forward_backlog))
    try:
        with Server(sink_argv, tmp, "sink").start() as sink:
            argv, db = wabhook_argv(args.wabhook, tmp, "forward", sink_port=sink.port)
            with Server(argv, tmp, "wabhook forward").start() as server:
                figures = {}
                pile_up(pile_args, generator, server, db, tag, figures)
                before = inbox(db)
                write(hold, "")
                started = time.monotonic()
                deadline = started + args.drain_timeout
                counts = before
                while counts.get("pending", 0) and time.monotonic() < deadline:
                    time.sleep(0.1)
                    counts = inbox(db)
                elapsed = time.monotonic() - started
                figures.update(forward_rate=(counts.get("done", 0) - before.get("done", 0)) / elapsed,
                               forward_seconds=elapsed, forward_left=counts.get("pending", 0),
                               forward_dead=counts.get("dead", 0), forwarded=counts.get("done", 0),
                               rss_peak=server.memory_mb("VmHWM"))
            sink.stop()
            with open(sink.log_path) as handle:
                match = re.search(r"sink connections=(\d+) requests=(\d+)", handle.read())
            if match:
                figures.update(sink_connections=int(match.group(1)), sink_requests=int(match.group(2)))
        if figures["forward_left"]:
            log("forward: %d events still pending after %d s" % (figures["forward_left"], args.drain_timeout))
        return figures
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def measure_cold(args, tag, starts=5):
    """Median over fresh temp dirs of the time from Popen to the first 200 of a POST."""
    times = []
    for i in range(starts):
        tmp = tempfile.mkdtemp(prefix="wabhook-bench-")
        try:
            port = free_port()
            argv, _ = wabhook_argv(args.wabhook, tmp, "noop", port)
            started = time.monotonic()
            with Server(argv, tmp, "wabhook cold").start(wait=False) as server:
                times.append(first_200(server, port, "%s-%d" % (tag, i), started) * 1000)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    figures = {"cold_ms": statistics.median(times), "cold_min": min(times), "cold_max": max(times)}
    figures.update(interpreter_floor(args.wabhook, starts))
    return figures


def interpreter_floor(script, starts):
    """What a start costs before any of wabhook's code runs, measured the same way.

    The interpreter's own start (Popen of `python -c pass` to its exit) and the compile
    of the script: `python wabhook.py` compiles the whole file on every start, as
    Python never reads or writes cached bytecode for the script it runs.
    """
    bare, compiled = [], []
    with open(script, encoding="utf-8") as f:
        source = f.read()
    for _ in range(starts):
        started = time.monotonic()
        subprocess.run([sys.executable, "-c", "pass"], check=True)
        bare.append((time.monotonic() - started) * 1000)
        started = time.monotonic()
        compile(source, script, "exec", dont_inherit=True)
        compiled.append((time.monotonic() - started) * 1000)
    return {"python_ms": statistics.median(bare), "compile_ms": statistics.median(compiled)}


def free_port():
    """A port free right now (the server needs it before it can announce one)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def first_200(server, port, message_id, started, timeout=10):
    """Seconds from `started` until a POST gets a 200; polls every 2 ms, at most `timeout` s."""
    body = BODY_FORMAT % (message_id, 0)
    while time.monotonic() - started < timeout and server.process.poll() is None:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
        try:
            connection.request("POST", "/hook", body, {"Content-Type": "application/json"})
            response = connection.getresponse()
            response.read()
            if response.status == 200:
                return time.monotonic() - started
        except OSError:
            pass  # not listening yet
        finally:
            connection.close()
        time.sleep(0.002)
    raise SystemExit("cold start: no 200 within %d s:\n%s" % (timeout, server.log_tail()))


# ---------------------------------------------------------------------------
# One run of the whole set, and the report over the runs
# ---------------------------------------------------------------------------

def one_run(args, generator, run):
    """{'points': {(target, c): figures}, 'backlog': figures, 'cold': figures}."""
    baselines = [] if args.no_baselines else list(args.baselines)
    pairs = [["wabhook " + s] + ([AGAINST + s] if args.against else [])
             for s in args.scenario if s in ("hung", "page", "noop", "noop-exec")]
    targets = baselines + [target for pair in pairs for target in pair]
    # --wabhook and --against: which goes first alternates from run to run
    order = baselines + [target for pair in pairs for target in (pair if run % 2 else pair[::-1])]
    measured = {}
    # Every target at one concurrency back to back: the figures a ratio compares are measured
    # a minute apart, not the whole run apart (this machine's speed drifts within minutes).
    for c in args.connections:
        for target in order:
            if target.endswith(" page") and c != 16 and 16 in args.connections:
                continue  # the measure: c=16
            tag = "r%d-%s-c%d" % (run, target.split()[-1], c)
            measured[target, c] = figures = measure_point(args, generator, target, c, tag)
            log("  run %d  %-17s c=%-3d %8.0f req/s  p99 %6.1f ms" % (
                run, target, c, figures["rps"], figures["p99"]))
    points = {(target, c): measured[target, c] for target in targets for c in args.connections
              if (target, c) in measured}  # the table's order: by target, then c
    add_ratios(points)
    result = {"points": points}
    if "backlog" in args.scenario:
        log("  run %d  backlog of %d events ..." % (run, args.backlog))
        result["backlog"] = measure_backlog(args, generator, "r%d-backlog" % run)
    if "cold" in args.scenario:
        result["cold"] = measure_cold(args, "r%d-cold" % run)
    if "forward" in args.scenario:
        log("  run %d  forward: a backlog of %d events into a local sink ..." % (run, args.forward_backlog))
        result["forward"] = measure_forward(args, generator, "r%d-forward" % run)
    return result


def add_ratios(points):
    """Ratios within the run: the absolute figures swing between runs, the ratios less."""
    for (target, c), figures in points.items():
        side = AGAINST if target.startswith(AGAINST) else "wabhook "
        for base in ("ceiling", "naive", "stdlib", side + "hung"):
            if (base, c) in points:
                figures["x_" + base.split()[-1]] = figures["rps"] / points[base, c]["rps"]
        same = ("wabhook " + target[len(AGAINST):], c)  # --wabhook's row of an --against row
        if side == AGAINST and same in points:
            figures["x_A"] = figures["rps"] / points[same]["rps"]


def spread(values, spec):
    """'median', and ' (min-max)' after it when the runs differ; '-' for none."""
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    text = spec.format(statistics.median(values))
    if spec.format(min(values)) != spec.format(max(values)):
        text += " (%s-%s)" % (spec.format(min(values)), spec.format(max(values)))
    return text


def report(args, generator, runs):
    print("python %s, %d cores, %s, %d s per point, %d run%s, wabhook: %s%s" % (
        sys.version.split()[0], os.cpu_count(), generator.name, args.duration, len(runs),
        "s, each figure the median (min-max)" if len(runs) > 1 else "", args.wabhook,
        " (A), wabhook:B: %s" % args.against if args.against else ""))
    print()
    print("| target | c | req/s | x ceiling | p50 ms | p99 ms | errors | extra |")
    print("|---|---|---|---|---|---|---|---|")
    for (target, c) in runs[0]["points"]:
        col = column([run["points"][target, c] for run in runs])
        print("| %s | %d | %s | %s | %s | %s | %s | %s |" % (
            target, c, col("rps", "{:,.0f}"), col("x_ceiling", "{:.2f}x"), col("p50", "{:.1f}"),
            col("p99", "{:.1f}"), col("errors", "{:.0f}"), extra(target, col)))
    if "backlog" in runs[0]:
        report_backlog(column([run["backlog"] for run in runs]), args)
    if "cold" in runs[0]:
        col = column([run["cold"] for run in runs])
        print("\ncold start (Popen to the first 200 of a POST, median of 5 starts): %s ms"
              " (fastest start %s ms, slowest %s ms)"
              % (col("cold_ms", "{:.0f}"), col("cold_min", "{:.0f}"), col("cold_max", "{:.0f}")))
        print("  before any of its code runs: the interpreter starts (`python -c pass`) in %s ms"
              " and compiles %s in %s ms (medians of 5)"
              % (col("python_ms", "{:.0f}"), os.path.basename(args.wabhook), col("compile_ms", "{:.0f}")))
    if "forward" in runs[0]:
        report_forward(column([run["forward"] for run in runs]))
    if FAILURES:
        print("\n" + "\n".join("**%s**" % failure for failure in FAILURES))


def column(figs):
    """col(name, spec): one figure over the runs, as spread() formats it ('' if never measured)."""
    for f in figs:
        if "non2xx" in f:
            f["errors"] = f["non2xx"] + f["sock"]

    def col(name, spec):
        values = [f[name] for f in figs if name in f]
        return spread(values, spec) if values else ""
    col.total = lambda name: sum(f.get(name, 0) for f in figs)
    return col


def extra(target, col):
    """The extra column: deliveries, backlog growth, memory and the rows-vs-200s check."""
    parts = []
    if col("deliveries", "{}"):
        parts.append("deliveries %s/s" % col("deliveries", "{:,.0f}"))
    if col("backlog", "{}"):
        grew = " (GREW: deliveries fall behind)" if col.total("grew") else ""
        parts.append("backlog +%s%s" % (col("backlog", "{:,.0f}"), grew))
    if col.total("dead"):
        parts.append("dead %s" % col("dead", "{:,.0f}"))
    if col("rss", "{}"):
        parts.append("RSS peak %s MB" % col("rss", "{:.0f}"))
    if target.endswith(" page"):
        parts.append("%s polls; %s the acks of hung" % (col("polls", "{:.0f}"), col("x_hung", "{:.3f}x")))
    if col("x_A", "{}"):
        parts.append("%s A" % col("x_A", "{:.2f}x"))
    if target.startswith(("wabhook", "prototype")):
        for base in ("naive", "stdlib"):
            if col("x_" + base, "{}"):
                parts.append("%s %s" % (col("x_" + base, "{:.2f}x"), base))
    if col.total("row_fail"):
        parts.append("**FAIL: rows < 200s in %d run(s)**" % col.total("row_fail"))
    elif col("rows", "{}"):
        parts.append("rows = 200s + %s in flight: ok" % col("row_excess", "{:.0f}"))
    return "; ".join(parts)


def report_backlog(col, args):
    print("\nbacklog: %s events piled up behind the hung handler at c=64 (%s acks/s, p99 %s ms)"
          % (col("piled", "{:,.0f}"), col("pile_rps", "{:,.0f}"), col("pile_p99", "{:.1f}")))
    print("  fixed by a hot reload: drained at %s events/s (%s s until none pending;"
          " still pending %s, dead %s)" % (col("drain_rate", "{:,.0f}"),
                                          col("drain_seconds", "{:.1f}"), col("left", "{:,.0f}"),
                                          col("dead", "{:,.0f}")))
    print("  acks posted during the drain (c=16, %d s): %s req/s, p50 %s ms, p99 %s ms, errors %s"
          % (min(args.duration, 5), col("drain_ack_rps", "{:,.0f}"), col("drain_p50", "{:.1f}"),
             col("drain_p99", "{:.1f}"), col("drain_errors", "{:.0f}")))
    print("  RSS MB: start %s, after the pile-up %s, end %s; peak %s"
          " (VmHWM; max of the 0.5 s samples %s)"
          % (col("rss_start", "{:.1f}"), col("rss_piled", "{:.1f}"), col("rss_end", "{:.1f}"),
             col("rss_peak", "{:.1f}"), col("rss_max_sampled", "{:.1f}")))
    failed = col.total("row_fail")
    print("  rows vs 200s: %s" % ("**FAIL in %d run(s)**" % failed if failed else "ok"))


def report_forward(col):
    print("\nforward: %s events piled up behind a sink holding its answers (handlers/message.forward,"
          " keep-alive, bench/sink.py)" % col("piled", "{:,.0f}"))
    print("  the sink lets go: forwarded at %s events/s (%s s until none pending; still pending %s, dead %s;"
          " RSS peak %s MB)" % (col("forward_rate", "{:,.0f}"), col("forward_seconds", "{:.1f}"),
                                col("forward_left", "{:,.0f}"), col("forward_dead", "{:,.0f}"),
                                col("rss_peak", "{:.0f}")))
    print("  the sink accepted %s connections and answered %s POSTs for %s events done"
          % (col("sink_connections", "{:,.0f}"), col("sink_requests", "{:,.0f}"), col("forwarded", "{:,.0f}")))


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("--duration", type=int, default=5, help="seconds per point (default 5)")
    add("--runs", type=int, default=1, help="repeat the whole set; report medians (min-max)")
    add("--scenario", nargs="+", action="extend", choices=SCENARIOS,
        help="wabhook scenarios to run (default: all)")
    add("--connections", type=lambda s: [int(x) for x in s.split(",")], default=list(CONNECTIONS),
        help="keep-alive connections per point (default 1,16,64)")
    add("--wabhook", default=os.path.join(ROOT, "wabhook.py"), help="the wabhook.py to run")
    add("--against", help="a second wabhook.py run beside --wabhook at every wabhook point (rows"
        " `wabhook:B ...`, with their ratio to --wabhook's)")
    add("--backlog", type=int, default=100000, help="events piled up (default 100000)")
    add("--pile-timeout", type=int, default=300, help="most seconds to pile up the backlog")
    add("--drain-timeout", type=int, default=300, help="most seconds to drain it")
    add("--forward-backlog", type=int, default=10000, help="events piled up for the forward scenario (10000)")
    add("--baselines", nargs="+", choices=list(BASELINES), default=list(BASELINES),
        help="baselines and references to run (default: all)")
    add("--no-baselines", action="store_true", help="skip every baseline and reference")
    add("--fallback", action="store_true", help="the stdlib client even if wrk is installed")
    args = parser.parse_args(argv)
    args.scenario = args.scenario or list(SCENARIOS)
    args.wabhook = os.path.abspath(args.wabhook)
    if args.against:
        args.against = os.path.abspath(args.against)
    return args


def main():
    args = parse_args()
    tmp = tempfile.mkdtemp(prefix="wabhook-bench-")
    try:
        wrk = None if args.fallback else shutil.which("wrk")
        generator = Wrk(wrk, tmp) if wrk else StdlibClient()
        runs = []
        for run in range(1, args.runs + 1):
            runs.append(one_run(args, generator, run))
        report(args, generator, runs)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 1 if FAILURES else 0


if __name__ == "__main__":
    sys.exit(main())
