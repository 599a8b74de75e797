"""The inbox page (GET /) driven in a real headless Chromium, against a real wabhook process.

The test itself is stdlib-only: it starts `wabhook.py serve --token ...` as a subprocess, fills
its inbox over HTTP (two dead letters from a broken message.py, then a fixed message.py, a plain
message and one whose body is an XSS payload), and runs tests/browser_scenarios.py under a
Python that has Selenium: BROWSER_TEST_PYTHON, else .ci/venv-browser/bin/python (.ci/run makes
it), else this interpreter. That script drives Debian's chromium through chromium-driver and
prints one JSON report, which the tests below read. Without a browser they skip, saying why.

Screenshots of the main views go to $WABHOOK_SCREENSHOTS when it is set (docs/ keeps them).
"""

import functools
import json
import os
import re
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import unittest
import urllib.error
import urllib.request

from tests.support import ROOT, SCRIPT, load_samples, wait_until

SCENARIOS = os.path.join(ROOT, "tests", "browser_scenarios.py")
VENV_PYTHON = os.path.join(ROOT, ".ci", "venv-browser", "bin", "python")
TOKEN = "browser-test-token"
XSS = "<img src=x onerror=alert(1)>"
SCREENSHOTS = ("inbox.png", "event.png", "dead-letters.png")

BROKEN_HANDLER = '''
def handle(event):
    raise RuntimeError("message.py is broken (the test fixes it before replaying)")
'''
FIXED_HANDLER = '''
import os

def handle(event):
    with open(os.path.join(%r, "handled.log"), "a", encoding="utf-8") as log:
        log.write(event.message_id + "\\n")
    print("handled", event.message_id)
'''


@functools.lru_cache(maxsize=None)
def browser_python():
    """(a Python that can drive chromium with Selenium, or None and why not)."""
    configured = os.environ.get("BROWSER_TEST_PYTHON")
    candidates = [configured] if configured else [python for python in (VENV_PYTHON, sys.executable)
                                                  if os.path.exists(python)]
    reasons = []
    for python in candidates:
        try:
            check = subprocess.run([python, SCENARIOS, "--check"], capture_output=True, text=True, timeout=30)
            reason = json.loads(check.stdout)["reason"] if check.stdout.strip() else check.stderr.strip()[-300:]
        except (OSError, subprocess.SubprocessError, ValueError, KeyError) as exc:
            check, reason = None, "%s cannot run %s: %s" % (python, SCENARIOS, exc)
        if check is not None and check.returncode == 0:
            return python, ""
        reasons.append(reason)
    return None, ("no browser to drive: %s. Needs apt-get install chromium chromium-driver and a Python with"
                  " selenium in BROWSER_TEST_PYTHON (python3 -m venv .ci/venv-browser &&"
                  " .ci/venv-browser/bin/pip install selenium)" % "; ".join(reasons or ["no Python to try"]))


def message(message_id, body):
    sample = next(event for event in load_samples() if event["event"] == "message")
    return dict(sample, message_id=message_id, body=body)


class Session:
    """One wabhook process with a filled inbox and one run of browser_scenarios.py against it."""

    def __init__(self, python):
        self.tmp = tempfile.mkdtemp(prefix="wabhook-browser-")
        self.handlers = os.path.join(self.tmp, "handlers")
        os.mkdir(self.handlers)
        self.db = os.path.join(self.tmp, "wabhook.db")
        self.process = None
        self.python = python
        self.screenshots = os.environ.get("WABHOOK_SCREENSHOTS") or os.path.join(self.tmp, "screenshots")
        os.makedirs(self.screenshots, exist_ok=True)

    def close(self):
        if self.process and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)
        shutil.rmtree(self.tmp, ignore_errors=True)

    def server_log(self):
        with open(os.path.join(self.tmp, "server.log"), encoding="utf-8", errors="replace") as handle:
            return handle.read()

    def start(self):
        log = open(os.path.join(self.tmp, "server.log"), "wb")
        self.process = subprocess.Popen(
            [sys.executable, SCRIPT, "serve", "--host", "127.0.0.1", "--port", "0", "--db", self.db,
             "--handlers", self.handlers, "--retry-delay", "0.05", "--retries", "1", "--token", TOKEN],
            stdout=log, stderr=subprocess.STDOUT, cwd=self.tmp)
        log.close()

        def listening():
            if self.process.poll() is not None:
                raise AssertionError("wabhook exited with %s:\n%s" % (self.process.returncode, self.server_log()))
            return re.search(r"listening on http://127\.0\.0\.1:(\d+)", self.server_log())
        self.url = "http://127.0.0.1:%s" % wait_until(listening, timeout=10, message="wabhook to listen").group(1)

    def request(self, method, path, body=None, token=TOKEN):
        """(status, parsed JSON or raw text) from the server over 127.0.0.1."""
        headers = {"Content-Type": "application/json"}
        if token:
            headers["Authorization"] = "Bearer " + token
        data = json.dumps(body).encode("utf-8") if body is not None else None
        request = urllib.request.Request(self.url + path, data=data, headers=headers, method=method)
        try:
            with urllib.request.urlopen(request, timeout=5) as response:
                status, raw = response.status, response.read()
        except urllib.error.HTTPError as error:
            status, raw = error.code, error.read()
        try:
            return status, json.loads(raw.decode("utf-8"))
        except ValueError:
            return status, raw.decode("utf-8", "replace")

    def post(self, body):
        status, reply = self.request("POST", "/hook", body)
        if status != 200:
            raise AssertionError("POST /hook answered %s: %r" % (status, reply))
        return reply["id"]

    def status(self, event_id):
        connection = sqlite3.connect(self.db, timeout=5)
        try:
            rows = connection.execute("SELECT status FROM events WHERE id = ?", (event_id,)).fetchall()
        finally:
            connection.close()
        return rows[0][0] if rows else None

    def wait_status(self, event_id, status):
        wait_until(lambda: self.status(event_id) == status, timeout=10,
                   message="event %d to be %s (is %s)" % (event_id, status, self.status(event_id)))

    def write_handler(self, source):
        with open(os.path.join(self.handlers, "message.py"), "w", encoding="utf-8") as handle:
            handle.write(source)

    def handled(self):
        try:
            with open(os.path.join(self.tmp, "handled.log"), encoding="utf-8") as handle:
                return handle.read().split()
        except FileNotFoundError:
            return []

    def fill(self):
        """Two dead letters (broken handler, --retries 1), then a fixed handler, a plain message and an XSS one."""
        self.write_handler(BROKEN_HANDLER)
        self.start()
        self.dead_ids = [self.post(message("dead-%d" % number, "this one died %d" % number)) for number in (1, 2)]
        for event_id in self.dead_ids:
            self.wait_status(event_id, "dead")
        self.write_handler(FIXED_HANDLER % self.tmp)
        self.done_id = self.post(message("hello-1", "Hello!"))
        self.xss_id = self.post(message("xss-1", XSS))
        for event_id in (self.done_id, self.xss_id):
            self.wait_status(event_id, "done")
        self.unauthorized = self.request("GET", "/api/stats", token=None)

    def drive(self):
        command = [self.python, SCENARIOS, self.url, TOKEN, "--done-id", str(self.done_id),
                   "--dead-ids", "%d,%d" % tuple(self.dead_ids), "--xss-id", str(self.xss_id),
                   "--body-text", "Hello!", "--min-received", "4", "--screenshots", self.screenshots,
                   "--post-body", json.dumps(message("live-1", "posted while the page is open"))]
        run = subprocess.run(command, capture_output=True, text=True, timeout=90)
        try:
            report = json.loads(run.stdout)
        except ValueError:
            raise AssertionError("browser_scenarios.py exited %s without a report:\n%s\n%s"
                                 % (run.returncode, run.stdout[-2000:], run.stderr[-4000:])) from None
        if "error" in report:
            raise AssertionError("browser_scenarios.py: %s" % report["error"])
        self.report = report
        self.results = {item["name"]: item for item in report["scenarios"]}


class InboxPageTest(unittest.TestCase):
    """Each test reads one scenario of a single browser session (a browser start costs seconds)."""

    session = None
    session_error = None

    @classmethod
    def tearDownClass(cls):
        if cls.session:
            cls.session.close()
            cls.session = None

    def setUp(self):
        # Skipped here, not in setUpClass: a class-level skip is not counted in "Ran N tests".
        python, why_not = browser_python()
        if not python:
            self.skipTest(why_not)
        cls = type(self)
        if cls.session is None and cls.session_error is None:
            cls.session = Session(python)
            try:
                cls.session.fill()
                cls.session.drive()
            except Exception as exc:
                log = cls.session.server_log() if cls.session.process else ""
                cls.session_error = "%s\n--- wabhook's log (end):\n%s" % (exc, log[-3000:])
        if cls.session_error:
            self.fail(cls.session_error)

    def assertScenario(self, name):
        results = self.session.results
        if name not in results:
            failed = ["%s: %s" % (item["name"], item["detail"]) for item in results.values() if not item["ok"]]
            self.fail("scenario %s did not run, after: %s" % (name, "\n".join(failed)))
        result = results[name]
        self.assertTrue(result["ok"], "%s: %s" % (name, result["detail"]))
        return result

    def test_api_and_page_refuse_without_the_token(self):
        status, reply = self.session.unauthorized
        self.assertEqual(status, 401, "GET /api/stats without a token answered %s: %r" % (status, reply))
        self.assertEqual(reply.get("error") if isinstance(reply, dict) else reply, "unauthorized")
        self.assertScenario("refuses_without_token")

    def test_token_form_opens_the_inbox_and_keeps_the_token_in_session_storage(self):
        self.assertScenario("token_opens_inbox")

    def test_page_loads_and_polls_with_no_console_errors(self):
        self.assertScenario("loads_without_console_errors")
        self.assertScenario("no_console_errors")

    def test_counters_show_received_and_per_handler(self):
        self.assertScenario("counters")

    def test_posted_event_shows_within_2_seconds(self):
        self.assertScenario("posted_event_shows_within_2s")

    def test_event_detail_shows_pretty_body_and_deliveries(self):
        self.assertScenario("shows_body")

    def test_dead_letters_show_replay_and_discard(self):
        self.assertScenario("dead_letters_show_buttons")

    def test_replay_runs_the_fixed_handler_again(self):
        self.assertScenario("replay_runs_handler_again")
        replayed = self.session.dead_ids[0]
        self.assertEqual(self.session.status(replayed), "done")
        self.assertIn("dead-1", self.session.handled(), "the fixed message.py did not run for event %d" % replayed)

    def test_discard_marks_a_dead_letter_discarded(self):
        self.assertScenario("discard_sets_discarded")
        discarded = self.session.dead_ids[1]
        self.assertEqual(self.session.status(discarded), "discarded")
        self.assertNotIn("dead-2", self.session.handled(), "a discarded event ran its handler")

    def test_xss_payload_in_a_body_stays_text(self):
        self.assertScenario("xss_body_stays_text")

    def test_screenshots_of_the_main_views(self):
        for name in SCREENSHOTS:
            path = os.path.join(self.session.screenshots, name)
            self.assertIn(path, self.session.report["screenshots"])
            with open(path, "rb") as handle:
                self.assertEqual(handle.read(8), b"\x89PNG\r\n\x1a\n", path)


if __name__ == "__main__":
    unittest.main()
