"""Forwarding (SPEC section 5, `.forward` files; issue 13): the file format and its messages, ${VAR}
substitution, and real wabhook servers forwarding to real local HTTP sinks: success and retries,
the body byte for byte, a webhook-id stable across retries and restarts, Standard Webhooks
signatures, keep-alive reuse, a stale kept-alive connection, a hung target, reload on edit,
per-chat order, and `check`.
"""

import base64
import hashlib
import http.server
import json
import logging
import os
import re
import socket
import threading
import time
import unittest
from unittest import mock

from tests.support import WabhookTestCase, load_samples, wait_until

import wabhook

SECRET = "whsec_" + base64.b64encode(b"forward-test-key-0123456789").decode("ascii")


def message(chat="chat-1@s.whatsapp.net", message_id="m1", **fields):
    """The documented sample message, in chat `chat`, with its own message_id."""
    return dict(load_samples()[0], chat_id=chat, message_id=message_id, **fields)


def parse(text, environ=None, name="message.forward"):
    return wabhook.parse_forward_file(text, environ or {}, name)


# ---------------------------------------------------------------------------
# The file format
# ---------------------------------------------------------------------------

# (file text, the one sentence it earns: what `check` prints and the server logs)
BAD_FILES = [
    ("", "message.forward has no url line: add one, as in: url https://ingest.example.com/whatsapp"),
    ("# only a comment\n\n", "message.forward has no url line: add one, as in: url https://ingest.example.com/whatsapp"),
    ("url\n", "message.forward line 1: url needs a value, as in: url https://ingest.example.com/whatsapp"),
    ("url https://a.example/x\nurl https://b.example/y\n",
     "message.forward line 2: a second url line (line 1 has one): keep one"),
    ("url ftp://files.example/in\n",
     "message.forward line 1: the url must start with http:// or https://, as in:"
     " url https://ingest.example.com/whatsapp"),
    ("url ingest.example.com/whatsapp\n",
     "message.forward line 1: the url must start with http:// or https://, as in:"
     " url https://ingest.example.com/whatsapp"),
    ("url https:///whatsapp\n", "message.forward line 1: the url has no host: write it as https://host[:port]/path"),
    ("url https://ingest.example.com:99999/\n",
     "message.forward line 1: the url's port must be a number from 1 to 65535"),
    ("url https://ingest.example.com:/x\n", "message.forward line 1: the url's port must be a number from 1 to 65535"),
    ("url https://ingest.example.com/x#part\n",
     "message.forward line 1: the url has a #fragment, which is never sent: remove it"),
    ("url https://ingest.example.com/my hook\n",
     "message.forward line 1: the url holds a space, a control character or non-ASCII text: percent-encode it"
     " (a space is %20; a host as punycode)"),
    ("url https://example.com/\nhedaer X-Source: wabhook\n",
     "message.forward line 2: 'hedaer' is not a setting (did you mean header?); a .forward file has url,"
     " header, secret, timeout and wrap lines"),
    ("url https://example.com/\nwrap avro\n", "message.forward line 2: wrap takes kafka"),
    ("url https://example.com/\nheader X-Source wabhook\n",
     "message.forward line 2: write a header as header Name: value, with a name of letters, digits and -, as in:"
     " header Authorization: Bearer ${INGEST_TOKEN}"),
    ("url https://example.com/\nheader X Source: wabhook\n",
     "message.forward line 2: write a header as header Name: value, with a name of letters, digits and -, as in:"
     " header Authorization: Bearer ${INGEST_TOKEN}"),
    ("url https://example.com/\nheader Content-Length: 5\n",
     "message.forward line 2: wabhook sets the Content-Length header itself: remove this line"),
    ("url https://example.com/\nheader webhook-signature: v1,abc\n",
     "message.forward line 2: wabhook sets the webhook-signature header itself: remove this line"
     " (a secret line makes it sign)"),
    ("url https://example.com/\nheader X-Name: caf\u00e9\n",
     "message.forward line 2: the value of header X-Name holds a line break, a control character or non-ASCII"
     " text: header values are printable ASCII (check the variables it uses)"),
    ("url https://example.com/\nsecret s3cr3t\n",
     "message.forward line 2: the secret must be whsec_ followed by base64, the Standard Webhooks secret the"
     " target verifies with"),
    ("url https://example.com/\nsecret whsec_not*base64\n",
     "message.forward line 2: the secret must be whsec_ followed by base64, the Standard Webhooks secret the"
     " target verifies with"),
    ("url https://example.com/\nsecret %s\nsecret %s\n" % (SECRET, SECRET),
     "message.forward line 3: a second secret line (line 2 has one): keep one"),
    ("url https://example.com/\ntimeout soon\n",
     "message.forward line 2: timeout takes seconds above 0, such as 10, 2.5 or 500ms"),
    ("url https://example.com/\ntimeout 0\n",
     "message.forward line 2: timeout takes seconds above 0, such as 10, 2.5 or 500ms"),
    ("url https://x:pw@example.com/\nheader Authorization: Bearer t\n",
     "message.forward line 1: the url has user:password@ and line 2 an Authorization header: keep one"),
    ("url https://example.com/?token=$TOKEN\n",
     "message.forward line 1: a $ starts a variable, written ${NAME}; write $$ for a $ itself"),
    ("url https://example.com/\nheader Authorization: Bearer ${INGEST_TOKEN}\n",
     "message.forward line 2: ${INGEST_TOKEN} is not set in wabhook's environment: set INGEST_TOKEN where"
     " wabhook starts (e.g. Environment= in its systemd unit) and restart it"),
]


class ParseTest(unittest.TestCase):
    def test_a_full_file_gives_its_url_headers_secret_and_timeout(self):
        target = parse("# handlers/message.forward\n"
                       "url https://ingest.example.com/whatsapp?source=wa\n"
                       "header Authorization: Bearer ${INGEST_TOKEN}\n"
                       "header X-Source: wabhook   # a comment after a space\n"
                       "\n"
                       "secret ${FORWARD_SECRET}        # whsec_...: sign with Standard Webhooks\n"
                       "timeout 2.5\n", {"INGEST_TOKEN": "tok-123", "FORWARD_SECRET": SECRET})
        self.assertEqual((target.scheme, target.host, target.port, target.target),
                         ("https", "ingest.example.com", 443, "/whatsapp?source=wa"))
        self.assertEqual(target.headers, (("Authorization", "Bearer tok-123"), ("X-Source", "wabhook")))
        self.assertEqual(target.key, wabhook.signing_key(SECRET))
        self.assertEqual(target.timeout, 2.5)
        self.assertNotIn("tok-123", repr(target))  # a target in a log line or traceback leaks no secret

    def test_defaults_ports_paths_and_forms_of_a_url(self):
        cases = [
            ("url http://127.0.0.1:8080/in", ("http", "127.0.0.1", 8080, "/in")),
            ("url http://ingest.example.com", ("http", "ingest.example.com", 80, "/")),
            ("url HTTPS://Ingest.Example.com/A?b=C", ("https", "ingest.example.com", 443, "/A?b=C")),
            ("url http://[::1]:9000/x", ("http", "::1", 9000, "/x")),
            ("\turl\thttp://tabs.example/\t", ("http", "tabs.example", 80, "/")),
        ]
        for text, expected in cases:
            with self.subTest(text=text):
                target = parse(text)
                self.assertEqual((target.scheme, target.host, target.port, target.target), expected)
                self.assertEqual((target.headers, target.key, target.timeout), ((), None, 10.0))

    def test_user_and_password_in_the_url_are_sent_as_basic_authorization(self):
        target = parse("url https://wa:p%40ss@ingest.example.com/in")
        self.assertEqual(target.headers, (("Authorization", "Basic " + base64.b64encode(b"wa:p@ss").decode()),))
        self.assertEqual(target.host, "ingest.example.com")

    def test_each_mistake_is_one_sentence_naming_the_file_the_line_and_the_fix(self):
        for text, sentence in BAD_FILES:
            with self.subTest(text=text):
                with self.assertRaises(wabhook.HandlerLoadError) as caught:
                    parse(text)
                self.assertEqual(str(caught.exception), sentence)

    def test_variables_fill_any_value_and_a_double_dollar_is_a_dollar(self):
        environ = {"HOST": "ingest.example.com", "TOKEN": "a$b", "SECRET": SECRET, "SECONDS": "3"}
        target = parse("url https://${HOST}/in?price=$$5\n"
                       "header Authorization: Bearer ${TOKEN}\n"
                       "header X-Note: $${NOT_A_VARIABLE} costs $$\n"
                       "secret ${SECRET}\n"
                       "timeout ${SECONDS}\n", environ)
        self.assertEqual((target.host, target.target), ("ingest.example.com", "/in?price=$5"))
        self.assertEqual(target.headers, (("Authorization", "Bearer a$b"),  # a value is not substituted again
                                          ("X-Note", "${NOT_A_VARIABLE} costs $")))
        self.assertEqual((target.key, target.timeout), (wabhook.signing_key(SECRET), 3.0))

    def test_an_unset_variable_is_an_error_naming_it_and_a_set_but_empty_one_is_used(self):
        with self.assertRaises(wabhook.HandlerLoadError) as caught:
            parse("url https://example.com/\nsecret ${FORWARD_SECRET}\n", {"OTHER": "x"}, name="all.ingest.forward")
        self.assertEqual(str(caught.exception),
                         "all.ingest.forward line 2: ${FORWARD_SECRET} is not set in wabhook's environment: set"
                         " FORWARD_SECRET where wabhook starts (e.g. Environment= in its systemd unit) and restart it")
        target = parse("url https://example.com/\nheader X-Tag: ${EMPTY}\n", {"EMPTY": ""})
        self.assertEqual(target.headers, (("X-Tag", ""),))

    def test_a_variable_whose_value_breaks_a_header_is_refused(self):
        with self.assertRaises(wabhook.HandlerLoadError) as caught:
            parse("url https://example.com/\nheader X-Token: ${TOKEN}\n", {"TOKEN": "abc\r\nX-Evil: 1"})
        self.assertIn("line 2: the value of header X-Token holds a line break", str(caught.exception))

    def test_the_timeout_is_capped_by_the_script_timeout(self):
        target = parse("url http://127.0.0.1:1/\ntimeout 30\n")
        handler = wabhook.ForwardHandler("message.forward", "/nowhere", None, target)
        context = wabhook.RunContext(5.0, {}, logging.getLogger("test"))
        asked = []
        context.connections.post = lambda target, body, headers, timeout: asked.append(timeout) or (200, b"", None)
        event = wabhook.parse_event(message(), None, 1, 1.0)
        handler.run(event, json.dumps(message()), context)
        self.assertEqual(asked, [5.0])

    def test_webhook_id_hashes_the_identity_key_or_else_the_inbox_row(self):
        raw = message(message_id="ABC")
        event = wabhook.parse_event(raw, "shop-1", 7, 1700000000.25)
        expected = "evt_" + hashlib.sha256(wabhook.identity_key(raw, "shop-1").encode()).hexdigest()[:32]
        self.assertEqual(wabhook.webhook_id(event, json.dumps(raw)), expected)
        # The same message stored elsewhere (another host, another inbox id) has the same id.
        self.assertEqual(wabhook.webhook_id(wabhook.parse_event(raw, "shop-1", 99, 1.0), "{}"), expected)
        self.assertNotEqual(wabhook.webhook_id(wabhook.parse_event(raw, "shop-2", 7, 1700000000.25), "{}"), expected)
        connected = {"event": "connected"}
        body = json.dumps(connected)
        first = wabhook.webhook_id(wabhook.parse_event(connected, None, 8, 1700000000.5), body)
        self.assertRegex(first, r"^evt_[0-9a-f]{32}$")
        self.assertEqual(wabhook.webhook_id(wabhook.parse_event(connected, None, 8, 1700000000.5), body), first)
        self.assertNotEqual(wabhook.webhook_id(wabhook.parse_event(connected, None, 9, 1700000000.5), body), first)
        self.assertNotEqual(wabhook.webhook_id(wabhook.parse_event(connected, None, 8, 1700000001.5), body), first)


# ---------------------------------------------------------------------------
# A local HTTP target
# ---------------------------------------------------------------------------

class Received:
    """One request as the sink saw it."""

    def __init__(self, path, headers, body, connection, number_on_connection):
        self.path, self.headers, self.body = path, headers, body
        self.connection, self.number_on_connection = connection, number_on_connection
        self.message_id = None
        try:
            self.message_id = json.loads(body.decode("utf-8")).get("message_id")
        except ValueError:
            pass


class Sink:
    """A ThreadingHTTPServer on 127.0.0.1 (HTTP/1.1 keep-alive) that records what it is sent.

    `reply(received, previous)` decides each answer from the request and the
    requests recorded before it: (status, body[, headers]), "hang" (answer 200
    only once release() is called), or "drop" (close the connection without
    answering).
    """

    def __init__(self, reply=None):
        self.reply = reply or (lambda received, previous: (200, b'{"ok":true}'))
        self.requests = []
        self.connections = 0
        self.lock = threading.Lock()
        self.released = threading.Event()
        sink = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def setup(self):
                super().setup()
                with sink.lock:
                    sink.connections += 1
                    self.connection_number, self.served = sink.connections, 0

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                self.served += 1
                received = Received(self.path, {k.lower(): v for k, v in self.headers.items()}, body,
                                    self.connection_number, self.served)
                with sink.lock:
                    previous = list(sink.requests)
                    sink.requests.append(received)
                answer = sink.reply(received, previous)
                if answer == "drop":
                    self.close_connection = True
                    return
                if answer == "hang":
                    sink.released.wait(30)
                    answer = (200, b"released")
                status, text, headers = (answer + ({},))[:3]
                self.send_response(status)
                self.send_header("Content-Type", "text/plain")
                self.send_header("Content-Length", str(len(text)))
                for name, value in headers.items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(text)
                if headers.get("Connection") == "close":
                    self.close_connection = True

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.server.handle_error = lambda request, address: None  # a client gone before a hung answer
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    @property
    def url(self):
        return "http://127.0.0.1:%d" % self.server.server_address[1]

    def received(self):
        with self.lock:
            return list(self.requests)

    def wait_for(self, count, message=None):
        return wait_until(lambda: len(self.received()) >= count and self.received(), timeout=5,
                          message=message or "%d requests at the sink" % count)

    def release(self):
        self.released.set()

    def close(self):
        self.released.set()
        self.server.shutdown()
        self.server.server_close()


class ForwardTestCase(WabhookTestCase):
    def setUp(self):
        super().setUp()
        self.sinks = []

    def tearDown(self):
        for sink in self.sinks:  # hung requests answer, so the servers stop without waiting them out
            sink.release()
        super().tearDown()
        for sink in self.sinks:
            sink.close()

    def sink(self, reply=None):
        sink = Sink(reply)
        self.sinks.append(sink)
        return sink

    def forward_file(self, name, sink, *lines):
        return self.write_handler(name, "url %s/in\n%s" % (sink.url, "".join(line + "\n" for line in lines)),
                                  executable=False)

    def post_ok(self, server, body, path="/hook"):
        status, reply = self.post(server, body, path=path)
        self.assertEqual(status, 200, reply)
        self.assertFalse(reply["duplicate"], reply)
        return reply["id"]

    def deliveries(self, event_id):
        """{handler: (status, attempts, last_error)} of one event."""
        return {handler: (status, attempts, error) for handler, status, attempts, error in self.query(
            "SELECT handler, status, attempts, last_error FROM deliveries WHERE event_id = ?", (event_id,))}

    def age(self, *paths):
        """Date files back a minute: a save long done, so a broken one is not waited on to settle."""
        past = time.time() - 60
        for path in paths:
            os.utime(path, (past, past))


def fail_first_attempt_of(message_id, status=500):
    def reply(received, previous):
        if received.message_id == message_id and not any(p.message_id == message_id for p in previous):
            return status, b"busy, try again"
        return 200, b"ok"
    return reply


class DeliveryTest(ForwardTestCase):
    def test_a_2xx_is_success_and_the_body_arrives_byte_for_byte_with_the_files_headers(self):
        sink = self.sink(lambda received, previous: (202, b""))
        self.forward_file("message.forward", sink, "header Authorization: Bearer ${INGEST_TOKEN}",
                          "header X-Source: wabhook")
        with mock.patch.dict(os.environ, {"INGEST_TOKEN": "tok-42"}):
            server = self.start_server()
        body = ('{"event": "message",  "chat_id":"c1@s.whatsapp.net","message_id":"b1",'
                '"body":"caf\u00e9 \u2713 \\u00e9 \\"q\\"" ,"extra":[1, 2.50, null]}').encode("utf-8")
        event_id = self.post_ok(server, body, path="/hook/shop-1")
        self.wait_status(event_id, "done")
        [received] = sink.received()
        self.assertEqual(received.body, body)
        self.assertEqual(received.path, "/in")
        headers = received.headers
        self.assertEqual((headers["content-type"], headers["user-agent"]),
                         ("application/json", "wabhook/" + wabhook.__version__))
        self.assertEqual((headers["authorization"], headers["x-source"]), ("Bearer tok-42", "wabhook"))
        key = wabhook.identity_key(json.loads(body), "shop-1")
        self.assertEqual(headers["webhook-id"], "evt_" + hashlib.sha256(key.encode()).hexdigest()[:32])
        self.assertLessEqual(abs(int(headers["webhook-timestamp"]) - time.time()), 5)
        self.assertNotIn("webhook-signature", headers)  # no secret line: not signed
        self.assertEqual(self.deliveries(event_id)["message.forward"][:2], ("done", 1))

    def test_wrap_kafka_sends_one_record_keyed_by_the_chat_as_a_kafka_rest_proxy_takes_it(self):
        sink = self.sink()
        self.forward_file("message.forward", sink, "wrap kafka")
        server = self.start_server()
        sent = message(message_id="k1")
        event_id = self.post_ok(server, sent, path="/hook/shop-1")
        self.wait_status(event_id, "done")
        [received] = sink.received()
        self.assertEqual(received.headers["content-type"], "application/vnd.kafka.json.v2+json")
        self.assertEqual(json.loads(received.body),
                         {"records": [{"key": wabhook.lane_of(sent, "shop-1"), "value": sent}]})
        key = wabhook.identity_key(sent, "shop-1")
        self.assertEqual(received.headers["webhook-id"], "evt_" + hashlib.sha256(key.encode()).hexdigest()[:32])

    def test_a_500_is_a_failed_attempt_retried_with_the_same_webhook_id_then_done(self):
        sink = self.sink(fail_first_attempt_of("r1", 500))
        self.forward_file("all.forward", sink)
        server = self.start_server()
        event_id = self.post_ok(server, message(message_id="r1"))
        self.wait_status(event_id, "done")
        first, second = sink.received()
        self.assertEqual(self.deliveries(event_id)["all.forward"][:2], ("done", 2))
        self.assertEqual(first.body, second.body)
        self.assertEqual(first.headers["webhook-id"], second.headers["webhook-id"])
        failure = [m for m in self.log.messages() if m.startswith("handler all.forward failed event %d" % event_id)]
        self.assertEqual(len(failure), 1, failure)
        self.assertIn("target answered 500: busy, try again", failure[0])

    def test_an_event_without_identity_keeps_its_webhook_id_across_a_restart(self):
        sink = self.sink(lambda received, previous: (503, b"down for maintenance"))
        self.forward_file("connected.forward", sink)
        server = self.start_server(retries=100)
        event_id = self.post_ok(server, {"event": "connected"})
        sink.wait_for(2)
        self.stop_server(server)
        sink.reply = lambda received, previous: (200, b"ok")
        self.start_server(retries=100)
        self.wait_status(event_id, "done")
        ids = {received.headers["webhook-id"] for received in sink.received()}
        self.assertEqual(len(ids), 1, ids)
        self.assertGreaterEqual(len(sink.received()), 3)

    def test_with_a_secret_every_post_is_signed_so_that_verify_signature_accepts_it(self):
        sink = self.sink(fail_first_attempt_of("s1", 502))
        self.forward_file("message.forward", sink, "secret ${FORWARD_SECRET}")
        with mock.patch.dict(os.environ, {"FORWARD_SECRET": SECRET}):
            server = self.start_server()
        event_id = self.post_ok(server, message(message_id="s1"))
        self.wait_status(event_id, "done")
        key = wabhook.signing_key(SECRET)
        for received in sink.received():
            wabhook.verify_signature(key, received.headers, received.body)  # raises Unauthorized if not
            with self.assertRaises(wabhook.Unauthorized):
                wabhook.verify_signature(key, received.headers, received.body + b" ")

    def test_no_answer_within_the_timeout_and_a_refused_connection_are_failed_attempts_saying_so(self):
        sink = self.sink(lambda received, previous: "hang")
        self.forward_file("message.forward", sink, "timeout 200ms")
        self.write_handler("connected.forward", "url http://127.0.0.1:%d/\n" % self.closed_port(), executable=False)
        server = self.start_server(retries=1)
        slow = self.post_ok(server, message(message_id="t1"))
        refused = self.post_ok(server, {"event": "connected"})
        self.wait_status(slow, "dead")
        self.wait_status(refused, "dead")
        port = sink.server.server_address[1]
        self.assertEqual(self.deliveries(slow)["message.forward"][2], "no answer from 127.0.0.1:%d within 0.2s" % port)
        self.assertEqual(self.deliveries(refused)["connected.forward"][2],
                         "127.0.0.1:%d refused the connection (is the target running?)" % self.closed_port())

    def closed_port(self):
        """A loopback port nothing listens on (bound once, then closed)."""
        if not hasattr(self, "_closed_port"):
            with socket.socket() as probe:
                probe.bind(("127.0.0.1", 0))
                self._closed_port = probe.getsockname()[1]  # nothing listens once it is closed
        return self._closed_port

    def test_an_edited_file_sends_the_next_events_to_its_new_url(self):
        first, second = self.sink(), self.sink()
        path = self.forward_file("message.forward", first)
        server = self.start_server()
        self.wait_status(self.post_ok(server, message(message_id="e1")), "done")
        with open(path, "w") as handle:
            handle.write("url %s/moved\n" % second.url)
        self.wait_status(self.post_ok(server, message(message_id="e2")), "done")
        self.assertEqual([r.message_id for r in first.received()], ["e1"])
        self.assertEqual([(r.message_id, r.path) for r in second.received()], [("e2", "/moved")])


class ConnectionTest(ForwardTestCase):
    def test_events_reuse_kept_alive_connections_at_most_one_per_worker(self):
        sink = self.sink()
        self.forward_file("message.forward", sink)
        server = self.start_server(workers=2)
        ids = [self.post_ok(server, message(chat="chat-%d" % (n % 10), message_id="k%d" % n)) for n in range(40)]
        for event_id in ids:
            self.wait_status(event_id, "done")
        self.assertEqual(len(sink.received()), 40)
        self.assertLessEqual(sink.connections, 2)  # a worker holds one connection at a time

    def test_a_kept_alive_connection_the_target_dropped_is_sent_again_on_a_new_one_in_the_same_attempt(self):
        def reply(received, previous):  # the second request of every connection finds it closed
            return "drop" if received.number_on_connection == 2 else (200, b"ok")
        sink = self.sink(reply)
        self.forward_file("message.forward", sink)
        server = self.start_server(workers=1)
        first = self.post_ok(server, message(message_id="d1"))
        self.wait_status(first, "done")
        second = self.post_ok(server, message(message_id="d2"))
        self.wait_status(second, "done")
        self.assertEqual([(r.message_id, r.connection) for r in sink.received()], [("d1", 1), ("d2", 1), ("d2", 2)])
        dropped, resent = sink.received()[1:]
        self.assertEqual(dropped.headers["webhook-id"], resent.headers["webhook-id"])  # the target can drop one
        self.assertEqual(self.deliveries(second)["message.forward"][:2], ("done", 1))  # no failed attempt

    def test_a_fresh_connection_closed_without_an_answer_is_a_failed_attempt(self):
        sink = self.sink(lambda received, previous: "drop" if not previous else (200, b"ok"))
        self.forward_file("message.forward", sink)
        server = self.start_server()
        event_id = self.post_ok(server, message(message_id="f1"))
        self.wait_status(event_id, "done")
        status, attempts, _error = self.deliveries(event_id)["message.forward"]
        self.assertEqual((status, attempts), ("done", 2))
        self.assertTrue(any("closed the connection without answering" in m for m in self.log.messages()))

    def test_connection_close_and_a_reply_too_long_to_read_are_answers_whose_connection_is_not_reused(self):
        def reply(received, previous):
            if received.message_id.startswith("close"):
                return 200, b"ok", {"Connection": "close"}
            return 200, b"x" * (wabhook.FORWARD_REPLY_CAP + 1)  # success, but its rest is not read
        sink = self.sink(reply)
        self.forward_file("message.forward", sink)
        server = self.start_server(workers=1)
        ids = [self.post_ok(server, message(message_id=m)) for m in ("close-1", "close-2", "long-1", "long-2")]
        for event_id in ids:
            self.wait_status(event_id, "done")
        self.assertEqual([(r.message_id, r.connection) for r in sink.received()],
                         [("close-1", 1), ("close-2", 2), ("long-1", 3), ("long-2", 4)])
        self.assertEqual([self.deliveries(event_id)["message.forward"][:2] for event_id in ids], [("done", 1)] * 4)

    def test_a_hung_target_holds_up_only_the_worker_waiting_on_it(self):
        hung, healthy = self.sink(lambda received, previous: "hang"), self.sink()
        self.forward_file("message.forward", hung, "timeout 30")
        self.forward_file("connected.forward", healthy)
        server = self.start_server(workers=2)
        stuck = self.post_ok(server, message(message_id="h1"))
        hung.wait_for(1, "the hung target to get its request")
        ids = [self.post_ok(server, {"event": "connected", "n": n}) for n in range(5)]
        for event_id in ids:
            self.wait_status(event_id, "done", timeout=5)
        self.assertEqual(len(healthy.received()), 5)
        self.assertEqual(self.deliveries(stuck)["message.forward"][0], "running")
        hung.release()
        self.wait_status(stuck, "done")


class OrderTest(ForwardTestCase):
    def test_a_chats_next_event_is_forwarded_only_after_the_previous_one_succeeded(self):
        sink = self.sink(fail_first_attempt_of("o1", 503))
        self.forward_file("message.forward", sink)
        server = self.start_server(retry_delay=0.2)
        ids = [self.post_ok(server, message(chat="chat-x", message_id="o%d" % n)) for n in (1, 2, 3)]
        other = self.post_ok(server, message(chat="chat-y", message_id="y1"))
        for event_id in ids + [other]:
            self.wait_status(event_id, "done")
        sent = [received.message_id for received in sink.received()]
        self.assertEqual([m for m in sent if m != "y1"], ["o1", "o1", "o2", "o3"], sent)  # o2 waited for o1
        self.assertLess(sent.index("y1"), sent.index("o2"), "another chat must not wait for chat-x's retry")


class CheckTest(ForwardTestCase):
    def test_check_accepts_good_forward_files(self):
        self.write_handler("message.forward", "url https://ingest.example.com/whatsapp\n"
                           "header Authorization: Bearer ${INGEST_TOKEN}\nsecret ${FORWARD_SECRET}\ntimeout 5\n",
                           executable=False)
        self.write_handler("all.audit.forward", "url http://127.0.0.1:9/audit\n", executable=True)
        self.write_handler("group_update.forward", "url http://127.0.0.1:9/groups\n", executable=False)
        result = self.run_cli("check", "--handlers", self.handlers,
                              env={"INGEST_TOKEN": "t", "FORWARD_SECRET": SECRET})
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr)
        self.assertEqual(sorted(re.findall(r"^ok\s+(\S+)$", result.stdout, re.M)),
                         ["all.audit.forward", "group_update.forward", "message.forward"])

    def test_check_and_the_server_report_each_bad_forward_file_in_the_same_sentence(self):
        files = {
            "message.forward": ("url ftp://ingest.example.com/\n",
                                "message.forward line 1: the url must start with http:// or https://"),
            "connected.forward": ("url http://127.0.0.1:9/\nheader Bad Name: x\n",
                                  "connected.forward line 2: write a header as header Name: value"),
            "disconnected.forward": ("url http://127.0.0.1:9/\nsecret whsec_***\n",
                                     "disconnected.forward line 2: the secret must be whsec_ followed by base64"),
            "typing.forward": ("url http://127.0.0.1:9/\nheader Authorization: Bearer ${UNSET_TOKEN}\n",
                               "typing.forward line 2: ${UNSET_TOKEN} is not set in wabhook's environment"),
        }
        for name, (text, _sentence) in files.items():
            self.age(self.write_handler(name, text, executable=False))
        result = self.run_cli("check", "--handlers", self.handlers)  # UNSET_TOKEN: in no environment
        self.assertEqual(result.returncode, 1, result.stdout + result.stderr)
        blocks = dict(re.findall(r"^problem\s+(\S+): (.*?)(?=^problem|^\d+ handlers)", result.stdout, re.M | re.S))
        self.assertEqual(sorted(blocks), sorted(files))
        for name, (_text, sentence) in files.items():
            self.assertIn(sentence, blocks[name], name)
        self.assertIn("0 handlers ok, 4 problems", result.stdout)
        # The server: a broken handler whose events wait (retried, then dead), saying the same.
        server = self.start_server(retries=2)
        event_id = self.post_ok(server, {"event": "typing", "chat_id": "c1"})
        self.wait_status(event_id, "dead")
        self.assertIn(files["typing.forward"][1], self.deliveries(event_id)["typing.forward"][2])


if __name__ == "__main__":
    unittest.main()
