"""The command line as users run it: every subcommand as a real `python wabhook.py ...` subprocess.

--version and --help; `send` of every documented sample with --set, --bridge,
--url and --token; `check`; `events` and `stats` as text and JSON; `replay ID`
and `replay --dead` past one batch; exit statuses (0 ok, 1 error, 2 usage);
every flag from WABHOOK_<FLAG> with the flag winning; errors that say what to
do (port in use, inbox not writable) without a traceback; the bare command
serving; and the README's walk-through from first event to a replayed dead letter.
"""

import base64
import json
import os
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time

from tests.support import SCRIPT, WabhookTestCase, load_samples, wait_until

import wabhook

MESSAGE = load_samples()[0]
SAMPLES = {sample["event"]: sample for sample in load_samples()}

RECORD_HANDLER = '''
import json, os
def handle(event):
    with open(os.path.join(%(tmp)r, "seen"), "a") as out:
        out.write(json.dumps([event.id, event.event, event.bridge]) + "\\n")
'''
FAILING_HANDLER = "def handle(event):\n    raise RuntimeError('cannot handle %s yet' % event.event)\n"

# The README's example handler, word for word.
README_HANDLER = '''# handlers/message.py
from wabhook import MessageEvent

def handle(event: MessageEvent) -> None:
    if not event.from_me:
        print("%s: %s" % (event.name, event.body))
'''
BROKEN_README_HANDLER = '''from wabhook import MessageEvent

def handle(event: MessageEvent) -> None:
    raise ValueError("broken on purpose: " + event.body)
'''

EVENT_LINE = re.compile(r"(\d+)\s+\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\s+(\S+)\s+(\S+)\s+"
                        r"(pending|done|dead|discarded)\s+(.*)")


def event_rows(output):
    """The event lines of `events` text output: after its header row, not the indented error lines."""
    lines = output.splitlines()
    assert lines[0] == wabhook.EVENTS_HEADER, lines[:1]
    return [line for line in lines[1:] if not line.startswith(" ")]

# One row per option: (environment value, the Config value it gives, a flag value, the Config value of that).
OPTION_CASES = {
    "host": ("127.0.0.2", "127.0.0.2", "::1", "::1"),
    "port": ("4001", 4001, "5002", 5002),
    "path": ("/in", "/in", "/other/", "/other"),
    "db": ("/srv/env.db", "/srv/env.db", "flag.db", "flag.db"),
    "handlers": ("/srv/env-handlers", "/srv/env-handlers", "flag-handlers", "flag-handlers"),
    "workers": ("3", 3, "12", 12),
    "retries": ("7", 7, "2", 2),
    "retry_delay": ("500ms", 0.5, "2s", 2.0),
    "script_timeout": ("2m", 120.0, "90", 90.0),
    "script_env": ("NATS_URL, LANG", ("NATS_URL", "LANG"), "AWS_REGION", ("AWS_REGION",)),
    "shutdown_timeout": ("3s", 3.0, "1m", 60.0),
    "timeout": ("1h", 3600.0, "15s", 15.0),
    "max_connections": ("200", 200, "5000", 5000),
    "max_body": ("512KiB", 512 * 1024, "2MiB", 2 * 1024 * 1024),
    "max_inflight": ("8MiB", 8 * 1024 * 1024, "1g", 1024 ** 3),
    "retention": ("2d", 2 * 86400.0, "12h", 12 * 3600.0),
    "dedup_window": ("30", 30.0, "5m", 300.0),
    "token": ("env-token", "env-token", "flag-token", "flag-token"),
    "secret": ("whsec_ZW52", "whsec_ZW52", "whsec_ZmxhZw==", "whsec_ZmxhZw=="),
    "tls_cert": ("/env/cert.pem", "/env/cert.pem", "flag-cert.pem", "flag-cert.pem"),
    "tls_key": ("/env/key.pem", "/env/key.pem", "flag-key.pem", "flag-key.pem"),
    "log_format": ("json", "json", "text", "text"),
    "log_level": ("warning", "warning", "debug", "debug"),
    "access_log": ("true", True, True, True),
    "no_ui": ("1", True, True, True),
}


def free_port():
    """A port nothing listens on (bound and released at once)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class CliTestCase(WabhookTestCase):
    def cli(self, *args, env=None, expect=0):
        """run_cli, asserting its exit status and that it never printed a traceback."""
        result = self.run_cli(*args, env=env)
        self.assertEqual(result.returncode, expect, "wabhook.py %s\nstdout: %s\nstderr: %s"
                         % (" ".join(args), result.stdout, result.stderr))
        self.assertNotIn("Traceback", result.stderr)
        return result

    def cli_all(self, commands, env=None, envs=None):
        """Several `python wabhook.py ...` at once (they are independent); CompletedProcess for each.
        `envs`: one environment a command, added to `env`."""
        envs = envs or [{}] * len(commands)
        running = [(args, subprocess.Popen([sys.executable, SCRIPT] + list(args), stdout=subprocess.PIPE,
                                           stderr=subprocess.PIPE, text=True, cwd=self.tmp,
                                           env=dict(os.environ, **(env or {}), **extra)))
                   for args, extra in zip(commands, envs)]
        results = []
        for args, process in running:
            stdout, stderr = process.communicate(timeout=60)
            results.append(subprocess.CompletedProcess(args, process.returncode, stdout, stderr))
        return results

    def start_bare(self, *args, env=None):
        """`python wabhook.py ARGS` (no subcommand) as a server process; (process, port from its log)."""
        log_path = os.path.join(self.tmp, "bare-%d.log" % len(self.processes))
        with open(log_path, "wb") as log_file:
            process = subprocess.Popen([sys.executable, SCRIPT] + list(args), stdout=log_file,
                                       stderr=subprocess.STDOUT, cwd=self.tmp, env=dict(os.environ, **(env or {})))
        process.log_path = log_path
        self.processes.append(process)
        match = wait_until(lambda: process.poll() is not None and "exited" or
                           re.search(r"listening on https?://[^:]+:(\d+)", self.process_log(process)),
                           message="the bare server process to listen")
        if match == "exited":
            self.fail("server exited with %s:\n%s" % (process.returncode, self.process_log(process)))
        return process, int(match.group(1))

    def events_json(self, *args):
        return json.loads(self.cli("events", "--db", self.db, "--json", *args).stdout)


class VersionAndHelpTest(CliTestCase):
    def test_version_prints_the_version(self):
        result = self.cli("--version")
        self.assertEqual(result.stdout.strip(), "wabhook " + wabhook.__version__)

    def test_help_of_every_subcommand_exits_zero_and_shows_an_example(self):
        self.assertEqual(set(wabhook.COMMANDS), {"serve", "send", "samples", "check", "events", "show", "replay",
                                                 "discard", "stats"})
        commands = [[name, "--help"] for name in wabhook.COMMANDS]
        helps = {}
        for args, result in zip(commands, self.cli_all(commands)):
            with self.subTest(command=args[0]):
                self.assertEqual(result.returncode, 0, result.stderr)
                self.assertIn("example", result.stdout.lower())
                self.assertIn("python3 wabhook.py %s" % args[0], result.stdout)
                helps[args[0]] = result.stdout
        # Each lists only the flags it uses.
        self.assertIn("--workers", helps["serve"])
        self.assertIn("--token", helps["send"])
        self.assertNotIn("--workers", helps["send"])
        for command in ("events", "show", "replay", "discard", "stats"):
            self.assertIn("--db", helps[command])
            self.assertNotIn("--port", helps[command])
            self.assertNotIn("--workers", helps[command])
        self.assertNotIn("--db", helps["samples"])
        refused = self.run_cli("events", "--port", "3000")
        self.assertEqual(refused.returncode, 2)
        self.assertIn("unrecognized arguments: --port", refused.stderr)
        self.assertIn("WABHOOK_DB", helps["events"])  # settings name their environment variable


class SendTest(CliTestCase):
    def stored(self, event_id):
        bridge, body = self.query("SELECT bridge, body FROM events WHERE id = ?", (event_id,))[0]
        return bridge, json.loads(body)

    def test_send_posts_every_documented_sample_with_set_overrides_and_bridge(self):
        server = self.start_server(token="tok")
        overrides = ["--set", "body=hi", "--set", "from_me=true", "--set", 'selected_options=["A","B"]']
        commands = [["send", event_type, "--port", str(server.port), "--token", "tok", "--bridge", "b-1"]
                    + overrides for event_type in wabhook.EVENT_TYPES]
        self.assertEqual(sorted(SAMPLES), sorted(wabhook.EVENT_TYPES))
        for args, result in zip(commands, self.cli_all(commands)):
            event_type = args[1]
            with self.subTest(event=event_type):
                self.assertEqual(result.returncode, 0, result.stderr)
                status, _, reply = result.stdout.strip().partition(" ")
                self.assertEqual(status, "200")
                reply = json.loads(reply)
                self.assertEqual((reply["ok"], reply["duplicate"]), (True, False))
                expected = dict(SAMPLES[event_type], body="hi", from_me=True, selected_options=["A", "B"])
                self.assertEqual(self.stored(reply["id"]), ("b-1", expected))

    def test_send_without_overrides_posts_the_sample_as_documented(self):
        server = self.start_server()
        result = self.cli("send", "message", "--port", str(server.port))
        reply = json.loads(result.stdout.strip().partition(" ")[2])
        self.assertEqual(self.stored(reply["id"]), (None, MESSAGE))
        again = self.cli("send", "message", "--port", str(server.port))  # same message_id: a duplicate
        self.assertEqual(json.loads(again.stdout.strip().partition(" ")[2]),
                         {"ok": True, "id": reply["id"], "duplicate": True})
        via_url = self.cli("send", "connected", "--url", "http://127.0.0.1:%d/hook/via-url" % server.port)
        self.assertEqual(self.stored(json.loads(via_url.stdout.strip().partition(" ")[2])["id"]),
                         ("via-url", SAMPLES["connected"]))

    def test_send_reports_the_servers_refusal_with_exit_1(self):
        server = self.start_server(token="tok")
        result = self.cli("send", "connected", "--port", str(server.port), expect=1)
        self.assertTrue(result.stdout.startswith("401 "), result.stdout)
        self.assertEqual(json.loads(result.stdout[4:])["error"], "unauthorized")
        self.assertEqual(self.query("SELECT COUNT(*) FROM events"), [(0,)])

    def test_send_to_a_closed_port_exits_1_with_a_helpful_error(self):
        port = free_port()
        result = self.cli("send", "message", "--port", str(port), expect=1)
        self.assertEqual(result.stdout, "")
        self.assertTrue(result.stderr.startswith("error: "), result.stderr)
        self.assertIn("127.0.0.1:%d" % port, result.stderr)
        self.assertIn("is the server running", result.stderr)


class CheckTest(CliTestCase):
    def test_check_reports_problems_with_exit_1_and_passes_a_clean_folder(self):
        self.write_handler("message.py", RECORD_HANDLER % {"tmp": self.tmp})
        self.write_handler("mesage.py", RECORD_HANDLER % {"tmp": self.tmp})
        self.write_handler("connected.py", "def handel(event):\n    pass\n")
        result = self.cli("check", "--handlers", self.handlers, expect=1)
        self.assertIn("ok       message.py", result.stdout)
        self.assertRegex(result.stdout, r"problem\s+mesage\.py: .*did you mean message")
        self.assertRegex(result.stdout, r"problem\s+connected\.py: .*handle")
        os.remove(os.path.join(self.handlers, "mesage.py"))
        os.remove(os.path.join(self.handlers, "connected.py"))
        result = self.cli("check", "--handlers", self.handlers)
        self.assertIn("1 handlers ok, 0 problems", result.stdout)


class InspectTest(CliTestCase):
    """`events` and `stats` over an inbox with three delivered messages and one dead `connected`."""

    def setUp(self):
        super().setUp()
        self.write_handler("message.py", RECORD_HANDLER % {"tmp": self.tmp})
        self.write_handler("connected.py", FAILING_HANDLER)
        server = self.start_server(retries=1)
        self.ids = [self.post(server, dict(MESSAGE, message_id="M%d" % n), path=path)[1]["id"]
                    for n, path in enumerate(["/hook/shop-1", "/hook", "/hook"])]
        self.dead_id = self.post(server, SAMPLES["connected"])[1]["id"]
        for event_id in self.ids:
            self.wait_status(event_id, "done")
        self.wait_status(self.dead_id, "dead")
        self.stop_server(server)

    def test_events_lists_newest_first_with_deliveries_and_dead_errors(self):
        output = self.cli("events", "--db", self.db).stdout
        lines = output.splitlines()[1:]
        self.assertIn("RECEIVED (UTC)", output.splitlines()[0])
        rows = [EVENT_LINE.fullmatch(line.rstrip()) for line in event_rows(output)]
        self.assertNotIn(None, rows, lines)
        self.assertEqual([(int(r.group(1)), r.group(2), r.group(3), r.group(4), r.group(5)) for r in rows], [
            (self.dead_id, "-", "connected", "dead", "connected.py:dead(1)"),
            (self.ids[2], "-", "message", "done", "message.py:done(1)"),
            (self.ids[1], "-", "message", "done", "message.py:done(1)"),
            (self.ids[0], "shop-1", "message", "done", "message.py:done(1)"),
        ])
        self.assertIn("connected.py: RuntimeError: cannot handle connected yet", lines[1])

    def test_events_filters_by_status_and_limit_in_text(self):
        lines = self.cli("events", "--db", self.db, "--status", "dead").stdout.splitlines()[1:]
        self.assertEqual(int(EVENT_LINE.fullmatch(lines[0].rstrip()).group(1)), self.dead_id)
        self.assertEqual(len(lines), 2, lines)  # the event and its handler's last error
        lines = event_rows(self.cli("events", "--db", self.db, "--status", "done", "--limit", "1").stdout)
        self.assertEqual([int(EVENT_LINE.fullmatch(line.rstrip()).group(1)) for line in lines], [self.ids[2]])
        self.assertEqual(self.cli("events", "--db", self.db, "--status", "pending").stdout.strip(), "no events")

    def test_events_filters_by_type_and_bridge(self):
        def ids(*args):
            return [item["id"] for item in self.events_json(*args)]
        self.assertEqual(ids("--type", "connected"), [self.dead_id])
        self.assertEqual(ids("--type", "message"), self.ids[::-1])
        self.assertEqual(ids("--bridge", "shop-1"), [self.ids[0]])
        self.assertEqual(ids("--bridge", "-"), [self.dead_id, self.ids[2], self.ids[1]])
        self.assertEqual(ids("--bridge", "-", "--type", "message", "--status", "done", "--limit", "1"), [self.ids[2]])
        self.assertEqual(ids("--type", "typing"), [])

    def test_show_prints_the_body_and_each_handlers_attempts_error_and_output(self):
        text = self.cli("show", str(self.dead_id), "--db", self.db).stdout
        self.assertIn("event %d: connected from bridge (default)" % self.dead_id, text)
        self.assertIn('"phone": "15550001234"', text)  # the body, indented
        self.assertIn("connected.py: dead after 1 attempt", text)
        self.assertRegex(text, r"last run: started \d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC, ended ")
        self.assertIn("RuntimeError: cannot handle connected yet", text)
        detail = json.loads(self.cli("show", str(self.ids[0]), "--db", self.db, "--json").stdout)
        self.assertEqual((detail["id"], detail["bridge"], detail["status"]), (self.ids[0], "shop-1", "done"))
        [delivery] = detail["deliveries"]
        self.assertEqual((delivery["handler"], delivery["status"], delivery["attempts"], delivery["exit_status"]),
                         ("message.py", "done", 1, None))
        self.assertLessEqual(delivery["started_at"], delivery["finished_at"])
        missing = self.cli("show", "9999", "--db", self.db, expect=1)
        self.assertIn("no event 9999", missing.stderr)

    def test_discard_sets_a_dead_letter_aside_and_refuses_the_others(self):
        refused = self.cli("discard", str(self.ids[0]), "9999", "--db", self.db, expect=1)
        self.assertIn("event %d is done, not dead" % self.ids[0], refused.stderr)
        self.assertIn("no event 9999", refused.stderr)
        result = self.cli("discard", str(self.dead_id), "--db", self.db)
        self.assertEqual(result.stdout.strip(), "discarded 1 events: %d" % self.dead_id)
        stats = json.loads(self.cli("stats", "--db", self.db, "--json").stdout)
        self.assertEqual(stats["events"], {"pending": 0, "done": 3, "dead": 0, "discarded": 1})
        self.assertEqual(self.events_json("--status", "discarded")[0]["deliveries"][0]["status"], "discarded")
        self.assertEqual(self.cli("discard", "--dead", "--db", self.db).stdout.strip(), "discarded 0 dead events")
        # Kept for the record, and replayable like a dead letter.
        self.cli("replay", str(self.dead_id), "--db", self.db)
        self.assertEqual(self.query("SELECT status FROM deliveries WHERE event_id = ?", (self.dead_id,)),
                         [("pending",)])

    def test_events_json_has_bodies_deliveries_and_full_errors(self):
        everything = self.events_json()
        self.assertEqual([item["id"] for item in everything], [self.dead_id] + self.ids[::-1])
        dead = self.events_json("--status", "dead")
        self.assertEqual(len(dead), 1)
        self.assertEqual((dead[0]["id"], dead[0]["event"], dead[0]["status"], dead[0]["bridge"]),
                         (self.dead_id, "connected", "dead", None))
        self.assertEqual(json.loads(dead[0]["body"]), SAMPLES["connected"])
        [delivery] = dead[0]["deliveries"]
        self.assertEqual((delivery["handler"], delivery["status"], delivery["attempts"]), ("connected.py", "dead", 1))
        self.assertIn("Traceback", delivery["last_error"])
        self.assertIn("RuntimeError: cannot handle connected yet", delivery["last_error"])
        done = self.events_json("--status", "done", "--limit", "2")
        self.assertEqual([item["id"] for item in done], [self.ids[2], self.ids[1]])
        self.assertEqual(json.loads(done[1]["body"]), dict(MESSAGE, message_id="M1"))
        self.assertEqual(done[0]["deliveries"],
                         [{"handler": "message.py", "status": "done", "attempts": 1, "last_error": None}])
        self.assertEqual(self.events_json("--limit", "1")[0]["id"], self.dead_id)

    def test_stats_counts_by_status_type_and_handler(self):
        stats = json.loads(self.cli("stats", "--db", self.db, "--json").stdout)
        self.assertEqual(stats["events"], {"pending": 0, "done": 3, "dead": 1, "discarded": 0})
        self.assertEqual(stats["by_type"], {"connected": 1, "message": 3})
        self.assertEqual(stats["deliveries_by_handler"], {"connected.py": {"dead": 1}, "message.py": {"done": 3}})
        lines = self.cli("stats", "--db", self.db).stdout.splitlines()
        self.assertEqual(lines, ["events: 0 pending, 3 done, 1 dead, 0 discarded", "by type: connected 1, message 3",
                                 "handler connected.py: 1 dead", "handler message.py: 3 done"])

    def test_events_and_stats_without_an_inbox_exit_1_and_say_so(self):
        missing = os.path.join(self.tmp, "elsewhere.db")
        for command in ("events", "stats"):
            result = self.cli(command, "--db", missing, expect=1)
            self.assertTrue(result.stderr.startswith("error: "), result.stderr)
            self.assertIn(missing, result.stderr)
            self.assertFalse(os.path.exists(missing))


class ReplayTest(CliTestCase):
    def insert_dead_events(self, count):
        """`count` dead-lettered events written straight into the inbox, as a dispatcher leaves them."""
        now = time.time()
        connection = sqlite3.connect(self.db, isolation_level=None)
        try:
            connection.execute("BEGIN IMMEDIATE")
            first = connection.execute("SELECT COALESCE(MAX(id), 0) + 1 FROM events").fetchone()[0]
            ids = list(range(first, first + count))
            connection.executemany(
                "INSERT INTO events (id, received_at, bridge, event, lane, body, status, dispatched)"
                " VALUES (?, ?, NULL, 'message', ?, ?, 'dead', 1)",
                [(i, now, "lane-%d" % i, json.dumps(dict(MESSAGE, message_id="bulk-%d" % i))) for i in ids])
            connection.executemany(
                "INSERT INTO deliveries (event_id, handler, lane, status, attempts, next_attempt_at, last_error,"
                " updated_at) VALUES (?, 'message.py', ?, 'dead', 1, 0, 'RuntimeError: bulk', ?)",
                [(i, "lane-%d" % i, now) for i in ids])
            connection.execute("COMMIT")
        finally:
            connection.close()
        return ids

    def test_replay_id_requeues_a_dead_event_and_a_running_server_delivers_it(self):
        self.shorten(IDLE_POLL_SECONDS=0.1)  # how soon the server sees another process's replay
        self.write_handler("message.py", FAILING_HANDLER)
        server = self.start_server(retries=1)
        event_id = self.post(server, MESSAGE)[1]["id"]
        self.wait_status(event_id, "dead")
        self.write_handler("message.py", RECORD_HANDLER % {"tmp": self.tmp})
        result = self.cli("replay", str(event_id), "--db", self.db)
        self.assertEqual(result.stdout.strip(), "replayed 1 events: %d" % event_id)
        self.wait_status(event_id, "done")
        self.assertEqual([json.loads(line)[0] for line in self.read_lines("seen")], [event_id])
        self.assertEqual(self.query("SELECT status, attempts, last_error FROM deliveries WHERE event_id = ?",
                                    (event_id,)), [("done", 1, None)])
        # A delivered event replayed is dispatched anew to the handlers present now.
        self.write_handler("message.audit.py", RECORD_HANDLER % {"tmp": self.tmp})
        self.cli("replay", str(event_id), "--db", self.db)
        wait_until(lambda: len(self.read_lines("seen")) == 3, message="both handlers to run the replayed event")
        self.wait_status(event_id, "done")

    def test_replay_of_a_missing_id_exits_1_and_names_it(self):
        self.start_server()  # creates the inbox
        result = self.cli("replay", "99999", "--db", self.db, expect=1)
        self.assertIn("error: no event 99999", result.stderr)
        self.assertIn("replayed 0 events", result.stdout)

    def test_replay_dead_requeues_every_dead_event_past_one_batch_with_progress(self):
        self.write_handler("message.py", FAILING_HANDLER)
        server = self.start_server(retries=1)
        real = [self.post(server, dict(MESSAGE, message_id="R%d" % n))[1]["id"] for n in range(3)]
        for event_id in real:
            self.wait_status(event_id, "dead")
        self.stop_server(server)
        done_id = self.insert_dead_events(1)[0]
        connection = sqlite3.connect(self.db)
        with connection:
            connection.execute("UPDATE events SET status = 'done' WHERE id = ?", (done_id,))
            connection.execute("UPDATE deliveries SET status = 'done', last_error = NULL WHERE event_id = ?",
                               (done_id,))
        connection.close()
        bulk = self.insert_dead_events(2 * wabhook.REPLAY_BATCH + 100)
        total = len(real) + len(bulk)

        result = self.cli("replay", "--dead", "--db", self.db)
        self.assertEqual(result.stdout.strip(), "replayed %d dead events" % total)
        progress = re.findall(r"(\d+) so far", result.stderr)
        self.assertEqual([int(n) for n in progress], [wabhook.REPLAY_BATCH, 2 * wabhook.REPLAY_BATCH, total])
        self.assertEqual(self.query("SELECT status, COUNT(*) FROM events GROUP BY status ORDER BY status"),
                         [("done", 1), ("pending", total)])
        self.assertEqual(self.query("SELECT status, attempts, last_error, COUNT(*) FROM deliveries"
                                    " WHERE event_id != ? GROUP BY 1, 2, 3", (done_id,)),
                         [("pending", 0, None, total)])
        self.assertEqual(self.query("SELECT status FROM deliveries WHERE event_id = ?", (done_id,)), [("done",)])
        again = self.cli("replay", "--dead", "--db", self.db)
        self.assertEqual(again.stdout.strip(), "replayed 0 dead events")


class UsageAndConfigErrorTest(CliTestCase):
    def test_usage_errors_exit_2_without_a_traceback(self):
        commands = [
            ["replay"], ["replay", "1", "--dead"], ["replay", "one"],
            ["events", "--status", "gone"], ["events", "--limit", "many"],
            ["send"], ["send", "mesage"], ["send", "message", "--set", "no-equals-sign"],
            ["send", "message", "--bridge", "not a label"],
            ["--no-such-flag"], ["stats", "--no-such-flag"], ["bogus-command"],
        ]
        for args, result in zip(commands, self.cli_all(commands)):
            with self.subTest(args=args):
                self.assertEqual(result.returncode, 2, result.stdout + result.stderr)
                self.assertIn("error", result.stderr)
                self.assertNotIn("Traceback", result.stderr)

    def test_bad_setting_values_exit_2_with_an_error_naming_the_setting(self):
        # `serve` takes every setting; one accepted by mistake would exit 1 instead (no such folder).
        missing_db = os.path.join(self.tmp, "no-such-folder", "wabhook.db")
        cases = [
            (["--port", "abc"], {}, "--port"), (["--port", "70000"], {}, "--port"),
            (["--workers", "0"], {}, "--workers"), (["--retry-delay", "soon"], {}, "--retry-delay"),
            (["--max-body", "lots"], {}, "--max-body"), (["--log-format", "xml"], {}, "--log-format"),
            (["--log-level", "loud"], {}, "--log-level"), (["--path", "no-slash"], {}, "--path"),
            (["--tls-cert", "cert.pem"], {}, "--tls-key"), (["--path", "/healthz"], {}, "--path"),
            (["--db", ":memory:"], {}, "--db"),
            (["--dedup-window", "8d"], {}, "--dedup-window"),  # longer than --retention: 7d
            ([], {"WABHOOK_RETRIES": "many"}, "WABHOOK_RETRIES"),
            ([], {"WABHOOK_ACCESS_LOG": "perhaps"}, "WABHOOK_ACCESS_LOG"),
        ]
        results = self.cli_all([["serve", "--port", "0", "--db", missing_db] + flags for flags, _env, _n in cases],
                               envs=[env for _flags, env, _named in cases])
        for (flags, env, named), result in zip(cases, results):
            with self.subTest(flags=flags, env=env):
                self.assertEqual(result.returncode, 2, result.stderr)
                self.assertTrue(result.stderr.startswith("error: "), result.stderr)
                self.assertIn(named, result.stderr)
                self.assertNotIn("Traceback", result.stderr)

    def test_port_in_use_exits_1_naming_the_port(self):
        with socket.socket() as holder:
            holder.bind(("127.0.0.1", 0))
            holder.listen(1)
            port = holder.getsockname()[1]
            result = self.cli("serve", "--host", "127.0.0.1", "--port", str(port), "--db", self.db,
                              "--handlers", self.handlers, expect=1)
        self.assertIn("error: ", result.stderr)
        self.assertIn(str(port), result.stderr)
        self.assertIn("--port", result.stderr)

    def test_inbox_that_cannot_be_opened_exits_1_naming_it(self):
        not_sqlite = os.path.join(self.tmp, "notes.txt")
        with open(not_sqlite, "w") as handle:
            handle.write("these are notes, not an SQLite database\n" * 20)
        for db in (os.path.join(self.tmp, "no-such-dir", "wabhook.db"), self.tmp, not_sqlite):
            with self.subTest(db=db):
                result = self.cli("serve", "--host", "127.0.0.1", "--port", "0", "--db", db,
                                  "--handlers", self.handlers, expect=1)
                self.assertIn("error: ", result.stderr)
                self.assertIn(db, result.stderr)
        self.assertFalse(os.path.exists(os.path.join(self.tmp, "no-such-dir")))

    def test_handlers_folder_that_cannot_be_created_exits_1_naming_it(self):
        blocker = os.path.join(self.tmp, "a-file")
        open(blocker, "w").close()
        folder = os.path.join(blocker, "handlers")
        result = self.cli("serve", "--host", "127.0.0.1", "--port", "0", "--db", self.db, "--handlers", folder,
                          expect=1)
        self.assertIn("error: ", result.stderr)
        self.assertIn(folder, result.stderr)

    def test_missing_handlers_folder_is_created_and_logged(self):
        folder = os.path.join(self.tmp, "new-handlers")
        process, port = self.start_process("--handlers", folder)
        self.assertTrue(os.path.isdir(folder))
        self.assertRegex(self.process_log(process), r"created the handlers folder .*new-handlers")
        self.assertEqual(self.post(port, SAMPLES["connected"])[0], 200)
        self.assertEqual(self.terminate(process), 0)


class EnvironmentTest(CliTestCase):
    def test_every_option_reads_its_environment_variable(self):
        self.assertEqual(sorted(OPTION_CASES), sorted(option.name for option in wabhook.OPTIONS))
        environ = {wabhook.env_name(name): case[0] for name, case in OPTION_CASES.items()}
        self.assertIn("WABHOOK_RETRY_DELAY", environ)
        config = wabhook.build_config({}, environ)
        for name, (_env, expected, _flag, _flag_expected) in OPTION_CASES.items():
            with self.subTest(option=name):
                self.assertEqual(getattr(config, name), expected)

    def test_a_flag_wins_over_the_environment(self):
        environ = {wabhook.env_name(name): case[0] for name, case in OPTION_CASES.items()}
        flags = {name: case[2] for name, case in OPTION_CASES.items()}
        config = wabhook.build_config(flags, environ)
        for name, (_env, _expected, _flag, flag_expected) in OPTION_CASES.items():
            with self.subTest(option=name):
                self.assertEqual(getattr(config, name), flag_expected)

    def test_defaults_apply_without_flags_or_environment(self):
        self.assertEqual(wabhook.build_config({}, {}), wabhook.Config())

    def test_a_server_configured_only_through_the_environment(self):
        self.write_handler("connected.py", FAILING_HANDLER)
        port = free_port()
        env_db = os.path.join(self.tmp, "from-env.db")
        env = {"WABHOOK_HOST": "127.0.0.1", "WABHOOK_PORT": str(port), "WABHOOK_DB": env_db,
               "WABHOOK_HANDLERS": self.handlers, "WABHOOK_RETRIES": "1", "WABHOOK_RETRY_DELAY": "50ms",
               "WABHOOK_TOKEN": "env-token", "WABHOOK_LOG_FORMAT": "json"}
        process, listening = self.start_bare(env=env)
        self.assertEqual(listening, port)
        self.assertEqual(self.post(port, SAMPLES["connected"])[0], 401)
        status, reply = self.post(port, SAMPLES["connected"], headers={"Authorization": "Bearer env-token"})
        self.assertEqual(status, 200)
        wait_until(lambda: self.query("SELECT status FROM events WHERE id = ?", (reply["id"],), db=env_db)
                   == [("dead",)], message="one attempt (WABHOOK_RETRIES=1), then dead")
        self.assertEqual(self.terminate(process), 0)
        for line in self.process_log(process).splitlines():
            self.assertIsInstance(json.loads(line), dict)
        self.assertFalse(os.path.exists(self.db))

    def test_send_reads_the_port_from_the_environment_and_the_flag_wins(self):
        server = self.start_server()
        result = self.cli("send", "connected", env={"WABHOOK_PORT": str(server.port)})
        self.assertTrue(result.stdout.startswith("200 "), result.stdout)
        result = self.cli("send", "disconnected", "--port", str(server.port), env={"WABHOOK_PORT": str(free_port())})
        self.assertTrue(result.stdout.startswith("200 "), result.stdout)
        self.assertEqual(self.query("SELECT event FROM events ORDER BY id"), [("connected",), ("disconnected",)])


class ServeTest(CliTestCase):
    def test_bare_command_without_a_subcommand_serves(self):
        self.write_handler("connected.py", RECORD_HANDLER % {"tmp": self.tmp})
        process, port = self.start_bare("--host", "127.0.0.1", "--port", "0", "--db", self.db,
                                        "--handlers", self.handlers)
        status, reply = self.post(port, SAMPLES["connected"])
        self.assertEqual(status, 200)
        wait_until(lambda: self.read_lines("seen"), message="the handler to run")
        self.assertEqual(json.loads(self.read_lines("seen")[0])[:2], [reply["id"], "connected"])
        self.assertEqual(self.terminate(process), 0)

    def test_a_broken_handler_dead_letters_and_a_replay_after_the_fix_delivers(self):
        self.write_handler("message.py", README_HANDLER)
        process, port = self.start_process("--retries", "2")
        port_flag = ["--port", str(port)]

        # Send the sample and see the handler run.
        sent = self.cli("send", "message", *port_flag).stdout
        self.assertRegex(sent, r'^200 \{"ok": true, "id": \d+, "duplicate": false\}')
        first_id = json.loads(sent[4:])["id"]
        wait_until(lambda: "message.py | Alice: Hello!" in self.process_log(process),
                   message="the handler's print in the server log")
        self.wait_status(first_id, "done")

        # Break the handler: the next message is retried, then dead-lettered.
        self.write_handler("message.py", BROKEN_README_HANDLER)
        sent = self.cli("send", "message", "--set", "body=Hi there", "--set", "message_id=ACE42", *port_flag).stdout
        second_id = json.loads(sent[4:])["id"]
        self.assertNotEqual(second_id, first_id)
        self.wait_status(second_id, "dead")
        dead = self.cli("events", "--status", "dead", "--db", self.db).stdout.splitlines()[1:]
        self.assertEqual(int(EVENT_LINE.fullmatch(dead[0].rstrip()).group(1)), second_id)
        self.assertIn("message.py:dead(2)", dead[0])
        self.assertIn("ValueError: broken on purpose: Hi there", dead[1])

        # Fix it and replay: handled, and no dead letters left.
        self.write_handler("message.py", README_HANDLER)
        replayed = self.cli("replay", str(second_id), "--db", self.db).stdout
        self.assertEqual(replayed.strip(), "replayed 1 events: %d" % second_id)
        wait_until(lambda: "message.py | Alice: Hi there" in self.process_log(process),
                   message="the replayed event handled")
        self.wait_status(second_id, "done")
        self.assertEqual(self.cli("events", "--status", "dead", "--db", self.db).stdout.strip(), "no events")
        self.assertEqual(self.terminate(process), 0)


class SkippedShownTest(WabhookTestCase):
    def test_a_delivery_whose_handler_file_was_removed_shows_as_skipped_not_done(self):
        doomed = self.write_handler("message.b.py", "def handle(event):\n    pass\n")
        # The handlers of an event run in name order: a.py removes b.py before b's turn.
        self.write_handler("message.a.py", "import os\ndef handle(event):\n    os.remove(%r)\n" % doomed)
        self.shorten(SETTLE_SECONDS=0.2)  # how long b.py must stay gone to be skipped
        server = self.start_server()
        event_id = self.post(server, MESSAGE)[1]["id"]
        self.wait_status(event_id, "done")
        result = self.run_cli("events", "--db", self.db)
        self.assertIn("message.b.py:skipped(1)", result.stdout)
        self.assertNotIn("message.b.py:done", result.stdout)
        result = self.run_cli("events", "--db", self.db, "--status", "skipped")
        self.assertIn("message.a.py:done(1) message.b.py:skipped(1)", result.stdout)
        stats = json.loads(self.run_cli("stats", "--db", self.db, "--json").stdout)
        self.assertEqual(stats["deliveries_by_handler"]["message.b.py"], {"skipped": 1})


class ClearMistakesTest(CliTestCase):
    """The mistakes a person makes first, each met with one sentence naming the fix."""

    def test_each_mistake_gets_one_sentence_naming_the_fix(self):
        handlers_file = self.out_path("handlers.txt")
        open(handlers_file, "w").close()
        cases = [
            (["evnts"], {}, 2, "'evnts' is not a command (did you mean events?)"),
            (["--port", "abc"], {}, 2, "--port='abc': expected a port from 0 to 65535"),
            (["events", "--limit", "0"], {}, 2, "--limit: expected a whole number of at least 1"),
            (["events", "--follow", "--status", "dead"], {}, 2, "--status dead works without --follow"),
            (["serve", "--handlers", handlers_file, "--port", "0"], {}, 1, "is a file, not a folder"),
            (["check", "--handlers", handlers_file], {}, 1, "is a file, not a folder"),
        ]
        for args, env, status, sentence in cases:
            with self.subTest(args=args):
                result = self.run_cli(*args, env=env)
                self.assertEqual(result.returncode, status, result.stdout + result.stderr)
                self.assertIn(sentence, result.stdout + result.stderr)
                self.assertNotIn("Traceback", result.stderr)

    def test_an_unknown_wabhook_variable_is_named_with_the_closest_setting(self):
        result = self.run_cli("stats", "--db", self.out_path("none.db"), env={"WABHOOK_PORTT": "3001"})
        self.assertIn("warning: WABHOOK_PORTT is not a wabhook setting and is ignored; did you mean WABHOOK_PORT?",
                      result.stderr)
        quiet = self.run_cli("stats", "--db", self.out_path("none.db"),
                             env={"WABHOOK_EVENT": "message", "WABHOOK_ID": "1", "WABHOOK_BRIDGE": ""})
        self.assertNotIn("warning", quiet.stderr)  # a script's own event variables are no mistake

    def test_send_signs_with_the_secret_and_takes_a_url_without_a_scheme(self):
        secret = "whsec_" + base64.b64encode(b"k" * 32).decode()
        server = self.start_server(secret=secret)
        result = self.run_cli("send", "message", "--url", "127.0.0.1:%d/hook" % server.port, "--secret", secret)
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr)
        self.assertTrue(result.stdout.startswith("200 "), result.stdout)
        unsigned = self.run_cli("send", "typing", "--url", "127.0.0.1:%d/hook" % server.port)
        self.assertTrue(unsigned.stdout.startswith("401 "), unsigned.stdout)


class SamplesTest(CliTestCase):
    def test_samples_prints_the_documented_payloads_without_posting(self):
        lines = self.cli("samples").stdout.splitlines()
        self.assertEqual([json.loads(line) for line in lines], load_samples())
        one = self.cli("samples", "poll_vote").stdout
        self.assertEqual(json.loads(one), SAMPLES["poll_vote"])
        self.assertIn('\n  "selected_options": [', one)  # indented for reading
        self.assertEqual(self.run_cli("samples", "poll").returncode, 2)


class FollowTest(CliTestCase):
    def test_events_follow_prints_each_new_matching_event_once_as_it_arrives(self):
        server = self.start_server()
        first = self.post(server, MESSAGE)[1]["id"]
        follower = subprocess.Popen([sys.executable, SCRIPT, "events", "--follow", "--json", "--type", "message",
                                     "--db", self.db], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                    cwd=self.tmp)
        try:
            self.assertEqual(json.loads(follower.stdout.readline())["id"], first)  # the backlog first
            self.post(server, SAMPLES["connected"])  # another type: not printed
            second = self.post(server, dict(MESSAGE, message_id="FOLLOW2"))[1]["id"]
            third = self.post(server, dict(MESSAGE, message_id="FOLLOW3"))[1]["id"]
            # readline() blocks until the line arrives; the subprocess is killed below if it never does.
            killer = threading.Timer(20, follower.kill)
            killer.start()
            try:
                seen = [json.loads(follower.stdout.readline())["id"] for _ in range(2)]
            finally:
                killer.cancel()
            self.assertEqual(seen, [second, third])
        finally:
            follower.send_signal(signal.SIGINT)
            self.assertEqual(follower.wait(timeout=10), 0)
            follower.stdout.close()
            follower.stderr.close()
