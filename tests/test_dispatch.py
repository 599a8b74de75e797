"""Delivery (SPEC section 6): per-handler success, retries and dead letters, the backoff schedule,
per-chat order and parallelism, the --workers bound, acks that never wait for handlers, a backlog
that lives on disk, restart after kill -9, SIGTERM/SIGINT drain, Python handler timeouts,
SystemExit/KeyboardInterrupt in handlers, a handler deleting itself, and the failure log lines.
"""

import http.client
import json
import os
import random
import re
import signal
import sqlite3
import threading
import time

from tests.support import TYPED_RECORD_HANDLER, WabhookTestCase, load_samples, wait_until

import wabhook

# Every handler below is a template filled with `tmp` (the test's temp dir) and `release` (a file whose
# appearance lets "hung" handlers return, so no test leaves threads sleeping for a minute).

RECORD = '''
import json, os
def handle(event):
    with open(os.path.join(%(tmp)r, "seen"), "a") as out:
        out.write(json.dumps([event.id, event.chat_id, event.message_id]) + "\\n")
'''

# Counts its runs in <tmp>/<name>-runs (one line per run: the event id) and fails the first `fails` runs.
FAIL_FIRST = '''
import os
def handle(event):
    path = os.path.join(%(tmp)r, %(runs)r)
    with open(path, "a") as out:
        out.write("%%d\\n" %% event.id)
    with open(path) as counted:
        runs = sum(1 for _ in counted)
    if runs <= %(fails)d:
        raise RuntimeError("failure number %%d" %% runs)
'''

HUNG = '''
import os, time
def handle(event):
    open(os.path.join(%(tmp)r, "started-%%d" %% event.id), "w").close()
    deadline = time.time() + 60
    while not os.path.exists(%(release)r) and time.time() < deadline:
        time.sleep(0.02)
'''


def message(chat="chat-1@s.whatsapp.net", message_id="m1", **fields):
    """The documented sample message, in chat `chat`, with its own message_id (so it is no duplicate)."""
    return dict(load_samples()[0], chat_id=chat, message_id=message_id, **fields)


class DispatchTestCase(WabhookTestCase):
    def setUp(self):
        super().setUp()
        self.release = self.out_path("release")

    def tearDown(self):
        # Let every "hung" handler return before the servers stop (they would otherwise wait it out).
        if os.path.isdir(self.tmp):
            open(self.release, "w").close()
        super().tearDown()

    def handler(self, name, template, **values):
        values = dict(dict(tmp=self.tmp, release=self.release), **values)
        return self.write_handler(name, template % values)

    def running(self, template, *args):
        """A server process (`args`) whose message.py (`template`) has started on one message:
        (process, port, that event's id)."""
        self.handler("message.py", template)
        process, port = self.start_process(*args)
        event_id = self.post_id(port, message())
        wait_until(lambda: os.path.exists(self.out_path("started-%d" % event_id)),
                   message="the handler to start")
        return process, port, event_id

    def post_id(self, server, body):
        status, reply = self.post(server, body)
        self.assertEqual(status, 200, reply)
        self.assertFalse(reply["duplicate"], reply)
        return reply["id"]

    def post_all(self, port, bodies, threads=4):
        """POST every body over `threads` keep-alive connections at once; [(status, reply)] in order."""
        results = [None] * len(bodies)

        def worker(indexes):
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
            try:
                for index in indexes:
                    try:
                        connection.request("POST", "/hook", json.dumps(bodies[index]),
                                           {"Content-Type": "application/json"})
                        response = connection.getresponse()
                        results[index] = (response.status, json.loads(response.read().decode("utf-8")))
                    except (OSError, http.client.HTTPException, ValueError) as exc:
                        results[index] = (None, repr(exc))
                        connection.close()
                        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
            finally:
                connection.close()

        pool = [threading.Thread(target=worker, args=(range(k, len(bodies), threads),)) for k in range(threads)]
        for thread in pool:
            thread.start()
        for thread in pool:
            thread.join(60)
        return results

    def deliveries(self, event_id):
        """{handler: (status, attempts, last_error)} for one event."""
        return {handler: (status, attempts, error) for handler, status, attempts, error in self.query(
            "SELECT handler, status, attempts, last_error FROM deliveries WHERE event_id = ?", (event_id,))}

    def count_lines(self, name):
        return len(self.read_lines(name))

    def pending_count(self):
        return self.query("SELECT COUNT(*) FROM events WHERE status = 'pending'")[0][0]


class RetryTest(DispatchTestCase):
    def test_success_is_recorded_per_handler_so_a_retry_reruns_only_the_failed_one(self):
        self.handler("message.a.py", FAIL_FIRST, runs="a-runs", fails=2)
        self.handler("message.b.py", FAIL_FIRST, runs="b-runs", fails=0)
        server = self.start_server(retries=5)
        event_id = self.post_id(server, message())
        self.wait_status(event_id, "done")
        self.assertEqual(self.read_lines("a-runs"), [str(event_id)] * 3)
        self.assertEqual(self.read_lines("b-runs"), [str(event_id)])
        rows = self.deliveries(event_id)
        self.assertEqual(rows["message.a.py"][:2], ("done", 3))
        self.assertEqual(rows["message.b.py"][:2], ("done", 1))

    def test_exhausted_python_handler_is_dead_lettered_with_its_last_exception(self):
        self.handler("message.py", FAIL_FIRST, runs="runs", fails=99)
        server = self.start_server(retries=3)
        event_id = self.post_id(server, message())
        self.wait_status(event_id, "dead")
        status, attempts, error = self.deliveries(event_id)["message.py"]
        self.assertEqual((status, attempts), ("dead", 3))
        self.assertIn("RuntimeError: failure number 3", error)
        self.assertNotIn("failure number 2", error)  # the last error, not the first one
        self.assertEqual(self.count_lines("runs"), 3)

    def test_exhausted_script_handler_is_dead_lettered_with_its_last_exit_status(self):
        runs = self.out_path("runs")
        self.write_handler("message.sh", "#!/bin/sh\ncat >/dev/null\necho run >> %s\n"
                                         "n=$(wc -l < %s)\necho \"attempt $n went wrong\"\nexit $((10 + n))\n"
                           % (runs, runs))
        server = self.start_server(retries=3)
        event_id = self.post_id(server, message())
        self.wait_status(event_id, "dead")
        status, attempts, error = self.deliveries(event_id)["message.sh"]
        self.assertEqual((status, attempts), ("dead", 3))
        self.assertIn("exit status 13", error)
        self.assertIn("attempt 3 went wrong", error)
        self.assertEqual(self.count_lines("runs"), 3)

    def test_retries_counts_every_attempt_including_the_first(self):
        self.handler("message.py", FAIL_FIRST, runs="runs", fails=99)
        self.handler("message.zz.py", RECORD)  # runs after message.py: proves the lane moved on
        for retries in (1, 4):
            with self.subTest(retries=retries):
                for name in ("runs", "seen"):
                    if os.path.exists(self.out_path(name)):
                        os.remove(self.out_path(name))
                server = self.start_server(retries=retries, db=self.out_path("inbox-%d.db" % retries))
                self.db = server.config.db
                first = self.post_id(server, message(message_id="first"))
                self.wait_status(first, "dead")
                later = self.post_id(server, message(message_id="later"))  # same chat, after the dead one
                self.wait_status(later, "dead")
                self.assertEqual(self.count_lines("runs"), 2 * retries)
                self.assertEqual(self.deliveries(first)["message.py"][:2], ("dead", retries))
                self.stop_server(server)

    def test_failure_log_names_the_handler_event_attempt_and_next_try(self):
        self.handler("message.py", FAIL_FIRST, runs="runs", fails=99)
        server = self.start_server(retries=2)
        event_id = self.post_id(server, message())
        self.wait_status(event_id, "dead")
        failures = [record for record in self.log.records if record.levelname in ("WARNING", "ERROR")
                    and getattr(record, "handler", None) == "message.py"]
        texts = [record.getMessage() for record in failures]
        first = [text for text in texts if "attempt 1" in text]
        last = [text for text in texts if "attempt 2" in text]
        self.assertEqual(len(first), 1, texts)
        self.assertEqual(len(last), 1, texts)
        for text in first + last:
            self.assertIn("message.py", text)
            self.assertRegex(text, r"\bevent %d\b" % event_id)
            self.assertIn("RuntimeError: failure number", text)
        self.assertRegex(first[0], r"next try in \d+(\.\d+)?s")
        self.assertIn("dead-lettered", last[0])
        self.assertTrue(all(getattr(record, "event_id", None) == event_id for record in failures))


    def test_a_failure_of_wabhook_itself_counts_as_an_attempt_and_cannot_spin(self):
        self.write_handler("message.py", "def handle(event):\n    open(%r, 'a').write('run\\n')\n"
                           % self.out_path("runs"))
        server = self.start_server(retries=2)

        def broken_bookkeeping(*args):
            raise RuntimeError("a bug in wabhook's bookkeeping")
        server.metrics.handler_run = broken_bookkeeping
        event_id = self.post_id(server, message())
        self.wait_status(event_id, "dead")
        status, attempts, error = self.deliveries(event_id)["message.py"]
        self.assertEqual((status, attempts), ("dead", 2))
        self.assertIn("a bug in wabhook's bookkeeping", error)
        self.assertEqual(self.count_lines("runs"), 2)
        server.metrics.handler_run = wabhook.Metrics().handler_run  # the workers are still alive
        later = self.post_id(server, message(message_id="m2"))
        self.wait_status(later, "done")


class BackoffScheduleTest(DispatchTestCase):
    def test_every_delay_is_within_a_quarter_of_the_capped_doubling(self):
        rng = random.Random(20261124)
        ratios = []
        for _ in range(20000):
            attempt = rng.randint(1, 60)
            base = rng.choice([0.05, 1.0, 5.0, rng.uniform(0.001, 600.0)])
            cap = rng.choice([wabhook.RETRY_DELAY_CAP, rng.uniform(base, 10000.0)])
            nominal = min(cap, base * 2.0 ** (attempt - 1))
            delay = wabhook.retry_delay(attempt, base, cap=cap, rand=rng.random)
            self.assertGreaterEqual(delay, 0.75 * nominal * (1 - 1e-9), (attempt, base, cap))
            self.assertLessEqual(delay, 1.25 * nominal * (1 + 1e-9), (attempt, base, cap))
            ratios.append(delay / nominal)
        # The jitter really spreads retries over the whole +/-25%, not a fixed factor.
        self.assertLess(min(ratios), 0.76)
        self.assertGreater(max(ratios), 1.24)

    def test_default_jitter_and_default_cap_of_one_hour(self):
        for _ in range(2000):
            attempt = random.randint(1, 40)
            delay = wabhook.retry_delay(attempt, 5.0)
            nominal = min(3600.0, 5.0 * 2.0 ** (attempt - 1))
            self.assertTrue(0.75 * nominal - 1e-9 <= delay <= 1.25 * nominal + 1e-9, (attempt, delay))
        self.assertLessEqual(wabhook.retry_delay(13, 5.0, rand=lambda: 1.0), 4500.0)

    def test_delay_doubles_each_attempt_until_the_cap(self):
        rng = random.Random(7)
        for _ in range(500):
            base, cap, fixed = rng.uniform(0.01, 100.0), rng.uniform(100.0, 5000.0), rng.random()
            delays = [wabhook.retry_delay(n, base, cap=cap, rand=lambda: fixed) for n in range(1, 30)]
            for n, (before, after) in enumerate(zip(delays, delays[1:]), start=1):
                if base * 2.0 ** n <= cap:
                    self.assertAlmostEqual(after, 2 * before, delta=1e-9 * after)
                else:
                    self.assertAlmostEqual(after, cap * (0.75 + 0.5 * fixed), delta=1e-9 * after)

    def test_backoff_stays_capped_for_any_attempt_number(self):
        # --retries has no upper limit, so a delivery may reach attempt 1025 and beyond (2.0 ** 1024
        # overflows a float): the delay must still be the cap, not an OverflowError in the worker.
        for attempt in (64, 1024, 1025, 5000, 10 ** 6):
            with self.subTest(attempt=attempt):
                self.assertEqual(wabhook.retry_delay(attempt, 5.0, rand=lambda: 0.5), wabhook.RETRY_DELAY_CAP)

    def test_a_failed_run_is_retried_no_sooner_than_its_delay(self):
        self.handler("message.py", FAIL_FIRST, runs="runs", fails=99)
        server = self.start_server(retry_delay=2.0)
        event_id = self.post_id(server, message())
        wait_until(lambda: self.deliveries(event_id).get("message.py", (None, 0, None))[2],
                   message="the first failure to be recorded")
        now = time.time()
        status, attempts, _error = self.deliveries(event_id)["message.py"]
        next_at, updated = self.query("SELECT next_attempt_at, updated_at FROM deliveries WHERE event_id = ?",
                                      (event_id,))[0]
        self.assertEqual((status, attempts), ("pending", 1))
        self.assertGreater(next_at, now)  # not due yet
        self.assertGreaterEqual(next_at - updated, 0.75 * 2.0 - 0.5)  # minus time spent recording it
        self.assertLessEqual(next_at - updated, 1.25 * 2.0)
        self.assertEqual(self.count_lines("runs"), 1)

    def test_successive_retries_wait_at_least_the_doubling_delays(self):
        runs = self.out_path("times")
        self.write_handler("message.py", "import time\ndef handle(event):\n"
                                         "    with open(%r, 'a') as out:\n"
                                         "        out.write('%%r\\n' %% time.time())\n"
                                         "    raise RuntimeError('always')\n" % runs)
        server = self.start_server(retries=3, retry_delay=0.2)
        event_id = self.post_id(server, message())
        self.wait_status(event_id, "dead")
        times = [float(line) for line in self.read_lines("times")]
        self.assertEqual(len(times), 3)
        gaps = [later - earlier for earlier, later in zip(times, times[1:])]
        self.assertGreaterEqual(gaps[0], 0.75 * 0.2 - 0.01, gaps)
        self.assertGreaterEqual(gaps[1], 0.75 * 0.4 - 0.01, gaps)


ORDER = '''
import json, os, time
def handle(event):
    with open(os.path.join(%(tmp)r, "order"), "a") as out:
        out.write(json.dumps(["start", event.chat_id, event.id]) + "\\n")
    time.sleep(0.005)
    with open(os.path.join(%(tmp)r, "order"), "a") as out:
        out.write(json.dumps(["end", event.chat_id, event.id]) + "\\n")
'''

# Chat A's handler waits (bounded) for chat B's handler to have run: only parallel lanes get past it.
WAIT_FOR_B = '''
import os, time
def handle(event):
    if event.chat_id == "A":
        open(os.path.join(%(tmp)r, "a-started"), "w").close()
        deadline = time.time() + 10
        while not os.path.exists(os.path.join(%(tmp)r, "b-ran")):
            if time.time() > deadline:
                raise RuntimeError("chat B never ran while chat A was in flight")
            time.sleep(0.01)
    else:
        open(os.path.join(%(tmp)r, "b-ran"), "w").close()
'''

# How many runs are in flight, counted in a file under an exclusive lock; each run logs the count it saw.
CONCURRENCY = '''
import fcntl, os, time
def bump(delta):
    with open(os.path.join(%(tmp)r, "lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        path = os.path.join(%(tmp)r, "running")
        now = delta
        if os.path.exists(path):
            with open(path) as current:
                now += int(current.read())
        with open(path, "w") as out:
            out.write(str(now))
        with open(os.path.join(%(tmp)r, "seen-running"), "a") as out:
            out.write("%%d\\n" %% now)
def handle(event):
    bump(1)
    try:
        time.sleep(0.2)
    finally:
        bump(-1)
'''

# Fails the first run of the event whose message_id is "first"; logs every run and every success.
FAIL_FIRST_ONCE = '''
import os
def handle(event):
    log = os.path.join(%(tmp)r, "runs")
    with open(log, "a") as out:
        out.write("run %%s\\n" %% event.message_id)
    with open(log) as counted:
        mine = sum(1 for line in counted if line == "run %%s\\n" %% event.message_id)
    if event.message_id == "first" and mine == 1:
        raise RuntimeError("first try fails")
    with open(log, "a") as out:
        out.write("ok %%s\\n" %% event.message_id)
'''


class OrderingTest(DispatchTestCase):
    def test_one_chat_runs_strictly_in_arrival_order_while_another_chat_interleaves(self):
        self.handler("message.py", ORDER)
        server = self.start_server(workers=8)
        ids = {"A": [], "B": []}
        for n in range(30):
            for chat in ("A", "B"):
                ids[chat].append(self.post_id(server, message(chat=chat, message_id="%s%d" % (chat, n))))
        wait_until(lambda: self.count_lines("order") == 120, message="60 events handled")
        lines = [json.loads(line) for line in self.read_lines("order")]
        for chat in ("A", "B"):
            with self.subTest(chat=chat):
                mine = [(step, event_id) for step, lane, event_id in lines if lane == chat]
                expected = [(step, event_id) for event_id in ids[chat] for step in ("start", "end")]
                self.assertEqual(mine, expected)  # one at a time (start, end, start, end ...), in order
        positions_a = [index for index, line in enumerate(lines) if line[1] == "A"]
        between = [line for line in lines[positions_a[0]:positions_a[-1]] if line[1] == "B"]
        self.assertTrue(between, "chat B's events should run interleaved with chat A's")

    def test_different_chats_run_in_parallel(self):
        self.handler("message.py", WAIT_FOR_B)
        server = self.start_server(retries=1)
        first = self.post_id(server, message(chat="A", message_id="a"))
        wait_until(lambda: os.path.exists(self.out_path("a-started")), message="chat A's handler to start")
        second = self.post_id(server, message(chat="B", message_id="b"))
        self.wait_status(second, "done")
        self.wait_status(first, "done")  # A got past its wait: B ran while A was in flight
        self.assertEqual(self.deliveries(first)["message.py"][:2], ("done", 1))

    def test_workers_bound_how_many_chats_run_at_once(self):
        self.handler("message.py", CONCURRENCY)
        server = self.start_server(workers=2)
        ids = [self.post_id(server, message(chat="chat-%d" % n, message_id="w%d" % n)) for n in range(6)]
        for event_id in ids:
            self.wait_status(event_id, "done")
        seen = [int(line) for line in self.read_lines("seen-running")]
        self.assertEqual(len(seen), 12)
        self.assertEqual(max(seen), 2)  # two at once, never three

    def test_a_retry_does_not_hold_up_its_chat(self):
        self.handler("message.py", FAIL_FIRST_ONCE)
        server = self.start_server(retry_delay=0.5)
        first = self.post_id(server, message(message_id="first"))
        second = self.post_id(server, message(message_id="second"))
        self.wait_status(first, "done")
        self.wait_status(second, "done")
        self.assertEqual(self.read_lines("runs"), ["run first", "run second", "ok second", "run first", "ok first"])
        self.assertEqual(self.deliveries(first)["message.py"][:2], ("done", 2))


class BacklogTest(DispatchTestCase):
    def test_acks_never_wait_for_hung_handlers(self):
        self.handler("message.py", HUNG)
        server = self.start_server(script_timeout=120, shutdown_timeout=10)
        bodies = [message(chat="chat-%d" % n, message_id="hung-%d" % n) for n in range(300)]
        first = self.post_all(server.port, bodies[:8])
        self.assertEqual([status for status, _reply in first], [200] * 8, first)
        # Every one of the 8 workers is now stuck in a handler ...
        wait_until(lambda: len([n for n in os.listdir(self.tmp) if n.startswith("started-")]) == 8,
                   message="8 hung handlers")
        rest = self.post_all(server.port, bodies[8:])
        # ... and every POST is still answered, from the inbox alone.
        self.assertEqual([status for status, _reply in rest], [200] * 292, [r for r in rest if r[0] != 200][:3])
        self.assertEqual(self.pending_count(), 300)
        # The 8 hung runs hold their leases. A claim the loop decided while the last worker was
        # still starting its run may have leased a few more ahead, never past CLAIMS_AHEAD times
        # --workers in all.
        started = {int(n[len("started-"):]) for n in os.listdir(self.tmp) if n.startswith("started-")}
        running = {row[0] for row in self.query("SELECT event_id FROM deliveries WHERE status = 'running'")}
        self.assertEqual(len(started), 8)
        self.assertLessEqual(started, running)
        self.assertLessEqual(len(running), wabhook.CLAIMS_AHEAD * server.config.workers)
        status, _headers, data = self.request(server, "GET", "/healthz")
        self.assertEqual((status, json.loads(data)["pending"]), (200, 300))

    def test_a_backlog_is_leased_ahead_of_the_workers_at_most_claims_ahead_times_their_number(self):
        inbox = wabhook.Inbox(self.db)
        for n in range(20):  # twenty chats waiting before the server starts
            raw = message(chat="chat-%d" % n, message_id="ahead-%d" % n)
            inbox.commit_event(json.dumps(raw), "message", None, wabhook.lane_of(raw, None),
                               wabhook.identity_key(raw, None), 3600.0)
        inbox.close()
        self.handler("message.py", HUNG)
        server = self.start_server(workers=2, script_timeout=120, shutdown_timeout=10)
        leased = wabhook.CLAIMS_AHEAD * 2

        def running():
            return self.query("SELECT COUNT(*) FROM deliveries WHERE status = 'running'")[0][0]
        wait_until(lambda: running() >= leased, message="%d events leased" % leased)
        wait_until(lambda: len([n for n in os.listdir(self.tmp) if n.startswith("started-")]) == 2,
                   message="both workers in a hung handler")
        # A later event is fanned out (the loop has gone round again since) but nothing more is
        # leased: no claim is made ahead of workers that are all stuck.
        later = self.post_id(server, message(chat="chat-later", message_id="ahead-later"))
        wait_until(lambda: self.query("SELECT COUNT(*) FROM deliveries WHERE event_id = ?", (later,))[0][0],
                   message="the later event fanned out")
        self.assertEqual(running(), leased)
        self.assertEqual(self.pending_count(), 21)

    def test_memory_stays_flat_while_the_backlog_grows_on_disk(self):
        self.handler("message.py", HUNG)
        process, port = self.start_process("--script-timeout", "120")

        def rss_kib():
            with open("/proc/%d/status" % process.pid) as status:
                return int(re.search(r"^VmRSS:\s+(\d+) kB", status.read(), re.M).group(1))

        warmup = self.post_all(port, [message(chat="c%d" % n, message_id="w%d" % n) for n in range(200)])
        self.assertEqual({status for status, _reply in warmup}, {200})
        before = rss_kib()
        more = self.post_all(port, [message(chat="c%d" % n, message_id="x%d" % n) for n in range(2000)])
        self.assertEqual({status for status, _reply in more}, {200})
        after = rss_kib()
        self.assertEqual(self.pending_count(), 2200)
        self.assertLess(after - before, 30 * 1024, "RSS grew from %d KiB to %d KiB" % (before, after))
        self.assertIsNone(process.poll())


class RestartTest(DispatchTestCase):
    def test_run_killed_with_the_process_is_redelivered_and_counts_as_an_attempt(self):
        process, port, event_id = self.running(HUNG, "--script-timeout", "120")
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=10)
        self.assertEqual(self.deliveries(event_id)["message.py"][:2], ("running", 1))
        self.handler("message.py", RECORD)
        process, port = self.start_process()
        self.wait_status(event_id, "done")
        self.assertEqual([json.loads(line)[0] for line in self.read_lines("seen")], [event_id])
        self.assertEqual(self.deliveries(event_id)["message.py"][:2], ("done", 2))
        self.assertEqual(self.terminate(process), 0)

    def test_a_killed_run_goes_first_again_not_after_its_chats_later_events(self):
        self.handler("message.py", HUNG)
        process, port = self.start_process("--script-timeout", "120", "--retry-delay", "30")
        first = self.post_id(port, message(message_id="k1"))
        later = [self.post_id(port, message(message_id="k%d" % n)) for n in range(2, 5)]  # the same chat
        wait_until(lambda: os.path.exists(self.out_path("started-%d" % first)), message="the handler to start")
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=10)
        self.handler("message.py", RECORD)
        process, port = self.start_process("--retry-delay", "30")  # a backoff would let the others overtake
        for event_id in later:
            self.wait_status(event_id, "done")
        self.assertEqual([json.loads(line)[0] for line in self.read_lines("seen")], [first] + later)
        self.assertEqual(self.terminate(process), 0)

    def test_killed_run_uses_up_the_retries(self):
        process, port, event_id = self.running(HUNG, "--script-timeout", "120", "--retries", "1")
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=10)
        self.handler("message.py", RECORD)
        process, port = self.start_process("--retries", "1")
        later = self.post_id(port, message(message_id="later"))
        self.wait_status(later, "done")
        self.assertEqual(self.event_status(event_id), "dead")
        status, attempts, error = self.deliveries(event_id)["message.py"]
        self.assertEqual((status, attempts), ("dead", 1))
        self.assertIn("stopped during the run", error)
        self.assertEqual([json.loads(line)[0] for line in self.read_lines("seen")], [later])
        self.assertEqual(self.terminate(process), 0)


# Waits (bounded) for the test to release it, then notes that it finished.
WAIT_FOR_RELEASE = '''
import os, time
def handle(event):
    open(os.path.join(%(tmp)r, "started-%%d" %% event.id), "w").close()
    deadline = time.time() + 15
    while not os.path.exists(%(release)r):
        if time.time() > deadline:
            raise RuntimeError("never released")
        time.sleep(0.02)
    with open(os.path.join(%(tmp)r, "finished"), "a") as out:
        out.write("%%d\\n" %% event.id)
'''


class ShutdownTest(DispatchTestCase):
    def refused(self, port, accepted):
        """True once a POST is refused; a POST that still got a 200 has its id added to `accepted`."""
        try:
            status, reply = self.post(port, message(message_id="after-signal-%d" % len(accepted)))
        except (OSError, http.client.HTTPException):
            return True
        if status == 200:
            accepted.append(reply["id"])
            return False
        return status == 503

    def check_running_handler_finishes_after(self, sig):
        process, port, event_id = self.running(WAIT_FOR_RELEASE, "--shutdown-timeout", "10", "--script-timeout", "120")
        process.send_signal(sig)
        accepted = []
        wait_until(lambda: self.refused(port, accepted), message="POSTs to be refused after the signal")
        self.assertIsNone(process.poll(), "the process must wait for its running handler")
        open(self.release, "w").close()
        self.assertEqual(process.wait(timeout=15), 0)
        self.assertEqual(self.read_lines("finished"), [str(event_id)])
        self.assertEqual(self.event_status(event_id), "done")
        self.assertEqual(self.deliveries(event_id)["message.py"][:2], ("done", 1))
        stored = {row[0] for row in self.query("SELECT id FROM events")}
        self.assertTrue(set(accepted) <= stored, "a 200 after the signal must still be stored")

    def test_sigterm_stops_accepting_and_lets_a_running_handler_finish(self):
        self.check_running_handler_finishes_after(signal.SIGTERM)

    def test_sigint_stops_accepting_and_lets_a_running_handler_finish(self):
        self.check_running_handler_finishes_after(signal.SIGINT)

    def test_sigint_past_the_shutdown_timeout_leaves_events_pending_without_using_an_attempt(self):
        self.handler("message.py", HUNG)
        process, port = self.start_process("--shutdown-timeout", "0.3", "--script-timeout", "120")
        first = self.post_id(port, message(message_id="first"))
        second = self.post_id(port, message(message_id="second"))  # same chat: queued behind the first
        wait_until(lambda: os.path.exists(self.out_path("started-%d" % first)), message="the handler to start")
        self.assertEqual(self.terminate(process, signal.SIGINT), 0)
        for event_id in (first, second):
            self.assertEqual(self.event_status(event_id), "pending")
            self.assertEqual(self.deliveries(event_id)["message.py"][:2], ("pending", 0))
        self.handler("message.py", RECORD)
        process, port = self.start_process()
        self.wait_status(second, "done")
        self.assertEqual([json.loads(line)[0] for line in self.read_lines("seen")], [first, second])
        self.assertEqual(self.deliveries(first)["message.py"][:2], ("done", 1))
        self.assertEqual(self.terminate(process), 0)


SLOW_ONE = '''
import json, os, time
def handle(event):
    if event.message_id == "slow":
        deadline = time.time() + 5
        while not os.path.exists(%(release)r) and time.time() < deadline:
            time.sleep(0.02)
        open(os.path.join(%(tmp)r, "slow-finished"), "w").close()
        return
    with open(os.path.join(%(tmp)r, "seen"), "a") as out:
        out.write(json.dumps([event.id, event.chat_id, event.message_id]) + "\\n")
'''

RAISES = '''
import json, os
def handle(event):
    if event.message_id == "exit":
        raise SystemExit(3)
    if event.message_id == "interrupt":
        raise KeyboardInterrupt()
    with open(os.path.join(%(tmp)r, "seen"), "a") as out:
        out.write(json.dumps([event.id, event.chat_id, event.message_id]) + "\\n")
'''

DELETES_ITSELF = '''
import os
def handle(event):
    os.remove(__file__)
    with open(os.path.join(%(tmp)r, "a-ran"), "a") as out:
        out.write("%%d\\n" %% event.id)
'''


class MisbehavingHandlerTest(DispatchTestCase):
    def test_python_handler_over_the_script_timeout_fails_and_a_new_worker_keeps_events_flowing(self):
        self.shorten(IDLE_POLL_SECONDS=0.1)  # the watchdog looks once a poll while workers are busy
        self.handler("message.py", SLOW_ONE)
        server = self.start_server(workers=1, retries=1, script_timeout=0.5)
        slow = self.post_id(server, message(chat="A", message_id="slow"))
        fast = self.post_id(server, message(chat="B", message_id="fast"))
        self.wait_status(fast, "done")  # the only worker is stuck: a replacement ran this
        self.wait_status(slow, "dead")
        status, attempts, error = self.deliveries(slow)["message.py"]
        self.assertEqual((status, attempts), ("dead", 1))
        self.assertIn("timed out", error)
        # The abandoned run finishing later changes nothing.
        open(self.release, "w").close()
        wait_until(lambda: os.path.exists(self.out_path("slow-finished")), message="the abandoned run to end")
        later = self.post_id(server, message(chat="A", message_id="later"))
        self.wait_status(later, "done")
        self.assertEqual(self.deliveries(slow)["message.py"], (status, attempts, error))
        self.assertEqual([json.loads(line)[2] for line in self.read_lines("seen")], ["fast", "later"])

    def test_system_exit_and_keyboard_interrupt_in_a_handler_are_failed_runs(self):
        self.handler("message.py", RAISES)
        server = self.start_server(workers=1, retries=1)
        exits = self.post_id(server, message(chat="c1", message_id="exit"))
        interrupts = self.post_id(server, message(chat="c2", message_id="interrupt"))
        fine = self.post_id(server, message(chat="c3", message_id="fine"))
        self.wait_status(fine, "done")  # the one worker survived both
        for event_id, name in ((exits, "SystemExit"), (interrupts, "KeyboardInterrupt")):
            with self.subTest(name=name):
                self.wait_status(event_id, "dead")
                status, attempts, error = self.deliveries(event_id)["message.py"]
                self.assertEqual((status, attempts), ("dead", 1))
                self.assertIn(name, error)
        self.assertEqual(self.post(server, message(chat="c4", message_id="still"))[0], 200)
        status, _headers, data = self.request(server, "GET", "/healthz")
        self.assertEqual((status, json.loads(data)["dead"]), (200, 2))

    def test_python_handler_deleting_its_own_file_mid_run_loses_nothing(self):
        self.shorten(SETTLE_SECONDS=0.2)  # how long a deleted file stays gone to count as removed
        self.handler("message.a.py", DELETES_ITSELF)
        self.handler("message.b.py", RECORD)
        server = self.start_server()
        event_id = self.post_id(server, message(message_id="one"))
        self.wait_status(event_id, "done")
        self.assertEqual(self.read_lines("a-ran"), [str(event_id)])
        self.assertFalse(os.path.exists(os.path.join(self.handlers, "message.a.py")))
        rows = self.deliveries(event_id)
        self.assertEqual((rows["message.a.py"][:2], rows["message.b.py"][:2]), (("done", 1), ("done", 1)))
        later = self.post_id(server, message(message_id="two"))
        self.wait_status(later, "done")
        self.assertEqual([json.loads(line)[0] for line in self.read_lines("seen")], [event_id, later])
        self.assertEqual(self.read_lines("a-ran"), [str(event_id)])

    def test_script_handler_deleting_its_own_file_mid_run_loses_nothing(self):
        self.shorten(SETTLE_SECONDS=0.2)  # how long a deleted file stays gone to count as removed
        ran = self.out_path("script-ran")
        self.write_handler("message.sh", '#!/bin/sh\nrm -f "$0"\ncat >/dev/null\necho "$WABHOOK_ID" >> %s\n' % ran)
        self.handler("message.z.py", RECORD)
        server = self.start_server()
        event_id = self.post_id(server, message(message_id="one"))
        self.wait_status(event_id, "done")
        self.assertEqual(self.read_lines("script-ran"), [str(event_id)])
        self.assertEqual(self.deliveries(event_id)["message.sh"][:2], ("done", 1))
        self.assertEqual([json.loads(line)[0] for line in self.read_lines("seen")], [event_id])
        later = self.post_id(server, message(message_id="two"))
        self.wait_status(later, "done")
        self.assertEqual(len(self.read_lines("seen")), 2)


GATED = '''
import os, time
def handle(event):
    with open(os.path.join(%(tmp)r, "started"), "a") as out:
        out.write("%%d\\n" %% event.id)
    deadline = time.time() + 60
    while not os.path.exists(%(release)r) and time.time() < deadline:
        time.sleep(0.02)
    with open(os.path.join(%(tmp)r, "finished"), "a") as out:
        out.write("%%d\\n" %% event.id)
'''


class StorageFaultTest(DispatchTestCase):
    def test_an_outcome_the_inbox_cannot_take_is_recorded_once_it_can_and_the_chat_goes_on(self):
        # The lock below outlasts the busy timeout; the outcome is recorded again a poll later.
        self.shorten(BUSY_TIMEOUT_SECONDS=0.2, IDLE_POLL_SECONDS=0.1)
        self.handler("message.py", GATED)
        server = self.start_server()
        first = self.post_id(server, message(message_id="f1"))
        second = self.post_id(server, message(message_id="f2"))  # the same chat: waits for the first
        wait_until(lambda: self.read_lines("started") == [str(first)], message="the first run to start")
        locker = sqlite3.connect(self.db, isolation_level=None)
        self.addCleanup(locker.close)
        locker.execute("BEGIN IMMEDIATE")  # another process holds the write lock past the busy timeout
        try:
            open(self.release, "w").close()
            wait_until(lambda: any("cannot record handler outcomes" in line for line in self.log.messages()),
                       message="the outcome to fail to be recorded")
            self.assertEqual(self.event_status(first), "pending")
        finally:
            locker.execute("ROLLBACK")
        self.wait_status(first, "done")
        self.wait_status(second, "done")
        self.assertEqual(self.read_lines("finished"), [str(first), str(second)])
        self.assertEqual(self.deliveries(first)["message.py"][:2], ("done", 1))  # recorded, not run again
        wait_until(lambda: any("recorded again" in line for line in self.log.messages()),
                   message="a log line that recording works again")


class RetryDecisionTest(DispatchTestCase):
    def test_one_decision_gives_backoff_until_the_last_attempt_then_dead(self):
        server = self.start_server(retries=3, retry_delay=2.0)
        decide = server.dispatcher.after_failure
        for attempt in (1, 2):
            before = time.time()
            status, retry_at = decide(attempt)
            self.assertEqual(status, "pending")
            delay = 2.0 * 2 ** (attempt - 1)
            self.assertGreaterEqual(retry_at - before, delay * 0.75 - 0.01)
            self.assertLessEqual(retry_at - time.time(), delay * 1.25 + 0.01)
        self.assertEqual(decide(3), ("dead", 0.0))
        self.assertEqual(decide(4), ("dead", 0.0))


class SecondSignalTest(DispatchTestCase):
    def test_a_second_signal_ends_the_wait_for_running_handlers_and_says_how_many(self):
        process, port, event_id = self.running(HUNG, "--shutdown-timeout", "60", "--script-timeout", "120")
        process.send_signal(signal.SIGTERM)
        wait_until(lambda: "shutting down" in self.process_log(process), message="the first signal's log line")
        self.assertIsNone(process.poll(), "the process waits for its running handler")
        process.send_signal(signal.SIGTERM)
        self.assertEqual(process.wait(timeout=20), 0)  # not the 60 s of --shutdown-timeout
        self.assertIn("1 running handler runs abandoned", self.process_log(process))
        self.assertEqual(self.event_status(event_id), "pending")
        self.assertEqual(self.deliveries(event_id)["message.py"][:2], ("pending", 0))  # no attempt used



class CorePromisesTest(WabhookTestCase):
    """Retry then dead letter, chat order, kill -9 and SIGTERM, end to end."""

    def test_failing_handler_is_retried_then_dead_lettered_with_its_error(self):
        self.write_handler("message.py", "def handle(event):\n    raise RuntimeError('boom %d' % event.id)\n")
        self.write_handler("message.ok.py", TYPED_RECORD_HANDLER % {"tmp": self.tmp})
        server = self.start_server(retries=3)
        event_id = self.post(server, load_samples()[0])[1]["id"]
        self.wait_status(event_id, "dead")
        rows = dict((h, (s, a, e)) for h, s, a, e in self.query(
            "SELECT handler, status, attempts, last_error FROM deliveries WHERE event_id = ?", (event_id,)))
        self.assertEqual(rows["message.py"][:2], ("dead", 3))
        self.assertIn("RuntimeError: boom %d" % event_id, rows["message.py"][2])
        self.assertEqual(rows["message.ok.py"][:2], ("done", 1))  # success is kept per handler
        self.assertEqual(len(self.read_lines("seen")), 1)

    def test_events_of_one_chat_are_handled_in_arrival_order(self):
        self.write_handler("message.py", TYPED_RECORD_HANDLER % {"tmp": self.tmp})
        server = self.start_server(workers=4)
        ids = []
        for n in range(15):
            sample = dict(load_samples()[0], message_id="m%d" % n)
            ids.append(self.post(server, sample)[1]["id"])
        wait_until(lambda: len(self.read_lines("seen")) == 15, message="15 handled")
        self.assertEqual([json.loads(line)[0] for line in self.read_lines("seen")], ids)

    def test_acknowledged_events_survive_kill_and_are_delivered_after_restart(self):
        self.write_handler("message.py", "import time\ndef handle(event):\n    time.sleep(60)\n")
        process, port = self.start_process("--script-timeout", "120")
        ids = [self.post(port, dict(load_samples()[0], message_id="k%d" % n))[1]["id"] for n in range(20)]
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=10)
        stored = {row[0] for row in self.query("SELECT id FROM events")}
        self.assertTrue(set(ids) <= stored)
        self.write_handler("message.py", TYPED_RECORD_HANDLER % {"tmp": self.tmp})
        process, port = self.start_process()
        wait_until(lambda: {json.loads(line)[0] for line in self.read_lines("seen")} == set(ids),
                   message="every acknowledged event delivered after restart")
        self.assertEqual(self.terminate(process), 0)

    def test_sigterm_exits_zero_and_leaves_unfinished_work_pending(self):
        started = os.path.join(self.tmp, "started")
        self.write_handler("message.py", "import time\ndef handle(event):\n    open(%r, 'w').close()\n"
                           "    time.sleep(60)\n" % started)
        process, port = self.start_process("--shutdown-timeout", "0.5", "--script-timeout", "120")
        event_id = self.post(port, load_samples()[0])[1]["id"]
        wait_until(lambda: os.path.exists(started), message="the handler to start")
        self.assertEqual(self.terminate(process), 0)
        self.assertEqual(self.event_status(event_id), "pending")
        rows = self.query("SELECT status, attempts FROM deliveries WHERE event_id = ?", (event_id,))
        self.assertEqual(rows, [("pending", 0)])


class RetryDelayTest(WabhookTestCase):
    def test_backoff_doubles_from_the_base_with_bounded_jitter_and_a_cap(self):
        self.assertEqual([wabhook.retry_delay(n, 5.0, rand=lambda: 0.5) for n in (1, 2, 3, 4)],
                         [5.0, 10.0, 20.0, 40.0])
        self.assertEqual(wabhook.retry_delay(1, 4.0, rand=lambda: 0.0), 3.0)
        self.assertEqual(wabhook.retry_delay(1, 4.0, rand=lambda: 1.0), 5.0)
        self.assertEqual(wabhook.retry_delay(30, 5.0, cap=100.0, rand=lambda: 0.5), 100.0)
