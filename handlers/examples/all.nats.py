"""Forward every event into NATS JetStream: a wabhook handler (an example to copy).

Copy this file into your handlers folder (`cp handlers/examples/all.nats.py handlers/`) and
install the client for the Python that runs wabhook: `pip install nats-py`. wabhook itself
stays stdlib-only; only this handler needs the client.

Each event is published to `<prefix>.<bridge or "default">.<event type>` and this handler
returns only once JetStream acknowledged it, so wabhook records success only when the stream
has stored the event. Anything else (no server, no stream, a timeout) raises, and wabhook
retries with backoff, then dead-letters: `wabhook events --status dead`, `wabhook replay`.

At least once becomes exactly once in the stream: every publish carries `Nats-Msg-Id`, a
stable id of the event, and JetStream drops a message whose id it has seen within the
stream's duplicate window. A retry after a lost ack, or a rerun after `kill -9`, is stored
once.

Settings, from the environment of the wabhook process:

    NATS_URL             nats://127.0.0.1:4222 (comma-separated for a cluster; user:pass@ ok)
    NATS_CREDS           a .creds file (optional)
    NATS_STREAM          WABHOOK; created if missing, for `<prefix>.>`, with a 10 min
                         duplicate window (an existing stream is used as it is)
    NATS_SUBJECT_PREFIX  wabhook
    NATS_TIMEOUT         10 (seconds an event waits for the stream's ack, a reconnect
                         included; keep it under wabhook's --script-timeout)
"""

import asyncio
import concurrent.futures
import hashlib
import json
import logging
import os
import sys
import threading
import types

import nats
from nats.js.api import StreamConfig
from nats.js.errors import APIError, NoStreamResponseError, NotFoundError

from wabhook import identity_key

URL = os.environ.get("NATS_URL", "nats://127.0.0.1:4222")
CREDS = os.environ.get("NATS_CREDS") or None
STREAM = os.environ.get("NATS_STREAM", "WABHOOK")
PREFIX = os.environ.get("NATS_SUBJECT_PREFIX", "wabhook").strip(".")
TIMEOUT = float(os.environ.get("NATS_TIMEOUT", "10"))
DUPLICATE_WINDOW = 600.0  # seconds; only used when this handler creates the stream

# Connection news comes from the background thread, where print() is not the handler's
# output: log it under wabhook's logger instead, so it lands in wabhook's log.
log = logging.getLogger("wabhook.nats")

_SAFE = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-")


def subject_token(text):
    """One subject token: '.', '*', '>' and spaces would change the subject's meaning.

    Every other character is escaped as ~XX (its UTF-8 bytes), `~` included, so two
    different labels never share a subject: `shop.1` -> `shop~2E1`. (The bare /hook path
    is published as `default`, as is a bridge labelled so.)
    """
    out = []
    for char in text:
        if char in _SAFE:
            out.append(char)
        else:
            out.extend("~%02X" % byte for byte in char.encode("utf-8", "surrogatepass"))
    return "".join(out) or "_"


def subject_of(event):
    bridge = subject_token(event.bridge or "default")
    return "%s.%s.%s" % (PREFIX, bridge, subject_token(event.event))


def message_id(event):
    """The event's stable identity for JetStream's duplicate check (Nats-Msg-Id).

    Events with a natural identity use the same key wabhook deduplicates by, so the stream
    also drops the same message posted to two hosts (an active/standby pair). The others
    can only be told apart by their inbox row; received_at is part of it so that a new inbox
    file, whose ids start again at 1, is not mistaken for the old one within the window.
    Hashed: the key holds sender text of any length and character.
    """
    key = identity_key(event.raw, event.bridge)
    if key is None:
        key = "%s:%s:%r" % (event.bridge or "", event.id, event.received_at)
    return hashlib.sha256(key.encode("utf-8")).hexdigest()[:32]


def original_body(event, body):
    """The event's JSON as wabhook stored it (bytes), so consumers get what the bridge sent.

    wabhook passes it as `body` to a handle() that takes that parameter; without it (an
    older wabhook), event.raw re-encoded: the same JSON value, perhaps spaced differently.
    """
    if body is not None:
        return body.encode("utf-8")
    return json.dumps(event.raw, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


class Retired(Exception):
    """This forwarder was replaced by one for a newer version of the file: use that one."""


class Forwarder:
    """One NATS connection on an asyncio loop of its own, shared by every worker thread.

    wabhook calls handle() synchronously from a pool of threads; nats-py is asyncio. A
    connection per call would cost a TCP and NATS handshake per event, so the loop runs in a
    daemon thread and the workers hand it coroutines, waiting for each one's result.

    The connection is never dropped on a failed publish: nats-py reconnects by itself and
    keeps what was published meanwhile in its buffer, in order. A publish that timed out is
    usually still in that buffer; it reaches the stream before anything the chat's next
    events publish, and wabhook's retry of it is then a duplicate the stream drops. So a
    short outage costs retries, not the chat's order.
    """

    def __init__(self, version, loaded):
        self.version, self.loaded = version, loaded
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self._run, name="wabhook-nats", daemon=True)
        self.thread.start()
        self.nc = None
        self.js = None
        self._stream_ready = False
        self._connecting = None  # the asyncio task connecting, shared by every waiting publish
        self._last_error = None  # type of the last error logged (the same one is not repeated)
        self._lock = threading.Lock()
        self._inflight = 0
        self._retired = False

    def _run(self):
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def publish(self, subject, payload, headers):
        """The stream's PubAck, or an exception; called from wabhook's worker threads."""
        with self._lock:
            if self._retired:
                raise Retired()
            self._inflight += 1
        try:
            future = asyncio.run_coroutine_threadsafe(self._publish(subject, payload, headers),
                                                      self.loop)
            try:
                return future.result(TIMEOUT)
            except concurrent.futures.TimeoutError:
                # Not known to be stored: wabhook retries, and Nats-Msg-Id makes a late
                # success of this attempt and the retry one message.
                future.cancel()
                raise TimeoutError("no JetStream ack for %s within %gs"
                                   % (subject, TIMEOUT)) from None
        finally:
            with self._lock:
                self._inflight -= 1
                last = self._retired and self._inflight == 0
            if last:
                self._close()

    def retire(self):
        """Take no more publishes, and close once those under way are answered."""
        with self._lock:
            self._retired = True
            idle = self._inflight == 0
        if idle:
            self._close()

    def _close(self):
        async def shutdown():
            if self._connecting is not None:
                self._connecting.cancel()
            nc, self.nc, self.js = self.nc, None, None
            if nc is not None:
                try:
                    await asyncio.wait_for(nc.close(), 2)
                except Exception:
                    pass
            self.loop.stop()
        asyncio.run_coroutine_threadsafe(shutdown(), self.loop)

    async def _publish(self, subject, payload, headers):
        if self.nc is None or self.nc.is_closed or not self._stream_ready:
            # One connect for all: a publish that gives up waiting must not cancel it for
            # the others, hence the shield.
            if self._connecting is None or self._connecting.done():
                self._connecting = asyncio.ensure_future(self._connect())
            await asyncio.shield(self._connecting)
        try:
            # stream=: the ack must come from our stream, not another one that also
            # listens on the subject.
            return await self.js.publish(subject, payload, timeout=TIMEOUT, stream=STREAM,
                                         headers=headers)
        except (NoStreamResponseError, NotFoundError):
            self._stream_ready = False  # deleted meanwhile? made again before the next one
            raise

    async def _connect(self):
        if self.nc is None or self.nc.is_closed:
            # Tries every second until a server answers (max_reconnect_attempts=-1), also
            # at the first connect; after a drop nats-py reconnects by itself. Pings find a
            # dead peer within ~30 s.
            self.nc = await nats.connect(
                [url.strip() for url in URL.split(",") if url.strip()],
                user_credentials=CREDS, name="wabhook", connect_timeout=2,
                max_reconnect_attempts=-1, reconnect_time_wait=1, ping_interval=10,
                max_outstanding_pings=3, error_cb=self._on_error,
                disconnected_cb=self._on_disconnected, reconnected_cb=self._on_reconnected)
            self.js = self.nc.jetstream(timeout=TIMEOUT)
            self._last_error = None
            where = self.nc.connected_url.netloc if self.nc.connected_url else URL
            log.info("NATS: connected to %s, publishing to stream %s", where, STREAM)
        try:
            await self.js.stream_info(STREAM)
        except NotFoundError:
            try:
                await self.js.add_stream(StreamConfig(name=STREAM, subjects=[PREFIX + ".>"],
                                                      duplicate_window=DUPLICATE_WINDOW))
                log.info("NATS: created stream %s for %s.>", STREAM, PREFIX)
            except APIError:
                # Another host may have made it at the same moment: fine if it exists now.
                await self.js.stream_info(STREAM)
        self._stream_ready = True

    async def _on_error(self, exc):
        # While a server is down nats-py reports every attempt, one a second: once is enough.
        if type(exc) is not self._last_error:
            self._last_error = type(exc)
            log.warning("NATS: %s: %s", type(exc).__name__, exc)

    async def _on_disconnected(self):
        if self.nc is not None:  # None: we closed it ourselves
            log.warning("NATS: disconnected; reconnecting (events wait in wabhook meanwhile)")

    async def _on_reconnected(self):
        self._last_error = None
        log.info("NATS: reconnected")


# The connection is kept outside this module, in a registry that outlives it, because
# wabhook may run this file's code several times: once per worker that races to its first
# use (each worker may get its own copy of the module), and again whenever the file
# changes. Copies of the same source share one forwarder; the first event through a changed
# file makes a new one and retires the old one once its publishes under way are answered,
# so an edit neither leaks a connection nor fails an event. A copy older than the
# forwarder in use (a run that started before the edit) just uses it.
_registry = sys.modules.setdefault("_wabhook_nats_forwarders", types.ModuleType("_wabhook_nats"))
if not hasattr(_registry, "forwarders"):
    _registry.forwarders, _registry.lock, _registry.loads = {}, threading.Lock(), 0
with _registry.lock:
    _registry.loads += 1
    _LOADED = _registry.loads
with open(__file__, "rb") as _source:
    _VERSION = hashlib.sha256(_source.read()).hexdigest()


def forwarder():
    # Made on the first event, not at import: `wabhook check` loads handlers too, and
    # should neither connect nor leave a thread behind.
    with _registry.lock:
        current = _registry.forwarders.get(__file__)
        if current is not None and (current.version == _VERSION or current.loaded > _LOADED):
            return current
        _registry.forwarders[__file__] = mine = Forwarder(_VERSION, _LOADED)
    if current is not None:
        current.retire()
    return mine


def handle(event, body=None):
    subject, body = subject_of(event), original_body(event, body)
    headers = {"Nats-Msg-Id": message_id(event), "Wabhook-Id": str(event.id)}
    try:
        ack = forwarder().publish(subject, body, headers)
    except Retired:  # a newer version of this file took over between the two calls
        ack = forwarder().publish(subject, body, headers)
    if ack.duplicate:
        # A redelivery (after a kill, or a retry whose first ack was lost): the stream kept
        # the first copy. Logged so that an operator sees what at-least-once cost.
        print("event %s already in stream %s as seq %d: duplicate dropped"
              % (event.id, ack.stream, ack.seq))
