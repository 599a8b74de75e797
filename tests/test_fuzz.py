"""A seeded fuzz run against a real server (hostile traffic): mutated requests over raw sockets.

The server must stay alive, answer no 5xx, store every event it acknowledged, and store nothing a
handler could not parse. bench/fuzz.py runs the same campaign with more requests.
"""

import json
import random
import socket

from tests.support import WabhookTestCase, load_samples

import wabhook

METHODS = [b"POST", b"GET", b"HEAD", b"PUT", b"OPTIONS", b"P\x1bST", b"", b"POST POST"]
PATHS = [b"/hook", b"/hook/b-1", b"/hook/../x", b"/healthz", b"/metrics", b"/", b"/hook?x=1", b"*",
         b"http://h/hook", b"/hook/" + b"a" * 200, b"/hook\x00", b"/hook%00"]
VERSIONS = [b"HTTP/1.1", b"HTTP/1.0", b"HTTP/2.0", b"HTTP/1.1 ", b"http/1.1", b""]
HEADERS = [b"Host: x", b"Content-Type: application/json", b"Connection: close", b"Connection: keep-alive",
           b"Expect: 100-continue", b"Transfer-Encoding: chunked", b"Transfer-Encoding : chunked",
           b"Transfer-Encoding: gzip, chunked", b"Content-Length: 0", b"Content-Length: -1",
           b"Content-Length: 99999999999999999999", b"X: \x1d", b"NoColon", b" folded: x",
           b"Authorization: Bearer x", b"X-Long: " + b"v" * 3000]


def json_bodies(rng, samples):
    """Bodies near the valid ones: samples, samples mutated, odd JSON."""
    sample = dict(rng.choice(samples))
    choice = rng.randrange(10)
    if choice == 0:
        sample["message_id"] = "fuzz-%d" % rng.randrange(10 ** 9)
    elif choice == 1:
        sample[rng.choice(list(sample))] = rng.choice([None, 1.5, -1, "", [], {}, "\u0000", "\ud800", "x" * 500,
                                                      [[[]]], {"a": {"b": [1]}}, True, 2 ** 70])
    elif choice == 2:
        sample["event"] = rng.choice(["", "x" * 200, "a\nb", "mes\u0000sage", "\u202e", 5, None, "custom"])
    elif choice == 3:
        return rng.choice([b"NaN", b'{"event": "x", "n": NaN}', b"[" * 3000, b"{}", b"null", b"\xff\xfe{}",
                           json.dumps(sample).encode("utf-16"), b'{"event": "typing"']
                          )
    body = json.dumps(sample).encode("utf-8")
    if choice == 4 and body:
        position = rng.randrange(len(body))
        body = body[:position] + bytes([rng.randrange(256)]) + body[position + 1:]
    return body


def chunk(body, rng):
    out, position = b"", 0
    while position < len(body):
        size = rng.randint(1, 40)
        part = body[position:position + size]
        out += b"%x\r\n%s\r\n" % (len(part), part)
        position += size
    return out + b"0\r\n\r\n"


def request(rng, samples):
    """One request: usually well formed with a strange part, sometimes garbage throughout."""
    body = json_bodies(rng, samples)
    method = b"POST" if rng.random() < 0.7 else rng.choice(METHODS)
    path = b"/hook" if rng.random() < 0.6 else rng.choice(PATHS)
    version = b"HTTP/1.1" if rng.random() < 0.9 else rng.choice(VERSIONS)
    headers = [b"Host: x"] + rng.sample(HEADERS, rng.randint(0, 3)) if rng.random() < 0.4 else [b"Host: x"]
    framing = rng.random()
    if framing < 0.6:
        headers.append(b"Content-Length: %d" % len(body))
    elif framing < 0.85:
        headers.append(b"Transfer-Encoding: chunked")
        body = chunk(body, rng)
    head = method + b" " + path + b" " + version + b"\r\n" + b"\r\n".join(headers) + b"\r\n\r\n"
    data = head + body
    if rng.random() < 0.1:  # truncated anywhere
        data = data[:rng.randrange(len(data) + 1)]
    if rng.random() < 0.05:  # raw noise
        data = bytes(rng.randrange(256) for _ in range(rng.randint(0, 300)))
    return data


def exchange(port, payload):
    """Send `payload` on a new connection, end the sending side, and return all the server sent back."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(payload)
        sock.shutdown(socket.SHUT_WR)
        received = b""
        while True:
            try:
                part = sock.recv(65536)
            except ConnectionResetError:
                return received
            if not part:
                return received
            received += part


def responses(data):
    """(status, body) of every whole response in a byte stream."""
    out = []
    while data.startswith(b"HTTP/1.1 "):
        head, separator, rest = data.partition(b"\r\n\r\n")
        if not separator:
            break
        status = int(head.split(b" ", 2)[1])
        length = 0
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        if status == 100:
            out.append((status, b""))
            data = rest
            continue
        out.append((status, rest[:length]))
        data = rest[length:]
    return out


class FuzzTest(WabhookTestCase):
    def test_a_seeded_campaign_leaves_the_server_serving_and_every_ack_stored_and_parseable(self):
        server = self.start_server(max_body=64 * 1024, timeout=2.0)
        rng = random.Random(20261125)
        samples = load_samples()
        acked, statuses = set(), {}
        for _ in range(4000):
            payload = b"".join(request(rng, samples) for _ in range(rng.choice([1, 1, 1, 2, 3])))
            for status, body in responses(exchange(server.port, payload)):
                statuses[status] = statuses.get(status, 0) + 1
                if status == 200 and body.startswith(b'{"ok": true, "id"'):
                    acked.add(json.loads(body)["id"])
        # 505 is the answer to HTTP/2.0 and such, not a fault of the server's.
        self.assertFalse([status for status in statuses if status >= 500 and status != 505], statuses)
        self.assertGreater(len(acked), 300, statuses)  # the campaign does reach the inbox
        rows = dict(self.query("SELECT id, body FROM events"))
        self.assertEqual(acked - set(rows), set())
        for event_id, body in rows.items():
            raw = json.loads(body)  # every stored event parses: as a script's JSON, and typed
            wabhook.parse_event(raw, None, event_id)
            self.assertNotIn("\x00", raw["event"])
        self.assertEqual(self.request(server, "GET", "/healthz")[0], 200)
