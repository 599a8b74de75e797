"""Forwarding into a real NATS JetStream through handlers/examples/all.nats.py.

Two wabhook processes with separate inboxes (two "hosts", each owning some bridges) run the
example handler against a real `nats-server -js` on 127.0.0.1; one of them is killed with
SIGKILL mid-stream (with a backlog, and publishes waiting for the stream's ack) and restarted.
The stream must then hold every acknowledged event exactly once, with the exact body that was
posted, and each chat's messages in the order they were acknowledged.

The test itself is stdlib-only: nats-py is needed only by the handler, which runs inside the
wabhook subprocesses, and by a small reader run the same way. They use NATS_TEST_PYTHON
(a Python with nats-py installed; .ci/run makes one) or this interpreter if it has nats-py.
"""

import functools
import http.client
import importlib.util
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import unittest

from tests.support import ROOT, SCRIPT, WabhookTestCase, load_samples, wait_until

EXAMPLE = os.path.join(ROOT, "handlers", "examples", "all.nats.py")
NATS_SERVER = shutil.which("nats-server")
STREAM = "WABHOOK"


@functools.lru_cache(maxsize=None)
def nats_python():
    """(a Python with nats-py, or None and why not)."""
    configured = os.environ.get("NATS_TEST_PYTHON")
    if configured:
        try:
            subprocess.run([configured, "-c", "import nats"], check=True, timeout=30,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        except (OSError, subprocess.SubprocessError):
            return None, "NATS_TEST_PYTHON=%s cannot import nats (pip install nats-py)" % configured
        return configured, ""
    if importlib.util.find_spec("nats") is not None:
        return sys.executable, ""
    return None, ("nats-py is not installed here: set NATS_TEST_PYTHON to a Python that has it"
                  " (python -m venv v && v/bin/pip install nats-py)")


# Run under the Python with nats-py: prints every message of the stream as one JSON line, in stream order.
DUMP_STREAM = r'''
import asyncio, json, sys
import nats
from nats.js.api import AckPolicy, ConsumerConfig

async def main(url, stream):
    nc = await nats.connect(url, connect_timeout=2, allow_reconnect=False)
    try:
        js = nc.jetstream()
        total = (await js.stream_info(stream)).state.messages
        sub = await js.pull_subscribe("wabhook.>", stream=stream, config=ConsumerConfig(ack_policy=AckPolicy.NONE))
        seen = 0
        while seen < total:
            for msg in await sub.fetch(batch=min(1000, total - seen), timeout=5):
                seen += 1
                print(json.dumps({"seq": msg.metadata.sequence.stream, "subject": msg.subject,
                                  "data": msg.data.decode("utf-8"), "headers": dict(msg.headers or {})}))
    finally:
        await nc.close()

asyncio.run(main(sys.argv[1], sys.argv[2]))
'''

# The hosts and the bridges (URL labels) each one owns. Labels with '.' and ':' check that
# subject tokens are escaped; `None` is the bare /hook path, published as "default".
HOST_BRIDGES = {"east": [None, "east-1", "east.2"], "west": ["west-1", "west:2"]}
SUBJECT_TOKEN = {None: "default", "east-1": "east-1", "east.2": "east~2E2", "west-1": "west-1",
                 "west:2": "west~3A2"}
CHATS = 50
MESSAGES_PER_CHAT = 60          # 3,000 messages in all
POSTERS_PER_HOST = 3
KILL_AFTER_ACKS = 300           # acks from the victim host before its kill -9


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def encode(body):
    # Spaced JSON (json.dumps' default): the handler must publish these exact bytes, not
    # its own compact re-encoding of the parsed event.
    return json.dumps(body).encode("utf-8")


class Host:
    """One wabhook process (restartable) with its own inbox and handlers folder."""

    def __init__(self, name, folder):
        self.name = name
        self.db = os.path.join(folder, "wabhook.db")
        self.handlers = os.path.join(folder, "handlers")
        os.makedirs(self.handlers)
        shutil.copy(EXAMPLE, self.handlers)
        self.process = None
        self.port = None
        self.generation = 0          # bumped by every (re)start: posters wait for the next one
        self.changed = threading.Condition()
        self.acks = 0


class Poster(threading.Thread):
    """Posts its share of the messages in order over keep-alive; re-posts an unanswered one.

    A request the server died on has no answer, so the event may or may not be stored. Like a
    retrying sender, the poster posts it again once the host is back: either it is stored now,
    or wabhook answers `duplicate` with the id it was stored under. Every message ends up acked.
    """

    def __init__(self, test, host, chats):
        super().__init__(daemon=True)
        self.test, self.host, self.chats = test, host, chats
        self.connection = None
        self.generation = None
        self.error = None
        self.reposted = 0

    def run(self):
        try:
            for number in range(MESSAGES_PER_CHAT):
                for chat, bridge in self.chats:
                    self.test.post_until_acked(self, bridge, self.test.message(chat, bridge, number))
        except BaseException as exc:  # reported by the test's thread
            self.error = exc
        finally:
            if self.connection:
                self.connection.close()


class NatsForwardingTest(WabhookTestCase):
    def setUp(self):
        # Skipped here, not in setUpClass: a class-level skip is not counted in "Ran N tests",
        # and .ci/run subtracts the skipped from those.
        if not NATS_SERVER:
            self.skipTest("nats-server is not on PATH (apt-get install nats-server)")
        self.python, why_not = nats_python()  # the Python that runs wabhook and the stream reader
        if not self.python:
            self.skipTest(why_not)
        super().setUp()
        self.acked = {}            # (bridge, inbox id) -> the body bytes acked under that id
        self.acked_lock = threading.Lock()
        self.chat_order = {}       # (bridge, chat_id) -> message numbers in the order acked
        self.start_nats()

    # -- processes -----------------------------------------------------------

    def start_nats(self):
        """A real nats-server with JetStream on a free loopback port, accepting connections."""
        for _ in range(3):  # the free port may be taken in between: try another
            self.nats_port = free_port()
            self.nats_url = "nats://127.0.0.1:%d" % self.nats_port
            log = open(os.path.join(self.tmp, "nats-server.log"), "wb")
            process = subprocess.Popen([NATS_SERVER, "-js", "-a", "127.0.0.1", "-p", str(self.nats_port),
                                        "-sd", os.path.join(self.tmp, "jetstream")],
                                       stdout=log, stderr=subprocess.STDOUT)
            log.close()
            self.processes.append(process)

            def ready():
                if process.poll() is not None:
                    return "exited"
                try:
                    with socket.create_connection(("127.0.0.1", self.nats_port), timeout=1) as sock:
                        return sock.recv(4096).startswith(b"INFO ")
                except OSError:
                    return False

            if wait_until(ready, timeout=10, interval=0.05, message="nats-server to accept connections") is True:
                self.nats_server = process
                return
        with open(os.path.join(self.tmp, "nats-server.log"), encoding="utf-8", errors="replace") as log:
            raise AssertionError("nats-server did not start:\n" + log.read())

    def start_host(self, host):
        log_path = os.path.join(self.tmp, "%s-%d.log" % (host.name, host.generation))
        log = open(log_path, "wb")
        command = [self.python, SCRIPT, "serve", "--host", "127.0.0.1", "--port", "0", "--db", host.db,
                   "--handlers", host.handlers, "--retry-delay", "0.05", "--workers", "4"]
        env = dict(os.environ, NATS_URL=self.nats_url, NATS_STREAM=STREAM, NATS_SUBJECT_PREFIX="wabhook")
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=self.tmp, env=env)
        log.close()
        process.log_path = log_path
        self.processes.append(process)

        def listening():
            if process.poll() is not None:
                raise AssertionError("%s exited with %s:\n%s" % (host.name, process.returncode,
                                                                 self.process_log(process)))
            return re.search(r"listening on http://127\.0\.0\.1:(\d+)/hook", self.process_log(process))
        port = int(wait_until(listening, timeout=10, message="%s to listen" % host.name).group(1))
        with host.changed:
            host.process, host.port = process, port
            host.generation += 1
            host.changed.notify_all()

    # -- posting ---------------------------------------------------------------

    def message(self, chat, bridge, number):
        return {"event": "message", "message_id": "M-%03d-%04d" % (chat, number),
                "contact_id": "1555%07d@s.whatsapp.net" % chat, "phone": "1555%07d" % chat,
                "chat_id": "1555%07d@s.whatsapp.net" % chat, "name": "Chat %d" % chat,
                "body": "message %d of chat %d" % (number, chat), "type": "text", "media_type": "",
                "is_group": False, "from_me": False, "timestamp": 1777180605 + number, "n": number}

    def post_until_acked(self, poster, bridge, body):
        """POST one event to poster's host until a 200; record what was acked and in which order."""
        host, data = poster.host, encode(body)
        path = "/hook" if bridge is None else "/hook/" + bridge
        deadline = time.monotonic() + 15
        while True:
            with host.changed:
                if poster.generation != host.generation:
                    if poster.connection:
                        poster.connection.close()
                    poster.connection = http.client.HTTPConnection("127.0.0.1", host.port, timeout=10)
                    poster.generation = host.generation
                generation = poster.generation
            try:
                poster.connection.request("POST", path, body=data, headers={"Content-Type": "application/json"})
                response = poster.connection.getresponse()
                reply = response.read()
            except (OSError, http.client.HTTPException):
                # The host died under us: wait for its restart (a new generation), then repost.
                poster.reposted += 1
                with host.changed:
                    if not host.changed.wait_for(lambda: host.generation != generation,
                                                 timeout=max(0.0, deadline - time.monotonic())):
                        raise AssertionError("%s did not come back within 15 s" % host.name)
                continue
            if response.status != 200:
                raise AssertionError("%s answered %d: %r" % (host.name, response.status, reply))
            event_id = json.loads(reply.decode("utf-8"))["id"]
            with self.acked_lock:
                # A duplicate answer names the id the event was stored under: the same body.
                previous = self.acked.setdefault((bridge, event_id), data)
                self.assertEqual(previous, data)
                if "n" in body:
                    self.chat_order.setdefault((bridge, body["chat_id"]), []).append(body["n"])
                host.acks += 1
            return event_id

    # -- the stream ------------------------------------------------------------

    def read_stream(self):
        result = subprocess.run([self.python, "-c", DUMP_STREAM, self.nats_url, STREAM], capture_output=True,
                                text=True, timeout=30)
        self.assertEqual(result.returncode, 0, result.stderr)
        return [json.loads(line) for line in result.stdout.splitlines()]

    def undelivered(self, host):
        """Events of host's inbox not delivered yet; fails at once on a dead letter."""
        dead = self.query("SELECT event_id, last_error FROM deliveries WHERE status = 'dead' LIMIT 1",
                          db=host.db)
        if dead:
            raise AssertionError("%s dead-lettered event %d: %s" % (host.name, dead[0][0], dead[0][1]))
        return self.query("SELECT COUNT(*) FROM events WHERE status != 'done'", db=host.db)[0][0]

    # -- the test --------------------------------------------------------------

    def test_every_acked_event_reaches_the_stream_once_in_chat_order_across_a_kill_9(self):
        started = time.monotonic()
        east = Host("east", os.path.join(self.tmp, "east"))
        west = Host("west", os.path.join(self.tmp, "west"))  # the one killed
        hosts = {"east": east, "west": west}
        for host in hosts.values():
            self.start_host(host)

        # The 11 documented samples, on one bridge of each host (an east one on the bare path).
        for host, bridge in ((east, None), (west, "west-1")):
            poster = Poster(self, host, [])
            try:
                for sample in load_samples():
                    self.post_until_acked(poster, bridge, sample)
            finally:
                if poster.connection:
                    poster.connection.close()

        # The messages: each chat belongs to one bridge (so to one host) and one poster, which
        # posts the chats it has round-robin, each chat's messages in number order.
        bridges = [(name, bridge) for name, owned in sorted(HOST_BRIDGES.items()) for bridge in owned]
        shares = {}
        for chat in range(CHATS):
            name, bridge = bridges[chat % len(bridges)]
            shares.setdefault(name, []).append((chat, bridge))
        posters = [Poster(self, hosts[name], chats[index::POSTERS_PER_HOST])
                   for name, chats in sorted(shares.items()) for index in range(POSTERS_PER_HOST)]
        for poster in posters:
            poster.start()

        # kill -9 the west host mid-stream: while its posters are still sending, with a backlog
        # in its inbox and publishes in flight. nats-server is frozen for a moment first, so
        # the kill finds runs waiting for the stream's ack (their messages reach the stream
        # once it thaws: the reruns are duplicates) and runs claimed but not started.
        west_posters = [poster for poster in posters if poster.host is west]
        victim_acks = west.acks + KILL_AFTER_ACKS
        wait_until(lambda: west.acks >= victim_acks or not any(p.is_alive() for p in west_posters),
                   timeout=15, interval=0.005, message="acks from the west host")
        nats_server = self.nats_server
        nats_server.send_signal(signal.SIGSTOP)
        try:
            time.sleep(0.15)
            self.assertTrue(any(p.is_alive() for p in west_posters), "west's posters finished before the kill")
            west.process.send_signal(signal.SIGKILL)
            west.process.wait(timeout=10)
        finally:
            nats_server.send_signal(signal.SIGCONT)
        acked_at_kill = west.acks
        backlog_at_kill = self.undelivered(west)
        running_at_kill = self.query("SELECT COUNT(*) FROM deliveries WHERE status = 'running'", db=west.db)[0][0]
        time.sleep(0.1)  # posters find it gone; their unanswered requests wait for the restart
        self.start_host(west)

        for poster in posters:
            poster.join(timeout=30)
            self.assertFalse(poster.is_alive(), "a poster is stuck")
            if poster.error:
                raise poster.error
        posted_at = time.monotonic()

        # Every event delivered in both inboxes (the handler returns only on JetStream's ack).
        wait_until(lambda: all(self.undelivered(host) == 0 for host in hosts.values()), timeout=20,
                   interval=0.1, message="both inboxes to deliver everything to the stream")
        stored = sum(self.query("SELECT COUNT(*) FROM events", db=host.db)[0][0] for host in hosts.values())
        self.assertEqual(stored, len(self.acked), "an inbox holds an event that was never acked")

        def stream_complete():
            found = self.read_stream()
            return len(found) >= len(self.acked) and found
        messages = wait_until(stream_complete, timeout=10, interval=0.2,
                              message="the stream to hold every acked event")
        delivered_at = time.monotonic()

        # Exactly once, with the exact bytes posted, on the bridge's subject.
        seen = {}
        host_of = {bridge: name for name, owned in HOST_BRIDGES.items() for bridge in owned}
        token_bridge = {token: bridge for bridge, token in SUBJECT_TOKEN.items()}
        for message in messages:
            match = re.fullmatch(r"wabhook\.([^.]+)\.([^.]+)", message["subject"])
            self.assertIsNotNone(match, message["subject"])
            bridge = token_bridge[match.group(1)]
            key = (bridge, int(message["headers"]["Wabhook-Id"]))
            self.assertNotIn(key, seen, "%s (%s) is in the stream twice" % (key, host_of[bridge]))
            seen[key] = message
            self.assertIn(key, self.acked, "the stream holds an event never acked: %r" % (message,))
            self.assertEqual(message["data"].encode("utf-8"), self.acked[key])
            self.assertEqual(match.group(2), json.loads(message["data"])["event"])
        self.assertEqual(sorted(set(self.acked) - set(seen)), [], "acked events missing from the stream")
        self.assertEqual(len(messages), len(self.acked))
        ids = [message["headers"].get("Nats-Msg-Id") for message in messages]
        self.assertEqual(len(set(ids)), len(ids), "every event has its own Nats-Msg-Id")

        # Each chat's messages in the stream in the order they were acked.
        in_stream = {}
        for message in messages:
            body = json.loads(message["data"])
            if body["event"] == "message" and "n" in body:
                bridge = token_bridge[message["subject"].split(".")[1]]
                in_stream.setdefault((bridge, body["chat_id"]), []).append(body["n"])
        self.assertEqual(len(self.chat_order), CHATS)
        out_of_order = []
        for chat, numbers in sorted(in_stream.items(), key=str):
            acked = self.chat_order[chat]
            if numbers != acked:
                first = next((i for i, (a, b) in enumerate(zip(numbers, acked)) if a != b),
                             min(len(numbers), len(acked)))
                out_of_order.append("%s %s: acked ...%s, in the stream ...%s" % (
                    chat[0], chat[1], acked[max(0, first - 2):first + 4], numbers[max(0, first - 2):first + 4]))
        self.assertFalse(out_of_order, "%d chats reached the stream out of ack order:\n  %s"
                         % (len(out_of_order), "\n  ".join(out_of_order)))

        # What the kill cost: reruns in the west inbox, and the copies the stream dropped.
        wabhooks = [process for process in self.processes if hasattr(process, "log_path")]
        logs = "".join(self.process_log(process) for process in wabhooks)
        dropped = len(re.findall(r"all\.nats\.py \| event \d+ already in stream \S+ as seq \d+: duplicate",
                                 logs))
        reruns = self.query("SELECT COALESCE(SUM(attempts - 1), 0) FROM deliveries WHERE attempts > 1",
                            db=west.db)[0][0]
        for process in wabhooks:
            self.assertEqual(self.process_log(process).count("NATS: connected"), 1,
                             "one NATS connection per wabhook process, shared by its workers")
        taken_back = sum(int(n) for n in re.findall(r"took back (\d+) deliveries", logs))
        reposted = sum(poster.reposted for poster in posters)
        self.assertEqual(self.query("SELECT event_id, attempts, last_error FROM deliveries WHERE attempts > 1",
                                    db=east.db), [], "the east host, never killed, retried something")
        sys.stderr.write(
            "\n  nats: %d events checked in the stream (%d messages in %d chats). west killed after %d acks,"
            " with %d events undelivered and %d deliveries running: %d taken back, %d reruns, %d duplicates"
            " dropped by the stream, %d requests reposted. Posting took %.1fs, the stream was complete"
            " %.1fs later, %.1fs in all\n"
            % (len(messages), sum(map(len, in_stream.values())), len(in_stream), acked_at_kill, backlog_at_kill,
               running_at_kill, taken_back, reruns, dropped, reposted, posted_at - started,
               delivered_at - posted_at, time.monotonic() - started))


if __name__ == "__main__":
    unittest.main()
