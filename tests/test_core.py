"""The core promises end to end: a 200 only after commit, typed events, dedup, delivery, retry, order."""

import json
import os
import signal

from tests.support import WabhookTestCase, load_samples, wait_until

import wabhook

RECORD_HANDLER = '''
import json, os
def handle(event):
    with open(os.path.join(%(tmp)r, "seen"), "a") as out:
        out.write(json.dumps([event.id, event.event, type(event).__name__, event.bridge]) + "\\n")
'''


class CoreTest(WabhookTestCase):
    def test_every_sample_is_acked_stored_and_handled_as_its_type(self):
        self.write_handler("all.py", RECORD_HANDLER % {"tmp": self.tmp})
        server = self.start_server()
        ids = []
        for sample in load_samples():
            status, reply = self.post(server, sample, path="/hook/bridge-1")
            self.assertEqual(status, 200, reply)
            self.assertEqual(reply["duplicate"], False)
            ids.append(reply["id"])
        wait_until(lambda: len(self.read_lines("seen")) == 11, message="11 handled events")
        seen = {row[0]: row for row in map(json.loads, self.read_lines("seen"))}
        for event_id, sample in zip(ids, load_samples()):
            self.assertEqual(seen[event_id][1], sample["event"])
            self.assertEqual(seen[event_id][2], wabhook.EVENT_CLASSES[sample["event"]].__name__)
            self.assertEqual(seen[event_id][3], "bridge-1")

    def test_ack_comes_only_after_the_event_is_committed(self):
        server = self.start_server()
        status, reply = self.post(server, load_samples()[0])
        self.assertEqual(status, 200)
        # Read through another connection: the row is there the moment the 200 is.
        rows = self.query("SELECT event, body FROM events WHERE id = ?", (reply["id"],))
        self.assertEqual(rows[0][0], "message")
        self.assertEqual(json.loads(rows[0][1]), load_samples()[0])

    def test_duplicate_message_is_acked_but_not_redelivered(self):
        self.write_handler("message.py", RECORD_HANDLER % {"tmp": self.tmp})
        server = self.start_server()
        first = self.post(server, load_samples()[0])[1]
        self.wait_status(first["id"], "done")
        status, second = self.post(server, load_samples()[0])
        self.assertEqual((status, second["duplicate"], second["id"]), (200, True, first["id"]))
        third = self.post(server, load_samples()[1])[1]  # a later event, to know the queue moved on
        self.wait_status(third["id"], "done")
        self.assertEqual(len(self.read_lines("seen")), 1)

    def test_bad_requests_get_status_and_json_error(self):
        server = self.start_server(max_body=100)
        cases = [
            ("POST", "/hook", b"{nope", 400, "bad_json"),
            ("POST", "/hook", b"[1, 2]", 400, "not_an_object"),
            ("POST", "/hook", b'{"event": ""}', 400, "missing_event"),
            ("POST", "/hook/bad<label>", b'{"event": "x"}', 404, "bad_bridge"),
            ("POST", "/elsewhere", b'{"event": "x"}', 404, "not_found"),
            ("GET", "/hook", None, 405, "method_not_allowed"),
            ("POST", "/hook", b'{"event": "message", "body": "' + b"x" * 200 + b'"}', 413, "body_too_large"),
        ]
        for method, path, body, expected, code in cases:
            with self.subTest(path=path, body=body):
                status, headers, data = self.request(server, method, path, body)
                self.assertEqual(status, expected)
                self.assertEqual(headers["content-type"], "application/json")
                self.assertEqual(json.loads(data)["error"], code)
        self.assertEqual(self.post(server, {"event": "disconnected"})[0], 200)  # still serving

    def test_failing_handler_is_retried_then_dead_lettered_with_its_error(self):
        self.write_handler("message.py", "def handle(event):\n    raise RuntimeError('boom %d' % event.id)\n")
        self.write_handler("message.ok.py", RECORD_HANDLER % {"tmp": self.tmp})
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
        self.write_handler("message.py", RECORD_HANDLER % {"tmp": self.tmp})
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
        self.write_handler("message.py", RECORD_HANDLER % {"tmp": self.tmp})
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
