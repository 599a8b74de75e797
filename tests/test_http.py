"""The HTTP front over real sockets (SPEC §2 and §7).

Status codes and their JSON error bodies, a log line per refused request,
no echo of the request in replies, JSON whatever the Content-Type, chunked
bodies, bridge labels and --path, keep-alive, idle/slow timeouts, the listen
backlog, tokens, Standard Webhooks signatures and direct TLS.
"""

import base64
import hashlib
import hmac
import http.client
import itertools
import json
import os
import re
import select
import socket
import ssl
import subprocess
import sys
import threading
import time
import warnings
import weakref

from tests.support import SCRIPT, WabhookTestCase, wait_until

import wabhook

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")
TLS_CERT = os.path.join(FIXTURES, "tls-cert.pem")
TLS_KEY = os.path.join(FIXTURES, "tls-key.pem")
TOKEN = "s3cret"
SIGNING_KEY = b"wabhook-test-signing-key-32bytes"
SECRET = "whsec_" + base64.b64encode(SIGNING_KEY).decode("ascii")
EVENT = b'{"event": "typing", "chat_id": "c1", "state": "composing"}'


# Bytes a read_response() received past the response it returned (a pipelined reply that came in
# the same recv), kept for the next read_response() or wait_for_eof() on that socket.
_unread = weakref.WeakKeyDictionary()


def read_response(sock, timeout=10.0, head_only=False):
    """(status, lower-case headers, body) of one HTTP response read from a raw socket.

    `head_only`: the reply to a HEAD request, which has no body whatever its Content-Length.
    What arrived after it is kept for the next call, not dropped.
    """
    sock.settimeout(timeout)
    data = _unread.pop(sock, b"")
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise AssertionError("the connection closed before a whole response: %r" % data)
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    length = 0 if head_only else int(headers.get("content-length", "0"))
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            raise AssertionError("the connection closed in the middle of a body: %r" % data)
        body += chunk
    body, rest = body[:length], body[length:]
    if rest:
        _unread[sock] = rest
    return int(lines[0].split()[1]), headers, body


def wait_for_eof(sock, timeout=10.0):
    """Everything the peer sends until it closes; fails if it does not close within `timeout`."""
    sock.settimeout(timeout)
    received = _unread.pop(sock, b"")
    try:
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                return received
            received += chunk
    except ConnectionResetError:
        return received
    except socket.timeout:
        raise AssertionError("the server kept the connection open for %.0fs" % timeout) from None


def chunked(*parts, extension=b""):
    """A chunked body: each part as a chunk (with an optional chunk extension), then the last chunk."""
    out = b""
    for part in parts:
        out += b"%x%s\r\n%s\r\n" % (len(part), extension, part)
    return out + b"0" + extension + b"\r\n\r\n"


def with_length(head, body):
    """`head` (request line and headers so far) completed with Content-Length and `body`."""
    return head + b"Content-Length: %d\r\n\r\n" % len(body) + body


def sign(body, message_id="msg_1", timestamp=None, key=SIGNING_KEY):
    """Standard Webhooks headers for `body`: v1,<base64 HMAC-SHA256 of id.timestamp.body>."""
    timestamp = str(int(time.time())) if timestamp is None else timestamp
    digest = hmac.new(key, ("%s.%s." % (message_id, timestamp)).encode() + body, hashlib.sha256).digest()
    return {"webhook-id": message_id, "webhook-timestamp": timestamp,
            "webhook-signature": "v1," + base64.b64encode(digest).decode("ascii")}


class HttpTestCase(WabhookTestCase):
    """Raw-socket helpers and the assertions every refused request shares."""

    def raw(self, server, data, shutdown_write=False, timeout=10.0):
        """Send raw bytes on a new connection and read one response: (status, headers, body)."""
        sock = socket.create_connection(("127.0.0.1", server.port), timeout=timeout)
        try:
            sock.sendall(data)
            if shutdown_write:
                sock.shutdown(socket.SHUT_WR)
            return read_response(sock, timeout)
        finally:
            sock.close()

    def event_count(self):
        return self.query("SELECT COUNT(*) FROM events")[0][0]

    def assertServing(self, server):
        status, reply = self.post(server, {"event": "disconnected"})
        self.assertEqual(status, 200, reply)

    def assertRejected(self, response, status, code, mark):
        """A JSON error reply with this status and code, and a log line that names both."""
        got_status, headers, data = response
        self.assertEqual(got_status, status, data)
        self.assertEqual(headers.get("content-type"), "application/json")
        reply = json.loads(data.decode("utf-8"))
        self.assertEqual(set(reply), {"ok", "error", "message"})
        self.assertEqual((reply["ok"], reply["error"]), (False, code))
        self.assertIsInstance(reply["message"], str)
        self.assertTrue(reply["message"])
        wait_until(lambda: any(str(status) in line and code in line for line in self.log.messages()[mark:]),
                   timeout=5, message="a log line with %d %s" % (status, code))

    def mark(self):
        return len(self.log.records)


class StatusCodeTest(HttpTestCase):
    def test_bad_json_and_bad_event_members_are_400_with_a_json_error(self):
        server = self.start_server()
        cases = [
            (b"{nope", "bad_json"),
            (b"", "bad_json"),
            (b'{"event": "message"', "bad_json"),
            (b"\xff\xfe{}", "bad_json"),
            (b"[1, 2]", "not_an_object"),
            (b'"message"', "not_an_object"),
            (b"42", "not_an_object"),
            (b"null", "not_an_object"),
            (b"{}", "missing_event"),
            (b'{"chat_id": "c1"}', "missing_event"),
            (b'{"event": ""}', "missing_event"),
            (b'{"event": 123}', "missing_event"),
            (b'{"event": null}', "missing_event"),
            (b'{"event": ["message"]}', "missing_event"),
            (b'{"event": {"type": "message"}}', "missing_event"),
        ]
        for body, code in cases:
            with self.subTest(body=body):
                mark = self.mark()
                self.assertRejected(self.request(server, "POST", "/hook", body), 400, code, mark)
        self.assertEqual(self.event_count(), 0)
        self.assertServing(server)

    def test_body_cut_short_by_the_client_is_400_truncated_body(self):
        server = self.start_server()
        requests = [
            b"POST /hook HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n" + EVENT[:20],
            b"POST /hook HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n40\r\n" + EVENT[:20],
            b"POST /hook HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n" + b"%x\r\n" % len(EVENT) + EVENT,
        ]
        for data in requests:
            with self.subTest(data=data):
                mark = self.mark()
                response = self.raw(server, data, shutdown_write=True)
                self.assertRejected(response, 400, "truncated_body", mark)
        self.assertEqual(self.event_count(), 0)
        self.assertServing(server)

    def test_malformed_length_or_transfer_encoding_is_400(self):
        server = self.start_server()
        head = b"POST /hook HTTP/1.1\r\nHost: x\r\n"
        cases = [
            (b"Content-Length: abc\r\n", ("bad_length",)),
            (b"Content-Length: -1\r\n", ("bad_length",)),
            (b"Content-Length: +5\r\n", ("bad_length",)),
            (b"Content-Length: 0x10\r\n", ("bad_length",)),
            (b"Content-Length: 5, 6\r\n", ("bad_length",)),
            (b"Content-Length: 5\r\nContent-Length: 6\r\n", ("bad_length",)),
            (b"Content-Length: \xb2\r\n", ("bad_length",)),  # latin-1 superscript two: str.isdigit() is True
            (b"Content-Length: " + b"9" * 5000 + b"\r\n", ("bad_length", "body_too_large")),
            (b"Transfer-Encoding: gzip\r\n", ("bad_transfer_encoding",)),
            (b"Transfer-Encoding: gzip, chunked\r\n", ("bad_transfer_encoding",)),
        ]
        for header, codes in cases:
            with self.subTest(header=header[:40]):
                mark = self.mark()
                response = self.raw(server, head + header + b"\r\n" + EVENT, shutdown_write=True)
                code = json.loads(response[2])["error"] if response[0] != 200 else None
                self.assertIn(code, codes, response)
                self.assertRejected(response, 413 if code == "body_too_large" else 400, code, mark)
                self.assertEqual(response[1].get("connection"), "close")
        self.assertEqual(self.event_count(), 0)
        self.assertServing(server)

    def test_malformed_chunks_are_400_bad_chunk(self):
        server = self.start_server()
        head = b"POST /hook HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
        bodies = [
            b"zz\r\n" + EVENT + b"\r\n0\r\n\r\n",                      # size not hexadecimal
            b"-5\r\nhello\r\n0\r\n\r\n",                                # negative size
            b"\r\n" + EVENT + b"\r\n0\r\n\r\n",                         # empty size line
            b"%x\r\n%sXX0\r\n\r\n" % (len(EVENT), EVENT),               # chunk not followed by CRLF
            b"5;" + b"e" * 2000 + b"\r\nhello\r\n0\r\n\r\n",            # chunk line far too long
        ]
        for body in bodies:
            with self.subTest(body=body[:40]):
                mark = self.mark()
                self.assertRejected(self.raw(server, head + body), 400, "bad_chunk", mark)
        self.assertEqual(self.event_count(), 0)
        self.assertServing(server)

    def test_unknown_paths_are_404_not_found(self):
        server = self.start_server()
        for path in ("/x", "/hooks", "/hook2", "/Hook", "/api/hook", "/healthz/x", "/favicon.ico"):
            with self.subTest(path=path):
                mark = self.mark()
                self.assertRejected(self.request(server, "POST", path, EVENT), 404, "not_found", mark)
        self.assertEqual(self.event_count(), 0)
        self.assertServing(server)

    def test_invalid_bridge_labels_are_404_bad_bridge(self):
        server = self.start_server()
        labels = ["a" * 129, "../etc/passwd", "a/..", "a/b", "a%2Fb", "bad%20label", "caf%C3%A9", "x<y>", "a+b",
                  "a,b", "..%2F..%2Fetc"]
        for label in labels:
            with self.subTest(label=label):
                mark = self.mark()
                response = self.request(server, "POST", "/hook/" + label, EVENT)
                self.assertRejected(response, 404, "bad_bridge", mark)
        self.assertEqual(self.event_count(), 0)
        status, reply = self.post(server, EVENT, path="/hook/" + "a" * 128)  # the longest valid label
        self.assertEqual(status, 200, reply)
        self.assertEqual(self.query("SELECT bridge FROM events WHERE id = ?", (reply["id"],)), [("a" * 128,)])

    def test_wrong_method_on_a_known_path_is_405_with_allow_header(self):
        server = self.start_server()
        cases = [("GET", "/hook", None, "POST"), ("PUT", "/hook", EVENT, "POST"), ("DELETE", "/hook", None, "POST"),
                 ("GET", "/hook/bridge-1", None, "POST"), ("PATCH", "/hook/bridge-1", EVENT, "POST"),
                 ("PURGE", "/hook", None, "POST"), ("TRACE", "/hook/bridge-1", None, "POST")]
        for method, path, body, allow in cases:
            with self.subTest(method=method, path=path):
                mark = self.mark()
                response = self.request(server, method, path, body)
                self.assertRejected(response, 405, "method_not_allowed", mark)
                self.assertEqual([part.strip() for part in response[1]["allow"].split(",")], [allow])
        mark = self.mark()
        response = self.request(server, "POST", "/healthz", EVENT)
        self.assertRejected(response, 405, "method_not_allowed", mark)
        self.assertIn("GET", response[1]["allow"])
        self.assertEqual(self.event_count(), 0)
        self.assertServing(server)

    def test_post_with_neither_length_nor_chunked_is_411(self):
        server = self.start_server()
        mark = self.mark()
        response = self.raw(server, b"POST /hook HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\r\n")
        self.assertRejected(response, 411, "length_required", mark)
        self.assertEqual(response[1].get("connection"), "close")
        self.assertServing(server)

    def test_body_over_max_body_is_413_by_content_length_and_chunked(self):
        server = self.start_server(max_body=100)
        fitting = b'{"event": "typing", "pad": "' + b"x" * 70 + b'"}'
        self.assertEqual(len(fitting), 100)
        too_big = fitting[:-2] + b'x"}'
        mark = self.mark()
        self.assertRejected(self.request(server, "POST", "/hook", too_big), 413, "body_too_large", mark)
        head = b"POST /hook HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
        mark = self.mark()
        response = self.raw(server, head + chunked(too_big[:60], too_big[60:]))
        self.assertRejected(response, 413, "body_too_large", mark)
        self.assertEqual(response[1].get("connection"), "close")
        self.assertEqual(self.event_count(), 0)
        # Exactly --max-body is still accepted, both ways.
        self.assertEqual(self.request(server, "POST", "/hook", fitting)[0], 200)
        self.assertEqual(self.raw(server, head + chunked(fitting[:50], fitting[50:]))[0], 200)

    def test_stalled_body_is_408_after_the_timeout(self):
        server = self.start_server(timeout=0.2)
        mark = self.mark()
        response = self.raw(server, b"POST /hook HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s"
                            % (len(EVENT), EVENT[:10]))
        self.assertRejected(response, 408, "body_timeout", mark)
        self.assertEqual(response[1].get("connection"), "close")
        mark = self.mark()
        response = self.raw(server, b"POST /hook HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                            b"%x\r\n%s" % (len(EVENT), EVENT[:10]))
        self.assertRejected(response, 408, "body_timeout", mark)
        self.assertEqual(self.event_count(), 0)
        self.assertServing(server)

    def test_body_trickled_a_byte_at_a_time_still_times_out(self):
        server = self.start_server(timeout=0.5)
        body = b'{"event": "typing", "pad": "' + b"x" * 200 + b'"}'
        mark = self.mark()
        sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
        try:
            sock.sendall(b"POST /hook HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(body))
            for byte in body:  # one byte every 0.1 s (paced by select): 23 s if never cut off
                if select.select([sock], [], [], 0.1)[0]:
                    break
                try:
                    sock.sendall(bytes([byte]))
                except OSError:  # the server answered and closed meanwhile: its reply is still readable
                    break
            self.assertRejected(read_response(sock), 408, "body_timeout", mark)
        finally:
            sock.close()
        self.assertEqual(self.event_count(), 0)

    def test_headers_trickled_a_byte_at_a_time_still_time_out(self):
        # A slow client must not hold a connection (and its thread) open by
        # sending its headers one byte at a time: --timeout bounds the request.
        server = self.start_server(timeout=0.3)
        sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
        closed = False
        try:
            sock.sendall(b"POST /hook HTTP/1.1\r\nHost: x\r\n")
            trickle = (bytes([byte]) for byte in itertools.cycle(b"X-Slow: y\r\n"))
            deadline = time.monotonic() + 5.0  # over 16 times --timeout
            while time.monotonic() < deadline:
                if select.select([sock], [], [], 0.1)[0]:
                    wait_for_eof(sock)
                    closed = True
                    break
                try:
                    sock.sendall(next(trickle))
                except OSError:
                    closed = True
                    break
        finally:
            sock.close()
        self.assertTrue(closed, "a client trickling headers kept its connection open for 5 s with --timeout 0.3")
        self.assertServing(server)

    def test_unknown_event_type_is_accepted_and_stored(self):
        server = self.start_server()
        body = {"event": "reaction_added", "chat_id": "c9", "emoji": "+1", "future_field": [1, 2]}
        status, reply = self.post(server, body)
        self.assertEqual(status, 200, reply)
        self.assertEqual(reply["duplicate"], False)
        rows = self.query("SELECT event, body FROM events WHERE id = ?", (reply["id"],))
        self.assertEqual(rows[0][0], "reaction_added")
        self.assertEqual(json.loads(rows[0][1]), body)


class NoEchoTest(HttpTestCase):
    def test_error_replies_and_log_lines_never_carry_script_tags_or_control_characters(self):
        server = self.start_server()
        hostile = b"<script>alert(1)</script>\x01\x1b[2J\x7f"
        head = b"POST /hook HTTP/1.1\r\nHost: x\r\n"
        requests = [
            b"POST /hook/" + hostile + b" HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}",
            b"POST /" + hostile + b" HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}",
            b"GET /hook?x=" + hostile + b" HTTP/1.1\r\nHost: x\r\n\r\n",
            with_length(head, b'{"event": "' + hostile),
            with_length(head, b'["' + hostile + b'"]'),
            with_length(head, b'{"event": ["' + hostile + b'"]}'),
            head + b"Transfer-Encoding: " + hostile + b"\r\n\r\n",
            head + b"Content-Length: " + hostile + b"\r\n\r\n",
            head + b"Transfer-Encoding: chunked\r\n\r\n" + hostile + b"\r\n",
            b"POST /" + hostile + b" HTTP/9.9\r\nHost: x\r\n\r\n",
            hostile + b"\r\n\r\n",
        ]
        for data in requests:
            with self.subTest(request=data[:50]):
                mark = self.mark()
                status, headers, body = self.raw(server, data)
                self.assertGreaterEqual(status, 400)
                self.assertEqual(headers.get("content-type"), "application/json")
                self.assertEqual(json.loads(body.decode("utf-8"))["ok"], False)
                for needle in (b"<script", b"script>", b"\x01", b"\x1b", b"\x7f"):
                    self.assertNotIn(needle, body)
                    self.assertNotIn(needle, b"\r\n".join(b"%s: %s" % (k.encode(), v.encode("latin-1"))
                                                          for k, v in headers.items()))
                lines = self.log.messages()[mark:]
                self.assertTrue(lines, "no log line for a refused request")
                for line in lines:
                    for char in ("\x01", "\x1b", "\x7f"):
                        self.assertNotIn(char, line)
        self.assertEqual(self.event_count(), 0)
        self.assertServing(server)


class AcceptTest(HttpTestCase):
    def test_body_is_parsed_as_json_whatever_the_content_type_says(self):
        server = self.start_server()
        for content_type in ("text/plain", None, "application/x-www-form-urlencoded", "application/xml",
                             "multipart/form-data; boundary=x"):
            with self.subTest(content_type=content_type):
                body = json.dumps({"event": "connected", "note": str(content_type)}).encode()
                headers = {"Content-Type": content_type} if content_type else {}
                status, response_headers, data = self.request(server, "POST", "/hook", body, headers)
                self.assertEqual(status, 200, data)
                self.assertEqual(response_headers["content-type"], "application/json")
                event_id = json.loads(data)["id"]
                self.assertEqual(self.query("SELECT body FROM events WHERE id = ?", (event_id,)), [(body.decode(),)])

    def test_body_with_a_utf8_byte_order_mark_is_stored_without_it_and_delivered(self):
        self.write_handler("typing.py", "def handle(event):\n    open(%r, 'w').write(event.chat_id)\n"
                           % self.out_path("chat"))
        server = self.start_server()
        status, reply = self.post(server, b"\xef\xbb\xbf" + EVENT)
        self.assertEqual(status, 200, reply)
        self.assertEqual(self.query("SELECT body FROM events WHERE id = ?", (reply["id"],)), [(EVENT.decode(),)])
        self.wait_status(reply["id"], "done")
        self.assertEqual(self.read_lines("chat"), ["c1"])

    def test_chunked_body_in_several_chunks_with_extensions_is_accepted(self):
        server = self.start_server()
        body = b'{"event": "message", "chat_id": "c1", "message_id": "chunky", "body": "hello chunked world"}'
        data = (b"POST /hook HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                + b"%X;name=value\r\n%s\r\n" % (len(body[:7]), body[:7])
                + b"%x ; ext\r\n%s\r\n" % (len(body[7:40]), body[7:40])
                + b"000%x\r\n%s\r\n" % (len(body[40:]), body[40:])
                + b"0;last=1\r\nX-Trailer: ignored\r\n\r\n")
        status, _headers, reply = self.raw(server, data)
        self.assertEqual(status, 200, reply)
        event_id = json.loads(reply)["id"]
        self.assertEqual(self.query("SELECT event, body FROM events WHERE id = ?", (event_id,)),
                         [("message", body.decode())])
        # http.client's own chunked encoding, from an iterable body.
        connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
        try:
            connection.request("POST", "/hook", body=iter([b'{"event": ', b'"typing", ', b'"chat_id": "c2"}']),
                               encode_chunked=True)
            response = connection.getresponse()
            self.assertEqual(response.status, 200, response.read())
        finally:
            connection.close()

    def test_bridge_label_reaches_the_inbox_and_the_bare_path_stores_null(self):
        server = self.start_server()
        ids = {}
        for path in ("/hook", "/hook/user-123", "/hook/A.b_c:d-9", "/hook/shop?x=1"):
            status, reply = self.post(server, EVENT, path=path)
            self.assertEqual(status, 200, reply)
            ids[path] = reply["id"]
        bridges = dict(self.query("SELECT id, bridge FROM events"))
        self.assertEqual([bridges[ids[path]] for path in ("/hook", "/hook/user-123", "/hook/A.b_c:d-9",
                                                          "/hook/shop?x=1")],
                         [None, "user-123", "A.b_c:d-9", "shop"])

    def test_path_setting_moves_the_endpoint(self):
        server = self.start_server(path="/custom")
        status, reply = self.post(server, EVENT, path="/custom")
        self.assertEqual(status, 200, reply)
        status, reply = self.post(server, EVENT, path="/custom/b1")
        self.assertEqual(status, 200, reply)
        self.assertEqual(self.query("SELECT bridge FROM events WHERE id = ?", (reply["id"],)), [("b1",)])
        mark = self.mark()
        self.assertRejected(self.request(server, "POST", "/hook", EVENT), 404, "not_found", mark)
        mark = self.mark()
        self.assertRejected(self.request(server, "POST", "/hook/b1", EVENT), 404, "not_found", mark)
        self.assertEqual(self.event_count(), 2)


class DeliverableOnlyTest(HttpTestCase):
    """A 200 only for an event every handler can be given (issue: hostile traffic, item 5)."""

    def test_bodies_no_handler_could_read_are_refused_with_a_reason(self):
        server = self.start_server()
        text = '{"event": "typing", "chat_id": "c1"}'
        cases = [
            (text.encode("utf-16-le"), "bad_json"),        # no BOM: valid UTF-8 full of NUL bytes
            (text.encode("utf-16"), "bad_json"),
            (text.encode("utf-32-le"), "bad_json"),
            (b'{"event": "typing", "n": NaN}', "bad_json"),
            (b'{"event": "typing", "n": Infinity}', "bad_json"),
            (b'{"event": "typing", "n": -Infinity}', "bad_json"),
            (b'{"event": "typ\\u0000ing"}', "bad_event"),
            (b'{"event": "\\ud800"}', "bad_event"),
            (json.dumps({"event": "x" * 129}).encode(), "bad_event"),
            (b'{"event": "typing", "chat_id": ' + b"[" * 100000 + b"]" * 100000 + b"}", "too_complex"),
            (b'{"event": "typing", "chat_id": ' + b"[" * 5000 + b"]" * 5000 + b"}", "too_complex"),  # too deep
            (b'{"event": "typing", "chat_id": ' + b"[" * 101 + b"]" * 101 + b"}", "too_complex"),
            (b'{"event": "typing", "a": [' + b"[]," * 10000 + b'[]]}', "too_complex"),
        ]
        for body, code in cases:
            with self.subTest(body=body[:40]):
                mark = self.mark()
                self.assertRejected(self.request(server, "POST", "/hook", body), 400, code, mark)
        self.assertEqual(self.event_count(), 0)
        self.assertServing(server)

    def test_odd_but_valid_events_are_stored_and_reach_a_script_as_json(self):
        self.write_handler("all.sh", "#!/bin/sh\ncat >> %s\necho >> %s\n" % (self.out_path("seen"),
                                                                            self.out_path("seen")))
        server = self.start_server()
        bodies = [
            json.dumps({"event": "x" * 128}),
            json.dumps({"event": "typing", "chat_id": [[[[{"deep": 1}]]]] * 2, "contact_id": {"a": 1}}),
            '{"event": "message", "chat_id": ' + "[" * 99 + "]" * 99 + ', "message_id": {"x": 1}}',
            json.dumps({"event": "profile_picture_updated", "remove": [[[]]], "picture_id": "p", "timestamp": 1}),
        ]
        ids = []
        for body in bodies:
            status, reply = self.post(server, body)
            self.assertEqual(status, 200, reply)
            ids.append(reply["id"])
        for event_id in ids:
            self.wait_status(event_id, "done")
        self.assertEqual([json.loads(line) for line in self.read_lines("seen") if line],
                         [json.loads(body) for body in bodies])


class FramingTest(HttpTestCase):
    """RFC 9112 framing: whatever a proxy in front may read differently is refused, never guessed."""

    def test_ambiguous_or_malformed_framing_is_400_and_the_connection_closes(self):
        server = self.start_server()
        head = b"POST /hook HTTP/1.1\r\nHost: x\r\n"
        cases = [
            (b"Content-Length: %d\r\nTransfer-Encoding: chunked\r\n" % len(EVENT), "bad_request"),
            (b"Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n", "bad_transfer_encoding"),
            (b"Transfer-Encoding: identity\r\nTransfer-Encoding: chunked\r\n", "bad_transfer_encoding"),
            (b"Transfer-Encoding : chunked\r\n", "bad_request"),          # whitespace before the colon
            (b"Content-Length : %d\r\n" % len(EVENT), "bad_request"),
            (b"X-No-Colon\r\nContent-Length: %d\r\n" % len(EVENT), "bad_request"),
            (b"X-Ctl: a\x1fb\r\nContent-Length: %d\r\n" % len(EVENT), "bad_request"),
            (b"X-Ctl: a\x1d\r\nContent-Length: %d\r\n" % len(EVENT), "bad_request"),
            (b"Content-Length: %d\x1d\r\n" % len(EVENT), "bad_request"),
            (b" X-Folded: yes\r\nContent-Length: %d\r\n" % len(EVENT), "bad_request"),
        ]
        for header, code in cases:
            with self.subTest(header=header):
                mark = self.mark()
                sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
                try:
                    sock.sendall(head + header + b"\r\n" + EVENT)
                    response = read_response(sock)
                    self.assertRejected(response, 400, code, mark)
                    self.assertEqual(response[1].get("connection"), "close")
                    wait_for_eof(sock)
                finally:
                    sock.close()
        self.assertEqual(self.event_count(), 0)
        self.assertServing(server)

    def test_a_body_on_a_get_is_never_read_as_the_next_request(self):
        server = self.start_server()
        smuggled = with_length(b"POST /hook HTTP/1.1\r\nHost: x\r\n", EVENT)
        for method in (b"GET", b"HEAD"):
            with self.subTest(method=method):
                sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
                try:
                    sock.sendall(with_length(method + b" /healthz HTTP/1.1\r\nHost: x\r\n", smuggled))
                    status, headers, _body = read_response(sock, head_only=method == b"HEAD")
                    self.assertEqual(status, 200)
                    self.assertEqual(headers.get("connection"), "close")
                    wait_for_eof(sock)
                finally:
                    sock.close()
        self.assertEqual(self.event_count(), 0)

    def test_empty_lines_before_a_pipelined_request_are_skipped(self):
        server = self.start_server()
        sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
        try:
            request = with_length(b"POST /hook HTTP/1.1\r\nHost: x\r\n", EVENT)
            sock.sendall(request + b"\r\n\r\n" + request)
            # Both replies in the socket before the first is read (what a slow client sees): one recv
            # takes them both, and the second must not be lost with the first's read.
            wait_until(lambda: sock.recv(65536, socket.MSG_PEEK).count(b"HTTP/1.1 ") == 2,
                       timeout=10, interval=0.01, message="both pipelined replies")
            self.assertEqual(read_response(sock)[0], 200)
            self.assertEqual(read_response(sock)[0], 200)
        finally:
            sock.close()
        self.assertEqual(self.event_count(), 2)

    def test_an_oversized_head_is_refused_before_it_is_all_read(self):
        server = self.start_server()
        for extra, status in ((b"X-Big: " + b"a" * 70000 + b"\r\n", 431),
                              (b"".join(b"X-%d: v\r\n" % n for n in range(101)), 431)):
            with self.subTest(status=status, size=len(extra)):
                mark = self.mark()
                response = self.raw(server, b"POST /hook HTTP/1.1\r\nHost: x\r\n" + extra + b"\r\n")
                self.assertRejected(response, status, "http_%d" % status, mark)
        mark = self.mark()
        self.assertRejected(self.raw(server, b"POST /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: x\r\n\r\n"),
                            414, "http_414", mark)
        mark = self.mark()
        self.assertRejected(self.raw(server, b"POST /hook HTTP/2.0\r\nHost: x\r\n\r\n"), 505, "http_505", mark)
        self.assertServing(server)


class ConnectionTest(HttpTestCase):
    def test_fifty_posts_on_one_keepalive_connection_all_get_distinct_ids(self):
        server = self.start_server()
        connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
        ids = []
        try:
            connection.connect()
            sock = connection.sock
            for n in range(50):
                body = json.dumps({"event": "message", "chat_id": "c1", "message_id": "k%d" % n}).encode()
                connection.request("POST", "/hook", body=body, headers={"Content-Type": "application/json"})
                response = connection.getresponse()
                data = response.read()
                self.assertEqual(response.status, 200, data)
                self.assertNotEqual((response.getheader("Connection") or "").lower(), "close")
                self.assertIs(connection.sock, sock, "the connection was reopened at request %d" % n)
                ids.append(json.loads(data)["id"])
        finally:
            connection.close()
        self.assertEqual(len(set(ids)), 50)
        self.assertEqual(self.event_count(), 50)

    def test_idle_keepalive_connection_is_closed_after_the_timeout(self):
        server = self.start_server(timeout=0.2)
        sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
        try:
            sock.sendall(b"POST /hook HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s" % (len(EVENT), EVENT))
            status, headers, _body = read_response(sock)
            self.assertEqual(status, 200)
            self.assertNotEqual(headers.get("connection"), "close")
            self.assertEqual(wait_for_eof(sock), b"")  # closed without a word, well before 10 s
        finally:
            sock.close()
        self.assertServing(server)

    def test_idle_and_half_sent_connections_do_not_pin_the_server(self):
        server = self.start_server()  # the default --timeout: they stay open for the whole test
        sockets = []
        try:
            for n in range(20):
                sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
                sockets.append(sock)
                if n % 2:
                    sock.sendall(b"POST /hook HTTP/1.1\r\nHost: x\r\nContent-Length: 500\r\n\r\n{")
            self.assertServing(server)
            status, reply = self.post(server, EVENT, path="/hook/after-idle")
            self.assertEqual(status, 200, reply)
        finally:
            for sock in sockets:
                sock.close()

    def test_a_burst_of_64_new_connections_is_all_accepted(self):
        server = self.start_server()
        count = 64
        barrier = threading.Barrier(count)
        results = [None] * count

        def post(n):
            barrier.wait(timeout=15)
            connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=15)
            try:
                body = json.dumps({"event": "connected", "n": n}).encode()
                connection.request("POST", "/hook/burst", body=body)
                response = connection.getresponse()
                results[n] = (response.status, json.loads(response.read())["id"])
            except Exception as exc:  # reported through results
                results[n] = (repr(exc), None)
            finally:
                connection.close()

        threads = [threading.Thread(target=post, args=(n,)) for n in range(count)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
        self.assertEqual([status for status, _id in results], [200] * count, results)
        self.assertEqual(len({event_id for _status, event_id in results}), count)
        self.assertEqual(self.event_count(), count)

    def test_a_keepalive_response_arrives_in_one_write(self):
        # Status line, headers and body in one segment: a reply split in two small writes
        # stalls on Nagle plus delayed ACK, and its first recv holds only the headers.
        server = self.start_server()
        sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
        try:
            for n in range(5):
                body = json.dumps({"event": "typing", "chat_id": "c1", "n": n}).encode()
                sock.sendall(b"POST /hook HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
                self.assertTrue(select.select([sock], [], [], 10)[0], "no reply within 10 s")
                data = sock.recv(65536)
                head, separator, reply = data.partition(b"\r\n\r\n")
                self.assertTrue(head.startswith(b"HTTP/1.1 200 "), data)
                self.assertEqual(separator, b"\r\n\r\n", "the first recv did not hold the whole head: %r" % data)
                length = [int(line.split(b":")[1]) for line in head.split(b"\r\n")
                          if line.lower().startswith(b"content-length:")][0]
                self.assertEqual(len(reply), length, "the first recv did not hold the whole body: %r" % data)
                self.assertEqual(json.loads(reply)["ok"], True)
        finally:
            sock.close()


class TokenTest(HttpTestCase):
    def basic(self, credentials):
        return {"Authorization": "Basic " + base64.b64encode(credentials.encode()).decode()}

    def test_token_is_accepted_as_query_bearer_or_basic_password_with_any_user(self):
        server = self.start_server(token=TOKEN)
        cases = [("/hook?token=s3cret", {}), ("/hook/b1?x=1&token=s3cret", {}),
                 ("/hook", {"Authorization": "Bearer s3cret"}), ("/hook", {"Authorization": "bearer s3cret"}),
                 ("/hook", self.basic("x:s3cret")), ("/hook", self.basic("anyone:s3cret")),
                 ("/hook", self.basic(":s3cret"))]
        for path, headers in cases:
            with self.subTest(path=path, headers=headers):
                status, reply = self.post(server, EVENT, path=path, headers=headers)
                self.assertEqual(status, 200, reply)
        self.assertEqual(self.event_count(), len(cases))

    def test_token_in_an_absolute_form_request_target_is_accepted(self):
        server = self.start_server(token=TOKEN)
        head = b"POST http://127.0.0.1:%d/hook/b1?token=s3cret HTTP/1.1\r\nHost: x\r\n" % server.port
        status, _headers, reply = self.raw(server, with_length(head, EVENT))
        self.assertEqual(status, 200, reply)
        self.assertEqual(self.query("SELECT bridge FROM events WHERE id = ?", (json.loads(reply)["id"],)),
                         [("b1",)])

    def test_wrong_or_missing_token_is_401_with_www_authenticate(self):
        server = self.start_server(token=TOKEN)
        cases = [("/hook", {}), ("/hook?token=", {}), ("/hook?token=S3CRET", {}), ("/hook?token=s3cret2", {}),
                 ("/hook", {"Authorization": "Bearer wrong"}), ("/hook", {"Authorization": "Bearer"}),
                 ("/hook", {"Authorization": "s3cret"}), ("/hook", self.basic("x:wrong")),
                 ("/hook", self.basic("s3cret:")), ("/hook", self.basic("s3cret")),
                 ("/hook", {"Authorization": "Basic !!not-base64!!"}), ("/hook/b1", {"X-Token": "s3cret"})]
        for path, headers in cases:
            with self.subTest(path=path, headers=headers):
                mark = self.mark()
                response = self.request(server, "POST", path, EVENT, headers)
                self.assertRejected(response, 401, "unauthorized", mark)
                self.assertIn("www-authenticate", response[1])
        self.assertEqual(self.event_count(), 0)
        self.assertEqual(self.post(server, EVENT, path="/hook?token=s3cret")[0], 200)

    def test_healthz_needs_no_token_and_metrics_does(self):
        server = self.start_server(token=TOKEN)
        status, _headers, data = self.request(server, "GET", "/healthz")
        self.assertEqual(status, 200, data)
        self.assertEqual(json.loads(data)["status"], "ok")
        mark = self.mark()
        response = self.request(server, "GET", "/metrics")
        self.assertRejected(response, 401, "unauthorized", mark)
        self.assertIn("www-authenticate", response[1])
        mark = self.mark()
        self.assertRejected(self.request(server, "GET", "/metrics?token=nope"), 401, "unauthorized", mark)
        for path, headers in (("/metrics?token=s3cret", {}), ("/metrics", {"Authorization": "Bearer s3cret"})):
            status, headers, data = self.request(server, "GET", path, headers=headers)
            self.assertEqual(status, 200, data)
            self.assertTrue(headers["content-type"].startswith("text/plain"))
            self.assertIn(b'wabhook_requests_rejected_total{status="401"}', data)

    def test_starting_without_a_token_warns_only_when_reachable_from_other_machines(self):
        cases = [("0.0.0.0", None, True), ("0.0.0.0", TOKEN, False), ("127.0.0.1", None, False),
                 ("127.0.0.2", None, False)]
        for host, token, warns in cases:
            with self.subTest(host=host, token=token):
                mark = self.mark()
                server = self.start_server(host=host, token=token)  # no traffic: only the start-up log is read
                self.stop_server(server)
                warnings_logged = [m for m in self.log.messages()[mark:] if "no --token" in m]
                self.assertEqual(len(warnings_logged), 1 if warns else 0, warnings_logged)
                if warns:
                    self.assertIn("?token=", warnings_logged[0])  # it says what to do
        self.assertTrue(wabhook.is_loopback("::1") and wabhook.is_loopback("localhost"))
        self.assertFalse(wabhook.is_loopback("example.com") or wabhook.is_loopback("10.0.0.1"))


class SignatureTest(HttpTestCase):
    def signed_post(self, server, body, headers):
        """(status, reply) of a signed POST; a dropped connection fails the test instead of erroring."""
        try:
            status, _headers, data = self.request(server, "POST", "/hook", body, headers)
        except (http.client.HTTPException, ConnectionError) as exc:
            self.fail("no HTTP reply at all (%r): the server failed on these headers" % exc)
        return status, json.loads(data.decode("utf-8"))

    def test_correct_standard_webhooks_signature_is_accepted(self):
        server = self.start_server(secret=SECRET)
        status, reply = self.signed_post(server, EVENT, sign(EVENT))
        self.assertEqual(status, 200, reply)
        other = sign(EVENT, key=b"another key")["webhook-signature"]
        headers = dict(sign(EVENT, message_id="msg_2"))
        headers["webhook-signature"] = other + " " + headers["webhook-signature"]  # key rotation: any v1 matches
        status, reply = self.signed_post(server, EVENT, headers)
        self.assertEqual(status, 200, reply)
        self.assertEqual(self.event_count(), 2)

    def test_wrong_stale_or_missing_signatures_are_401(self):
        server = self.start_server(secret=SECRET)
        now = int(time.time())
        missing = []
        for name in ("webhook-id", "webhook-timestamp", "webhook-signature"):
            headers = sign(EVENT)
            del headers[name]
            missing.append((headers, "missing_signature"))
        cases = [
            (sign(EVENT, key=b"wrong key"), "bad_signature"),
            (sign(EVENT + b" "), "bad_signature"),                       # signed another body
            (dict(sign(EVENT), **{"webhook-id": "msg_other"}), "bad_signature"),
            (sign(EVENT, timestamp=str(now - 600)), "stale_signature"),
            (sign(EVENT, timestamp=str(now + 600)), "stale_signature"),
            ({}, "missing_signature"),
        ] + missing
        for headers, code in cases:
            with self.subTest(headers=headers):
                mark = self.mark()
                self.assertRejected(self.request(server, "POST", "/hook", EVENT, headers), 401, code, mark)
        self.assertEqual(self.event_count(), 0)
        self.assertEqual(self.signed_post(server, EVENT, sign(EVENT))[0], 200)

    def test_malformed_signature_headers_are_401_never_500(self):
        server = self.start_server(secret=SECRET)
        good = sign(EVENT)
        digest = good["webhook-signature"][3:]
        cases = [
            {"webhook-signature": "garbage"},
            {"webhook-signature": "v1" + digest},             # no comma
            {"webhook-signature": "v1,"},
            {"webhook-signature": ",,, ,"},
            {"webhook-signature": "v1,!!!not base64!!!"},
            {"webhook-signature": "v2," + digest},           # an unknown version never matches
            {"webhook-signature": "v1,\xe9\xff"},
            {"webhook-timestamp": "soon"},
            {"webhook-timestamp": "-1"},
            {"webhook-timestamp": "1e9"},
            {"webhook-timestamp": "\xb2"},                   # latin-1 superscript two: str.isdigit() is True
            {"webhook-timestamp": "9" * 5000},               # over int()'s digit limit on Python 3.11+
            {"webhook-id": "\xe9\xe9\xe9"},
        ]
        for override in cases:
            with self.subTest(override={k: v[:40] for k, v in override.items()}):
                mark = self.mark()
                status, reply = self.signed_post(server, EVENT, dict(good, **override))
                self.assertEqual(status, 401, reply)
                self.assertEqual(reply["ok"], False)
                self.assertIn(reply["error"], ("bad_signature", "stale_signature"))
                self.assertTrue(any("401" in line for line in self.log.messages()[mark:]))
        self.assertEqual(self.event_count(), 0)
        self.assertEqual(self.signed_post(server, EVENT, sign(EVENT))[0], 200)


class TlsTest(HttpTestCase):
    def https_post(self, server, context):
        connection = http.client.HTTPSConnection("127.0.0.1", server.port, timeout=10, context=context)
        try:
            connection.request("POST", "/hook", body=EVENT)
            response = connection.getresponse()
            return response.status, json.loads(response.read())
        finally:
            connection.close()

    def test_https_post_with_a_trusted_certificate_is_accepted(self):
        server = self.start_server(tls_cert=TLS_CERT, tls_key=TLS_KEY)
        self.assertTrue(server.url.startswith("https://"))
        status, reply = self.https_post(server, ssl.create_default_context(cafile=TLS_CERT))
        self.assertEqual(status, 200, reply)
        self.assertEqual(self.query("SELECT body FROM events WHERE id = ?", (reply["id"],)), [(EVENT.decode(),)])

    def test_client_limited_to_tls_1_1_is_refused(self):
        server = self.start_server(tls_cert=TLS_CERT, tls_key=TLS_KEY)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.load_verify_locations(TLS_CERT)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            context.minimum_version = ssl.TLSVersion.TLSv1
            context.maximum_version = ssl.TLSVersion.TLSv1_1
        context.set_ciphers("DEFAULT:@SECLEVEL=0")
        with self.assertRaises((ssl.SSLError, ConnectionResetError, BrokenPipeError)):
            self.https_post(server, context)
        self.assertEqual(self.event_count(), 0)
        status, reply = self.https_post(server, ssl.create_default_context(cafile=TLS_CERT))
        self.assertEqual(status, 200, reply)

    def test_a_plain_http_server_does_not_load_openssl(self):
        # ssl, http.client, hashlib and hmac (_hashlib is their OpenSSL) cost about 6 MB for the
        # life of the process; TLS, forwarding, --secret and --dedup-window import them when
        # first used. The server below checks a --token and answers a POST without them.
        code = """if True:
            import json, logging, socket, sys
            sys.path.insert(0, %r)
            import wabhook
            config = wabhook.build_config({"host": "127.0.0.1", "port": 0, "db": %r, "handlers": %r,
                                           "token": "t0ken"}, {})
            server = wabhook.Server(config, logging.getLogger("test")).start()
            body = b'{"event": "connected"}'
            with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
                sock.sendall(b"POST /hook?token=t0ken HTTP/1.1\\r\\nHost: x\\r\\nContent-Length: %%d\\r\\n\\r\\n%%s"
                             %% (len(body), body))
                reply = sock.recv(4096)
            server.stop()
            print(json.dumps([reply.split(b" ")[1].decode(),
                              sorted(name for name in ("ssl", "http.client", "_hashlib") if name in sys.modules)]))
        """ % (os.path.dirname(SCRIPT), self.db, self.handlers)
        result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertEqual(json.loads(result.stdout), ["200", []], result.stderr)


def closed_by_server(sockets, wait=0.5):
    """The sockets the server closed: readable within `wait` (one for all), and at their end."""
    deadline, readable = time.monotonic() + wait, set()
    while len(readable) < len(sockets) and time.monotonic() < deadline:
        ready = select.select([sock for sock in sockets if sock not in readable], [], [],
                              max(0.0, deadline - time.monotonic()))[0]
        readable.update(ready)
    return [sock for sock in sockets if sock in readable and sock.recv(1) == b""]


class ConnectionLimitTest(HttpTestCase):
    def test_at_the_limit_the_idlest_connection_makes_room_and_busy_ones_make_new_ones_wait_outside(self):
        server = self.start_server(max_connections=4)
        idle = [socket.create_connection(("127.0.0.1", server.port), timeout=10) for _ in range(4)]
        try:
            wait_until(lambda: len(server.front.connections) == 4, message="4 open connections")
            self.assertServing(server)  # a fifth: one idle connection is closed for it
            self.assertEqual(len(closed_by_server(idle)), 1)
        finally:
            for sock in idle:
                sock.close()
        wait_until(lambda: not server.front.connections, message="the connections to close")
        # Requests in progress are not idle; refused while none has been arriving for long.
        self.addCleanup(setattr, wabhook, "SLOW_REQUEST_SECONDS", wabhook.SLOW_REQUEST_SECONDS)
        wabhook.SLOW_REQUEST_SECONDS = 3600.0
        busy = [socket.create_connection(("127.0.0.1", server.port), timeout=10) for _ in range(4)]
        try:
            for sock in busy:
                sock.sendall(b"POST /hook HTTP/1.1\r\nHost: x\r\n")  # a request in progress: not idle
            wait_until(lambda: len([c for c in list(server.front.connections.values()) if c.buffer]) == 4,
                       message="4 requests in progress")
            mark = self.mark()
            refused = socket.create_connection(("127.0.0.1", server.port), timeout=10)
            try:
                with self.assertRaises((ConnectionError, AssertionError)):
                    refused.sendall(with_length(b"POST /hook HTTP/1.1\r\nHost: x\r\n", EVENT))
                    read_response(refused)
            finally:
                refused.close()
            wait_until(lambda: any("refused 1 connections" in line for line in self.log.messages()[mark:]),
                       message="a log line about the refusal")
            # A request arriving for longer than SLOW_REQUEST_SECONDS is closed to make room.
            wabhook.SLOW_REQUEST_SECONDS = 0.0
            self.assertServing(server)
            self.assertEqual(len(closed_by_server(busy)), 1)
        finally:
            for sock in busy:
                sock.close()
        wait_until(lambda: not server.front.connections, message="the server to see them closed")
        self.assertServing(server)
        self.assertEqual(self.event_count(), 3)


class InflightBudgetTest(HttpTestCase):
    def test_past_the_inflight_budget_large_bodies_still_arriving_wait_and_small_ones_go_through(self):
        server = self.start_server(max_inflight=100 * 1024, max_body=1024 * 1024)
        big = b'{"event": "typing", "pad": "' + b"x" * 200000 + b'"}'
        small = b'{"event": "typing", "pad": "' + b"y" * 70000 + b'"}'
        hog = socket.create_connection(("127.0.0.1", server.port), timeout=10)
        late = socket.create_connection(("127.0.0.1", server.port), timeout=10)
        try:  # the oldest body in progress goes on past the budget; later ones wait for it
            hog.sendall(b"POST /hook HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s" % (len(big), big[:150000]))
            wait_until(lambda: server.front._inflight >= 100 * 1024, message="the budget to be spent")
            late.sendall(b"POST /hook HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s" % (len(small), small[:10]))
            wait_until(lambda: len(server.front._bodies) == 2, message="the late body to start")
            late.sendall(small[10:])
            self.assertEqual(select.select([late], [], [], 0.3)[0], [], "a body past the budget was read")
            self.assertEqual(self.post(server, EVENT)[0], 200)  # a request that arrives whole goes through
            hog.sendall(big[150000:])
            self.assertEqual(read_response(hog)[0], 200)
            self.assertEqual(read_response(late)[0], 200)  # read once the budget freed up
        finally:
            hog.close()
            late.close()
        self.assertEqual(server.front._inflight, 0)
        self.assertEqual(self.event_count(), 3)

class DescriptorExhaustionTest(HttpTestCase):
    def test_out_of_descriptors_the_server_says_so_once_and_serves_again_once_they_free_up(self):
        import resource

        def low_limit():
            resource.setrlimit(resource.RLIMIT_NOFILE, (48, 48))  # hard too: the server cannot raise it

        log_path = self.out_path("server.log")
        with open(log_path, "wb") as log:
            process = subprocess.Popen(
                [sys.executable, SCRIPT, "serve", "--host", "127.0.0.1", "--port", "0", "--db", self.db,
                 "--handlers", self.handlers], stdout=log, stderr=subprocess.STDOUT, preexec_fn=low_limit)
        self.processes.append(process)
        process.log_path = log_path
        port = int(wait_until(lambda: re.search(r"listening on http://[^:]+:(\d+)", self.process_log(process)),
                              message="the server to listen").group(1))
        flood = []
        try:
            for _ in range(60):  # more than its descriptors: the last ones wait in the listen backlog
                sock = socket.create_connection(("127.0.0.1", port), timeout=10)
                sock.sendall(b"POST /hook HTTP/1.1\r\nHost: x\r\n")  # requests in progress: none is idle
                flood.append(sock)
            wait_until(lambda: "cannot accept connections" in self.process_log(process),
                       message="a log line about the descriptors")
        finally:
            for sock in flood:
                sock.close()
        status, reply = self.post(port, EVENT)
        self.assertEqual(status, 200, reply)
        self.assertEqual(self.process_log(process).count("cannot accept connections"), 1)
        self.assertIsNone(process.poll())


class ErrorReplyTest(WabhookTestCase):
    """Bad requests: a status code and a JSON error, and the server keeps serving."""

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
