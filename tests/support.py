"""Shared test helpers: temp dirs, handler files, real servers on 127.0.0.1, polling.

Everything here uses real sockets, a real SQLite file and real processes; the
only shortcut is a short --retry-delay so backoff does not take minutes.
"""

import http.client
import json
import logging
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
import unittest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import wabhook  # noqa: E402

SCRIPT = os.path.join(ROOT, "wabhook.py")
SAMPLES_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "samples", "events.jsonl")
DEFAULT_WAIT = 15.0


# A handler that appends [id, type, class name, bridge] of each event to <tmp>/seen.
TYPED_RECORD_HANDLER = '''
import json, os
def handle(event):
    with open(os.path.join(%(tmp)r, "seen"), "a") as out:
        out.write(json.dumps([event.id, event.event, type(event).__name__, event.bridge]) + "\\n")
'''


def load_samples():
    """The sender's 11 documented sample events, as dicts, in file order."""
    with open(SAMPLES_FILE, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def wait_until(predicate, timeout=DEFAULT_WAIT, interval=0.02, message="condition"):
    """Poll `predicate` until it returns a truthy value (returned) or fail after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError("timed out after %.1fs waiting for %s" % (timeout, message))
        time.sleep(interval)


class ListHandler(logging.Handler):
    """Keeps every record of the wabhook logger, so tests can assert on log lines."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.records = []

    def emit(self, record):
        self.records.append(record)

    def messages(self):
        return [record.getMessage() for record in list(self.records)]


class WabhookTestCase(unittest.TestCase):
    """A temp dir with handlers/ and wabhook.db, servers stopped and processes killed after each test."""

    def setUp(self):
        self.tmp = tempfile.mkdtemp(prefix="wabhook-test-")
        self.handlers = os.path.join(self.tmp, "handlers")
        os.mkdir(self.handlers)
        self.db = os.path.join(self.tmp, "wabhook.db")
        self.servers = []
        self.processes = []
        self.log = ListHandler()
        logger = logging.getLogger("wabhook")
        self._old_log = (list(logger.handlers), logger.level, logger.propagate)
        logger.handlers = [self.log]
        logger.setLevel(logging.DEBUG)
        logger.propagate = False

    def tearDown(self):
        failures = []  # a server that fails to stop fails the test, once everything else is cleaned up
        for server in self.servers:
            try:
                server.stop()
            except Exception as exc:
                failures.append(exc)
        for process in self.processes:
            if process.poll() is None:
                process.kill()
            process.wait(timeout=10)
            for stream in (process.stdout, process.stderr):
                if stream:
                    stream.close()
        logger = logging.getLogger("wabhook")
        logger.handlers, level, logger.propagate = self._old_log[0], self._old_log[1], self._old_log[2]
        logger.setLevel(level)
        shutil.rmtree(self.tmp, ignore_errors=True)
        if failures:
            raise failures[0]

    # -- configuration and servers -----------------------------------------

    def shorten(self, **constants):
        """Set wabhook's timing constants (SETTLE_SECONDS, IDLE_POLL_SECONDS, BUSY_TIMEOUT_SECONDS
        ...) for this test, restored after it: a test that waits one out need not wait a second.

        Only servers in this process see them; `python wabhook.py` subprocesses keep the real
        values.
        """
        for name, value in constants.items():
            old = getattr(wabhook, name)  # AttributeError for a misspelt name
            self.addCleanup(setattr, wabhook, name, old)
            setattr(wabhook, name, value)

    def config(self, **overrides):
        """A Config for this test: loopback, a free port, this temp dir, quick retries."""
        values = dict(host="127.0.0.1", port=0, db=self.db, handlers=self.handlers, retry_delay=0.05,
                      shutdown_timeout=5.0)
        values.update(overrides)
        return wabhook.Config(**values)

    def start_server(self, **overrides):
        """A real wabhook.Server in this process, listening on 127.0.0.1:<free port>."""
        server = wabhook.Server(self.config(**overrides)).start()
        self.servers.append(server)
        return server

    def stop_server(self, server):
        self.servers.remove(server)
        return server.stop()

    def write_handler(self, name, source, executable=None):
        """Write handlers/<name>; scripts (not .py) get the exec bit unless executable=False."""
        path = os.path.join(self.handlers, name)
        with open(path, "w", encoding="utf-8") as handle:
            handle.write(source)
        if executable is None:
            executable = not name.endswith(".py")
        if executable:
            os.chmod(path, 0o755)
        return path

    def out_path(self, name):
        return os.path.join(self.tmp, name)

    def read_lines(self, name):
        """Lines a handler appended to <tmp>/<name> ([] if it does not exist yet)."""
        try:
            with open(self.out_path(name), encoding="utf-8") as handle:
                return [line.rstrip("\n") for line in handle]
        except FileNotFoundError:
            return []

    # -- HTTP ------------------------------------------------------------------

    def request(self, server, method, path, body=None, headers=None, timeout=10):
        """(status, headers dict with lower-case names, raw body bytes) over a fresh connection."""
        port = server if isinstance(server, int) else server.port
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
        try:
            if isinstance(body, (dict, list)):
                body = json.dumps(body)
            if isinstance(body, str):
                body = body.encode("utf-8")
            connection.request(method, path, body=body, headers=headers or {})
            response = connection.getresponse()
            data = response.read()
            return response.status, {k.lower(): v for k, v in response.getheaders()}, data
        finally:
            connection.close()

    def post(self, server, body, path="/hook", headers=None):
        """POST a JSON body (dict, str or bytes); (status, parsed JSON reply)."""
        status, _headers, data = self.request(server, "POST", path, body,
                                              dict({"Content-Type": "application/json"}, **(headers or {})))
        return status, json.loads(data.decode("utf-8")) if data else None

    # -- the inbox -------------------------------------------------------------

    def query(self, sql, params=(), db=None):
        """Rows from the SQLite file, read through a separate connection."""
        connection = sqlite3.connect(db or self.db, timeout=5)
        try:
            return connection.execute(sql, params).fetchall()
        finally:
            connection.close()

    def event_status(self, event_id):
        rows = self.query("SELECT status FROM events WHERE id = ?", (event_id,))
        return rows[0][0] if rows else None

    def wait_status(self, event_id, status, timeout=DEFAULT_WAIT):
        wait_until(lambda: self.event_status(event_id) == status, timeout,
                   message="event %d to be %s (is %s)" % (event_id, status, self.event_status(event_id)))

    # -- real processes --------------------------------------------------------

    def start_process(self, *args, env=None, wait_listening=True):
        """`python wabhook.py serve ...` as a subprocess; returns (process, port).

        stderr goes to a file in the temp dir (read it with process_log()),
        so a chatty server can never block on a full pipe.
        """
        log_path = os.path.join(self.tmp, "server-%d.log" % len(self.processes))
        log_file = open(log_path, "wb")
        command = [sys.executable, SCRIPT, "serve", "--host", "127.0.0.1", "--port", "0", "--db", self.db,
                   "--handlers", self.handlers, "--retry-delay", "0.05"] + list(args)
        process = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT, cwd=self.tmp,
                                   env=dict(os.environ, **(env or {})))
        log_file.close()
        process.log_path = log_path
        self.processes.append(process)
        if not wait_listening:
            return process, None
        match = wait_until(lambda: process.poll() is not None and "exited" or
                           re.search(r"listening on https?://[^:]+:(\d+)", self.process_log(process)),
                           message="the server process to listen")
        if match == "exited":
            raise AssertionError("server exited with %s:\n%s" % (process.returncode, self.process_log(process)))
        return process, int(match.group(1))

    def process_log(self, process):
        with open(process.log_path, encoding="utf-8", errors="replace") as handle:
            return handle.read()

    def run_cli(self, *args, env=None, timeout=60, input=None):
        """`python wabhook.py ARGS` to completion: CompletedProcess with text stdout/stderr."""
        return subprocess.run([sys.executable, SCRIPT] + list(args), capture_output=True, text=True,
                              timeout=timeout, cwd=self.tmp, env=dict(os.environ, **(env or {})), input=input)

    def terminate(self, process, sig=signal.SIGTERM, timeout=30):
        process.send_signal(sig)
        return process.wait(timeout=timeout)
