"""The benchmark's reference servers (bench/): they must keep answering, and the prototype keep
storing what wabhook stores, or the Speed section's comparisons stop being reproducible.

bench/groupcommit.py imports wabhook's tables and its batch insert: a change to either shows here.
"""

import os
import re
import subprocess
import sys

from tests.support import ROOT, WabhookTestCase, load_samples, wait_until

BENCH = os.path.join(ROOT, "bench")


class ReferenceServersTest(WabhookTestCase):
    def start_reference(self, script, *args):
        """bench/<script> on an ephemeral loopback port; its port."""
        log_path = os.path.join(self.tmp, script + ".log")
        with open(log_path, "wb") as log_file:
            process = subprocess.Popen([sys.executable, os.path.join(BENCH, script), "--port", "0"]
                                       + list(args), stdout=log_file, stderr=subprocess.STDOUT, cwd=self.tmp)
        self.processes.append(process)

        def listening():
            with open(log_path, errors="replace") as handle:
                log = handle.read()
            if process.poll() is not None:
                raise AssertionError("%s exited with %s:\n%s" % (script, process.returncode, log))
            return re.search(r"listening on http://127\.0\.0\.1:(\d+)/hook", log)
        return int(wait_until(listening, message=script + " to listen").group(1))

    def test_the_documented_stdlib_server_answers_200(self):
        port = self.start_reference("stdlib.py")
        status, headers, body = self.request(port, "POST", "/hook", load_samples()[0],
                                             {"Content-Type": "application/json"})
        self.assertEqual((status, body), (200, b'{"ok":true}'))
        self.assertIn("date", headers)  # written by send_response(), unlike ceiling.py's prebuilt reply

    def test_the_prototype_stores_events_and_their_dedup_keys_as_wabhook_does(self):
        db = os.path.join(self.tmp, "prototype.db")
        port = self.start_reference("groupcommit.py", "--db", db)
        message = dict(load_samples()[0], message_id="bench-1")
        first, again = self.post(port, message), self.post(port, message)
        self.assertEqual(first, (200, {"ok": True, "id": 1, "duplicate": False}))
        self.assertEqual(again, (200, {"ok": True, "id": 1, "duplicate": True}))
        self.assertEqual(self.query("SELECT id, event, status FROM events", db=db), [(1, "message", "pending")])
        self.assertEqual(self.query("SELECT id FROM events WHERE dedup_key IS NOT NULL", db=db), [(1,)])
        indexes = {row[0] for row in self.query("SELECT name FROM sqlite_master WHERE type = 'index'", db=db)}
        self.assertTrue({"events_by_status", "events_undispatched", "events_by_dedup_key"} <= indexes, indexes)

    def test_the_bare_prototype_stores_into_one_table_without_dedup(self):
        db = os.path.join(self.tmp, "bare.db")
        port = self.start_reference("groupcommit.py", "--db", db, "--bare")
        message = dict(load_samples()[0], message_id="bench-1")
        self.assertEqual([self.post(port, message)[1]["duplicate"] for _ in range(2)], [False, False])
        self.assertEqual(self.query("SELECT COUNT(*) FROM events", db=db), [(2,)])
        self.assertEqual(self.query("SELECT name FROM sqlite_master WHERE type IN ('table', 'index')", db=db),
                         [("events",)])


class ColdStartTest(WabhookTestCase):
    def test_cold_start_is_reported_with_what_the_interpreter_takes_before_it(self):
        result = subprocess.run([sys.executable, os.path.join(BENCH, "bench.py"), "--scenario", "cold",
                                 "--no-baselines"], capture_output=True, text=True, timeout=60, cwd=self.tmp)
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertRegex(result.stdout, r"cold start \(Popen to the first 200 of a POST, median of 5 starts\): \d+ ms")
        self.assertRegex(result.stdout, r"the interpreter starts \(`python -c pass`\) in \d+ ms"
                                        r" and compiles wabhook\.py in \d+ ms")


class AgainstTest(WabhookTestCase):
    """--against: a second wabhook.py measured beside --wabhook at every point, in alternating order."""

    def bench(self, against):
        return subprocess.run([sys.executable, os.path.join(BENCH, "bench.py"), "--scenario", "hung",
                               "--connections", "1", "--duration", "1", "--runs", "2", "--no-baselines",
                               "--fallback", "--against", against],
                              capture_output=True, text=True, timeout=120, cwd=self.tmp)

    def test_each_row_of_the_second_file_is_measured_beside_the_first_and_given_its_ratio(self):
        result = self.bench(os.path.join(ROOT, "wabhook.py"))
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertRegex(result.stdout, r"\| wabhook hung \| 1 \| [\d,]+")
        self.assertRegex(result.stdout, r"\| wabhook:B hung \| 1 \| [\d,]+ .*; \d\.\d\dx( \([^)]*\))? A;")
        order = re.findall(r"run (\d)  (wabhook(?::B)?) hung", result.stderr)
        self.assertEqual(order, [("1", "wabhook"), ("1", "wabhook:B"), ("2", "wabhook:B"), ("2", "wabhook")])

    def test_the_second_file_is_the_one_run_for_its_rows(self):
        broken = os.path.join(self.tmp, "wabhook.py")
        with open(broken, "w") as handle:
            handle.write("raise SystemExit('not this one')\n")
        result = self.bench(broken)
        self.assertNotEqual(result.returncode, 0)
        self.assertIn("wabhook:B hung did not start", result.stdout + result.stderr)
        self.assertIn("not this one", result.stdout + result.stderr)
