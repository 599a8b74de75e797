#!/usr/bin/env python3
"""wabhook: receive WhatsApp bridge webhooks and hand every event to your scripts.

One file, the Python standard library, nothing to install:

    python wabhook.py --port 3000

The path of one event, in the order of the sections below:

    socket  -> HTTP front (one thread, a selector, every connection): route,
               authenticate, read the body (length or chunked), parse it as a
               JSON object with an `event` string
            -> Inbox: the events of one turn of the front's loop are stored with
               their dedup keys in one SQLite transaction (one fsync); only after
               COMMIT do their senders get their 200s
            -> Dispatch: a worker claims the event (a lease, never a delete),
               fans it out to every handler in the handlers folder and records
               each handler's outcome; failures come back with backoff, then
               go to the dead letters
            -> Handlers: `<event>.py` with handle(event), any executable
               `<event>[.<label>][.ext]` that reads the event JSON on stdin, or
               `<event>[.<label>].forward` naming a URL the event is POSTed to.

The promises:

- A 200 means the event is committed to disk; it survives kill -9 right after.
- Every handler present when an event is dispatched gets it at least once;
  success is recorded per handler, so a retry re-runs only the ones that failed.
- Events of one chat (same bridge and chat) are handled one at a time, in
  arrival order; different chats run in parallel; a retry does not hold up
  its chat.
- The ack never waits for a handler: the backlog lives in SQLite.

Handlers import the event types from here: `from wabhook import MessageEvent`.
"""

import argparse
import base64
import binascii
import collections
import contextlib
import dataclasses
import difflib
import errno
import functools
import http
import importlib.util
import inspect
import ipaddress
import json
import logging
import os
import queue
import random
import re
import signal
import selectors
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import traceback
import types
import typing
import urllib.parse
from collections import namedtuple
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

# ---------------------------------------------------------------------------
# 1. Constants and Config
# ---------------------------------------------------------------------------

__version__ = "0.1.0"

ALL_EVENTS = "all"  # handler prefix that receives every event, unknown types included
# `<event>[.<label>].forward`: a handler that POSTs the event on (see ForwardHandler)
FORWARD_SUFFIX = ".forward"
# what a script is told of its event
SCRIPT_EVENT_VARIABLES = ("WABHOOK_EVENT", "WABHOOK_ID", "WABHOOK_BRIDGE")

BRIDGE_LABEL = re.compile(r"[A-Za-z0-9._:-]{1,128}")

Option = namedtuple("Option", "name default kind help")

# The one table of settings: argparse, the environment (WABHOOK_<NAME>) and the
# README reference are all built from, or checked against, these rows.
OPTIONS = (
    Option("host", "0.0.0.0", "str", "address to listen on"),
    Option("port", 3000, "port", "TCP port to listen on (0 picks a free one)"),
    Option("path", "/hook", "urlpath", "URL path that receives events; <path>/<bridge> too"),
    Option("db", "./wabhook.db", "str", "SQLite file holding the inbox, dedup keys and "
                                        "delivery state"),
    Option("handlers", "./handlers", "str", "folder of handler files"),
    Option("workers", 8, "count", "handler runs at the same time"),
    Option("retries", 5, "count", "attempts per handler before an event is dead-lettered"),
    Option("retry_delay", "5s", "duration", "delay before the first retry; doubles each attempt "
                                            "(with jitter)"),
    Option("script_timeout", "60s", "duration", "a handler run longer than this fails "
                                                "(scripts are killed)"),
    Option("script_env", None, "names", "more environment variables passed on to scripts "
                                        "(comma-separated"
           " names); scripts always get PATH, HOME, LANG, TZ and the WABHOOK_ event "
           "variables, nothing else"),
    Option("shutdown_timeout", "10s", "duration", "on SIGTERM, how long running "
                                                  "handlers may finish"),
    Option("timeout", "30s", "duration", "idle or slow HTTP connections are closed after this"),
    Option("max_connections", 1000, "count", "open HTTP connections at most; at the "
                                             "limit the idlest"
           " keep-alive one is closed to make room, else the slowest request (over 0.25 s), else a "
           "new one is refused"),
    Option("max_body", "1MiB", "size", "largest accepted request body"),
    Option("max_inflight", "64MiB", "size", "request body bytes held in memory at once, over "
                                            "all connections;"
           " past it, bodies still arriving wait (their connections are not read) until "
           "others are done"),
    Option("retention", "7d", "duration", "how long dedup keys and delivered events are kept"),
    Option("dedup_window", "0", "duration", "drop byte-identical events without identity within "
                                            "this window (0: off; at most --retention)"),
    Option("token", None, "secret", "shared secret every POST must present (?token=, Bearer, "
                                    "Basic password)"),
    Option("secret", None, "secret", "Standard Webhooks signing secret (whsec_...) to "
                                     "verify signatures"),
    Option("tls_cert", None, "str", "certificate file (PEM) to serve HTTPS directly"),
    Option("tls_key", None, "str", "private key file (PEM) for --tls-cert"),
    Option("log_format", "text", ("text", "json"), "log lines as readable text or one JSON "
                                                   "object per line"),
    Option("log_level", "info", ("debug", "info", "warning", "error"), "least severe "
                                                                       "log level shown"),
    Option("access_log", False, "bool", "log one line per HTTP request"),
    Option("no_ui", False, "bool", "do not serve the inbox page (/) and its JSON API (/api/); "
                                   "without --token they"
           " are served only on a loopback --host"),
)

DURATION_UNITS = {"": 1.0, "ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
SIZE_UNITS = {"": 1, "b": 1, "k": 1024, "kb": 1024, "kib": 1024, "m": 1024 ** 2,
              "mb": 1024 ** 2, "mib": 1024 ** 2, "g": 1024 ** 3, "gb": 1024 ** 3, "gib": 1024 ** 3}


class ConfigError(Exception):
    """A setting has a value wabhook cannot use; the message says what is allowed."""


def env_name(option_name: str) -> str:
    """The environment variable that sets an option: retry_delay -> WABHOOK_RETRY_DELAY."""
    return "WABHOOK_" + option_name.upper()


def flag_name(option_name: str) -> str:
    """The command-line flag of a setting: db_path -> --db-path."""
    return "--" + option_name.replace("_", "-")


def parse_duration(text) -> float:
    """Seconds from '30', '30s', '500ms', '5m', '2h' or '7d'."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        seconds = float(text)
    else:
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*", str(text).lower())
        if not match:
            raise ValueError("expected a duration such as 30, 30s, 500ms, 5m, 2h or 7d")
        seconds = float(match.group(1)) * DURATION_UNITS[match.group(2) or ""]
    return seconds


def parse_size(text) -> int:
    """Bytes from '1048576', '512k', '1MiB' or '2M'."""
    if isinstance(text, int) and not isinstance(text, bool):
        return text
    match = re.fullmatch(r"\s*(\d+)\s*([a-z]*)\s*", str(text).lower())
    if not match or match.group(2) not in SIZE_UNITS:
        raise ValueError("expected a size such as 1048576, 512KiB or 1MiB")
    return int(match.group(1)) * SIZE_UNITS[match.group(2)]


def _whole_number(value, expected: str) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if not re.fullmatch(r"\s*[0-9]{1,9}\s*", str(value)):
        raise ValueError(expected)
    return int(value)


def unknown_settings(environ: Dict[str, str]) -> List[str]:
    """A warning for each WABHOOK_* variable that is no setting (a typo would otherwise be ignored
    silently)."""
    known = {env_name(option.name) for option in OPTIONS} | set(SCRIPT_EVENT_VARIABLES)
    warnings = []
    for name in sorted(environ):
        if name.startswith("WABHOOK_") and name not in known:
            close = difflib.get_close_matches(name, sorted(known), n=1)
            warnings.append("%s is not a wabhook setting and is ignored%s" % (
                name, "; did you mean %s?" % close[0] if close else " (see --help for the "
                                                                    "WABHOOK_ variables)"))
    return warnings


def _convert_option(option: Option, value):
    kind = option.kind
    if isinstance(kind, tuple):
        value = str(value).lower()
        if value not in kind:
            raise ValueError("expected one of " + ", ".join(kind))
        return value
    if kind == "bool":
        if isinstance(value, bool):
            return value
        lowered = str(value).strip().lower()
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("0", "false", "no", "off", ""):
            return False
        raise ValueError("expected true or false")
    if kind == "duration":
        return parse_duration(value)
    if kind == "size":
        size = parse_size(value)
        if size < 1:
            raise ValueError("expected at least 1 byte")
        return size
    if kind == "port":
        port = _whole_number(value, "expected a port from 0 to 65535")
        if not 0 <= port <= 65535:
            raise ValueError("expected a port from 0 to 65535")
        return port
    if kind == "count":
        count = _whole_number(value, "expected a whole number of at least 1")
        if count < 1:
            raise ValueError("expected a whole number of at least 1")
        return count
    if kind == "names":
        if value is None:
            return ()
        names = tuple(name for name in re.split(r"[,\s]+", str(value)) if name)
        for name in names:
            if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
                raise ValueError("expected environment variable names separated by commas, such as "
                                 "NATS_URL,LANG")
        return names
    if kind == "urlpath":
        path = str(value).rstrip("/") or "/"
        if not path.startswith("/") or not re.fullmatch(r"/[A-Za-z0-9._~/-]*", path):
            raise ValueError("expected a URL path such as /hook")
        return path
    if value is None:
        return None
    return str(value) or None if kind == "secret" else str(value)


OPTION_BY_NAME = {option.name: option for option in OPTIONS}


def _default(name: str):
    """An option's default as Config holds it: its OPTIONS row's, converted as a flag's value is."""
    return _convert_option(OPTION_BY_NAME[name], OPTION_BY_NAME[name].default)


@dataclass(frozen=True)
class Config:
    """Every setting of one run, after flags, environment and defaults (written once: in
    OPTIONS)."""

    host: str = _default("host")
    port: int = _default("port")
    path: str = _default("path")
    db: str = _default("db")
    handlers: str = _default("handlers")
    workers: int = _default("workers")
    retries: int = _default("retries")
    retry_delay: float = _default("retry_delay")
    script_timeout: float = _default("script_timeout")
    script_env: Tuple[str, ...] = _default("script_env")
    shutdown_timeout: float = _default("shutdown_timeout")
    timeout: float = _default("timeout")
    max_connections: int = _default("max_connections")
    max_body: int = _default("max_body")
    max_inflight: int = _default("max_inflight")
    retention: float = _default("retention")
    dedup_window: float = _default("dedup_window")
    token: Optional[str] = _default("token")
    secret: Optional[str] = _default("secret")
    tls_cert: Optional[str] = _default("tls_cert")
    tls_key: Optional[str] = _default("tls_key")
    log_format: str = _default("log_format")
    log_level: str = _default("log_level")
    access_log: bool = _default("access_log")
    no_ui: bool = _default("no_ui")


def build_config(flags: Dict[str, object], environ: Dict[str, str]) -> Config:
    """The run's Config: a flag wins over WABHOOK_<NAME>, which wins over the default."""
    values = {}
    for option in OPTIONS:
        raw, source = option.default, "default"
        if environ.get(env_name(option.name), "") != "":
            raw, source = environ[env_name(option.name)], env_name(option.name)
        if flags.get(option.name) is not None:
            raw, source = flags[option.name], flag_name(option.name)
        try:
            values[option.name] = _convert_option(option, raw)
        except (TypeError, ValueError) as exc:
            raise ConfigError("%s=%r: %s" % (source, raw, exc)) from None
    config = Config(**values)
    validate_config(config)
    return config


def validate_config(config: Config) -> None:
    """Raise ConfigError, saying what is allowed, if the settings do not go together."""
    if bool(config.tls_cert) != bool(config.tls_key):
        raise ConfigError("--tls-cert and --tls-key go together: give both or neither")
    if config.db in ("", ":memory:") or config.db.startswith("file::memory:"):
        raise ConfigError("--db must be a file: the inbox must outlive the process")
    if config.path in ("/healthz", "/metrics"):
        raise ConfigError("--path %s collides with an operator endpoint" % config.path)
    if not config.no_ui and (config.path in PAGE_FILES or config.path.split("/")[1] == "api"):
        raise ConfigError("--path %s collides with the inbox page (/, /api/): pick another path, "
                          "or pass --no-ui"
                          % config.path)
    if config.retry_delay <= 0 or config.script_timeout <= 0 or config.timeout <= 0:
        raise ConfigError("--retry-delay, --script-timeout and --timeout must be above 0")
    if config.dedup_window > config.retention:
        raise ConfigError("--dedup-window cannot be longer than --retention: a dedup key is kept"
                          " in its event's row, and a delivered event goes at --retention")


# ---------------------------------------------------------------------------
# 2. Events
# ---------------------------------------------------------------------------


@dataclass
class Event:
    """What every handler receives.

    `event` is the type name, `bridge` the URL label the sender posted to (None
    on the bare path), `id` the inbox id, `received_at` the Unix time it was
    stored, and `raw` the original JSON object, so a field the sender adds
    later is never lost.
    """

    event: str = ""
    bridge: Optional[str] = None
    id: Optional[int] = None
    received_at: float = 0.0
    raw: dict = field(default_factory=dict, repr=False)


@dataclass
class MessageEvent(Event):
    """A chat message. `body` is the text; `from_me` is True for your own messages."""

    message_id: str = ""
    contact_id: str = ""
    phone: str = ""
    chat_id: str = ""
    name: str = ""
    body: str = ""
    type: str = ""
    media_type: str = ""
    is_group: bool = False
    from_me: bool = False
    timestamp: int = 0


@dataclass
class ConnectedEvent(Event):
    """The bridge connected to WhatsApp as `phone`."""

    phone: str = ""


@dataclass
class DisconnectedEvent(Event):
    """The bridge lost its WhatsApp session."""


@dataclass
class TypingEvent(Event):
    """A contact is typing: `state` is composing or paused, `mode` text or voice."""

    contact_id: str = ""
    chat_id: str = ""
    state: str = ""
    mode: str = ""


@dataclass
class PollVoteEvent(Event):
    """A vote on a poll; `selected_options` lists the chosen option texts."""

    contact_id: str = ""
    phone: str = ""
    chat_id: str = ""
    poll_id: str = ""
    message_id: str = ""
    name: str = ""
    from_me: bool = False
    timestamp: int = 0
    selected_options: list = field(default_factory=list)


@dataclass
class EventResponseEvent(Event):
    """An answer to a WhatsApp event invitation: `response` is going, not_going or maybe."""

    contact_id: str = ""
    phone: str = ""
    chat_id: str = ""
    event_id: str = ""
    message_id: str = ""
    name: str = ""
    from_me: bool = False
    timestamp: int = 0
    response: str = ""
    extra_guest_count: int = 0


@dataclass
class CallIncomingEvent(Event):
    """A call is ringing."""

    call_id: str = ""
    contact_id: str = ""
    platform: str = ""
    timestamp: int = 0


@dataclass
class CallTerminatedEvent(Event):
    """A call ended: `reason` is timeout, hangup, decline or busy."""

    call_id: str = ""
    contact_id: str = ""
    reason: str = ""
    timestamp: int = 0


@dataclass
class OfflineSyncPreviewEvent(Event):
    """After reconnecting, how much the bridge is about to sync."""

    total: int = 0
    messages: int = 0
    notifications: int = 0
    receipts: int = 0
    app_data_changes: int = 0


@dataclass
class OfflineSyncCompletedEvent(Event):
    """The offline sync finished; `count` items were synced."""

    count: int = 0


@dataclass
class ProfilePictureUpdatedEvent(Event):
    """A profile picture changed (`remove` is True when it was removed)."""

    remove: bool = False
    picture_id: str = ""
    timestamp: int = 0


@dataclass
class UnknownEvent(Event):
    """An event type this version does not know; read its fields from `raw`."""


# The one table of event types: the sender's type name -> the class a handler gets.
EVENT_CLASSES = {
    "message": MessageEvent,
    "connected": ConnectedEvent,
    "disconnected": DisconnectedEvent,
    "typing": TypingEvent,
    "poll_vote": PollVoteEvent,
    "event_response": EventResponseEvent,
    "call_incoming": CallIncomingEvent,
    "call_terminated": CallTerminatedEvent,
    "offline_sync_preview": OfflineSyncPreviewEvent,
    "offline_sync_completed": OfflineSyncCompletedEvent,
    "profile_picture_updated": ProfilePictureUpdatedEvent,
}
EVENT_TYPES = tuple(EVENT_CLASSES)  # the 11 the sender documents, in its order
KNOWN_PREFIXES = EVENT_TYPES + (ALL_EVENTS,)  # what a handler's name may start with
BASE_FIELDS = tuple(f.name for f in dataclasses.fields(Event))
EMPTY_VALUES = {str: "", int: 0, bool: False, list: ()}

# The sender's documented sample of each event, used by `send` and the tests.
SAMPLES = {
    "message": {"event": "message", "message_id": "ACE41E...",
                "contact_id": "15550001234@s.whatsapp.net",
                "phone": "15550001234", "chat_id": "15550001234@s.whatsapp.net", "name": "Alice",
                "body": "Hello!", "type": "text", "media_type": "", "is_group": False,
                "from_me": False,
                "timestamp": 1777180605},
    "connected": {"event": "connected", "phone": "15550001234"},
    "disconnected": {"event": "disconnected"},
    "typing": {"event": "typing", "contact_id": "15550001234@s.whatsapp.net",
               "chat_id": "15550001234@s.whatsapp.net", "state": "composing", "mode": "text"},
    "poll_vote": {"event": "poll_vote", "contact_id": "15550001234@s.whatsapp.net",
                  "phone": "15550001234",
                  "chat_id": "15550001234@s.whatsapp.net", "poll_id": "ACPOLL0001",
                  "message_id": "ACVOTE0001",
                  "name": "Alice", "from_me": False, "timestamp": 1777330500,
                  "selected_options": ["Red"]},
    "event_response": {"event": "event_response", "contact_id": "15550001234@s.whatsapp.net",
                       "phone": "15550001234", "chat_id": "15550009999@g.us",
                       "event_id": "ACEVENT0001",
                       "message_id": "ACEVRESP0001", "name": "Alice", "from_me": False,
                       "timestamp": 1777330700, "response": "going", "extra_guest_count": 0},
    "call_incoming": {"event": "call_incoming", "call_id": "ABCDEF123456",
                      "contact_id": "15550001234@s.whatsapp.net", "platform": "android",
                      "timestamp": 1777180605},
    "call_terminated": {"event": "call_terminated", "call_id": "ABCDEF123456",
                        "contact_id": "15550001234@s.whatsapp.net", "reason": "hangup",
                        "timestamp": 1777180720},
    "offline_sync_preview": {"event": "offline_sync_preview", "total": 142, "messages": 120,
                             "notifications": 8, "receipts": 14, "app_data_changes": 0},
    "offline_sync_completed": {"event": "offline_sync_completed", "count": 142},
    "profile_picture_updated": {"event": "profile_picture_updated", "remove": False,
                                "picture_id": "12345678901", "timestamp": 1777180605},
}


def coerce_field(value, field_type):
    """`value` as `field_type` when the conversion is unambiguous, else `value` unchanged.

    None becomes the field_type's empty value; "123" becomes 123 for an int field;
    "true"/"false" and 0/1 become booleans; numbers become strings for a str
    field (ids sometimes arrive as numbers). Anything else is kept raw.
    """
    if value is None:
        return list(EMPTY_VALUES[field_type]) if field_type is list else EMPTY_VALUES[field_type]
    if field_type is str:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        return value
    if field_type is bool:
        if isinstance(value, str) and value.strip().lower() in ("true", "false"):
            return value.strip().lower() == "true"
        if isinstance(value, int) and not isinstance(value, bool) and value in (0, 1):
            return bool(value)
        return value
    if field_type is int:
        if isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str) and re.fullmatch(r"\s*-?\d{1,30}\s*", value):
            return int(value)
        return value
    return value


def event_class(event_type: str):
    """The dataclass for an event type; UnknownEvent for types this version does not know."""
    return EVENT_CLASSES.get(event_type, UnknownEvent)


def parse_event(raw: dict, bridge: Optional[str] = None, event_id: Optional[int] = None,
                received_at: float = 0.0) -> Event:
    """The typed event for a JSON object. Lenient: never raises for a dict with an `event`."""
    cls = event_class(raw.get("event", ""))
    values = {name: coerce_field(raw.get(name), field_type)
              for name, field_type in _payload_fields(cls)}
    return cls(event=raw.get("event", ""), bridge=bridge, id=event_id, received_at=received_at,
               raw=raw, **values)


@functools.lru_cache(maxsize=None)
def _payload_fields(cls) -> Tuple[Tuple[str, type], ...]:
    """(name, type) of the fields an event class adds to Event (looked up once per class)."""
    return tuple((f.name, f.type) for f in dataclasses.fields(cls) if f.name not in BASE_FIELDS)


# json.dumps(value, separators=(",", ":")), without building an encoder each call: the
# identity and the lane of every event received are made with it.
_compact_json = json.JSONEncoder(separators=(",", ":")).encode


def _text(value) -> str:
    """A scalar as text for an identity or a lane; anything else (an object, a list) counts as
    absent."""
    if isinstance(value, (str, int, float)):  # bool is an int
        return str(value)
    return ""


def identity_key(raw: dict, bridge: Optional[str]) -> Optional[str]:
    """The natural identity an event is deduplicated by, or None if it has none.

    message, poll_vote, event_response: (bridge, event, chat_id, message_id);
    call_incoming, call_terminated: (bridge, event, call_id);
    profile_picture_updated: (bridge, event, picture_id, remove, timestamp).
    An event missing the id part of its identity has none: two such events
    cannot be told apart, so neither is dropped.
    """
    event_type = raw.get("event")
    if event_type in ("message", "poll_vote", "event_response"):
        parts = [_text(raw.get("chat_id")), _text(raw.get("message_id"))]
        required = parts[1]
    elif event_type in ("call_incoming", "call_terminated"):
        parts = [_text(raw.get("call_id"))]
        required = parts[0]
    elif event_type == "profile_picture_updated":
        remove = raw.get("remove")
        parts = [_text(raw.get("picture_id")), json.dumps(remove if isinstance(remove, (bool, int,
                                                                                        float, str))
                                                            else None), _text(raw.get("timestamp"))]
        required = parts[2]
    else:
        return None
    if not required:
        return None
    return _compact_json([bridge or "", event_type] + parts)


def lane_of(raw: dict, bridge: Optional[str]) -> str:
    """The ordering lane: events in one lane run one at a time, in arrival order.

    A lane is a chat of a bridge (`chat_id`; for calls, which carry no chat_id,
    the caller's `contact_id`, which is the chat id of that person's chat).
    Events with neither (connected, disconnected, offline sync, profile
    picture) share their bridge's own lane, so their order is kept too.
    """
    chat = raw.get("chat_id") or raw.get("contact_id") or ""
    if not isinstance(chat, (str, int, float)):
        # an object or list is no chat id (and could nest deeper than json.dumps recurses)
        chat = ""
    return _compact_json([bridge or "", chat])  # ASCII whatever the input


# ---------------------------------------------------------------------------
# 3. Inbox
# ---------------------------------------------------------------------------

# What `events --status` and /api/events?status= take: an event's status, or `skipped`
# (the events with a delivery whose handler file was gone when it ran).
EVENT_STATUSES = ("pending", "done", "dead", "discarded", "skipped")

# 2: deliveries keep their last run's start, exit status and output
# 3: deliveries are indexed only while they wait or run (DDL_INDEXES)
# 4: an event's dedup key is a column of its row, not a row of a `dedup` table (_move_dedup_keys)
SCHEMA_VERSION = 4

DDL_EVENTS = """
CREATE TABLE IF NOT EXISTS events (
    id          INTEGER PRIMARY KEY,
    received_at REAL NOT NULL,
    bridge      TEXT,
    event       TEXT NOT NULL,
    lane        TEXT NOT NULL,
    body        TEXT NOT NULL,              -- the JSON exactly as received
    status      TEXT NOT NULL DEFAULT 'pending',  -- pending | done | dead | discarded
    dispatched  INTEGER NOT NULL DEFAULT 0, -- 1 once its deliveries exist
    dedup_key   TEXT,                       -- its identity (identity_key) or body digest, if any
    dedup_until REAL                        -- a later event with that key is a duplicate until then
)"""
DDL_DELIVERIES = """
CREATE TABLE IF NOT EXISTS deliveries (
    event_id        INTEGER NOT NULL,
    handler         TEXT NOT NULL,          -- the handler's file name
    lane            TEXT NOT NULL,
    status          TEXT NOT NULL,          -- pending | running | done | dead | skipped | discarded
    attempts        INTEGER NOT NULL DEFAULT 0,
    next_attempt_at REAL NOT NULL DEFAULT 0,
    lease_owner     TEXT,
    lease_until     REAL,
    last_error      TEXT,
    updated_at      REAL,                   -- when the last run started (running) or ended
    started_at      REAL,                   -- when the last run started
    exit_status     INTEGER,                -- the last run's, for executable handlers
    output          TEXT,                   -- what the last run printed (at most OUTPUT_KEPT bytes)
    PRIMARY KEY (event_id, handler)
)"""
# Columns added since schema 1, added to an older file when it is opened.
ADDED_COLUMNS = (("deliveries", "started_at", "REAL"), ("deliveries", "exit_status", "INTEGER"),
                 ("deliveries", "output", "TEXT"), ("events", "dedup_key", "TEXT"),
                 ("events", "dedup_until", "REAL"))
# A delivery is in the indexes while it waits or runs, not once it has ended: the end of a
# run takes its row out of them instead of moving it to the `done` part of each, and they
# stay the size of the backlog. SQLite uses a partial index for a query that names the same
# status as a literal, as every query here does.
DDL_INDEXES = (
    "CREATE INDEX IF NOT EXISTS events_by_status ON events(status, id)",
    "CREATE INDEX IF NOT EXISTS events_undispatched ON events(id) WHERE dispatched = 0",
    # The dedup keys: one index entry an event that has one, written in the ack's own commit.
    "CREATE INDEX IF NOT EXISTS events_by_dedup_key ON events(dedup_key)"
    " WHERE dedup_key IS NOT NULL",
    "CREATE INDEX IF NOT EXISTS deliveries_due ON deliveries(status, next_attempt_at)"
    " WHERE status = 'pending'",
    # For the three ways to find the lanes' heads (see HEAD_SCAN_ROWS).
    "CREATE INDEX IF NOT EXISTS deliveries_lane_heads ON deliveries(status, lane, event_id)"
    " WHERE status = 'pending'",
    "CREATE INDEX IF NOT EXISTS deliveries_in_order ON deliveries(status, event_id)"
    " WHERE status = 'pending'",
    "CREATE INDEX IF NOT EXISTS deliveries_running ON deliveries(status, lane)"
    " WHERE status = 'running'",
    "CREATE INDEX IF NOT EXISTS deliveries_skipped ON deliveries(event_id)"
    " WHERE status = 'skipped'",
)
# Indexes of an older schema that DDL_INDEXES defines anew: (dropped before schema, name).
REPLACED_INDEXES = ((3, "deliveries_due"), (3, "deliveries_lane_heads"), (3, "deliveries_in_order"))

# Claiming asks for the oldest due delivery of each lane that has nothing
# running, oldest first (a lane's head). Three ways give that same answer;
# Inbox._claimable_heads() takes the cheapest for the backlog at hand:
# - scan the oldest pending deliveries (HEAD_SCAN_ROWS at most): enough when
#   the backlog's front holds `limit` idle lanes, as it does across many chats;
# - DUE_LANE_HEADS groups the due deliveries: cheap when most of the backlog
#   waits for a retry (a broken handler);
# - WALKED_LANE_HEADS walks the distinct lanes, one index seek each: cheap
#   when a few chats hold a deep backlog whose front lanes are running.
HEAD_SCAN_ROWS = 256
# Queries on deliveries by status, each served by a partial index (tests check their plans).
RUNNING_LANES = "SELECT DISTINCT lane FROM deliveries WHERE status = 'running'"
OLDEST_PENDING = ("SELECT lane, event_id, next_attempt_at, handler FROM deliveries"
                  " WHERE status = 'pending' ORDER BY event_id LIMIT ?")
SKIPPED_EVENTS = "id IN (SELECT event_id FROM deliveries WHERE status = 'skipped')"
# A delivery of an order-holding handler (see holds_chat) is not due while an earlier event of its
# chat waits for that same handler. Appended to the claim's "due" condition on `deliveries`.
NOT_HELD = """ AND NOT (handler GLOB '*%s' AND EXISTS (
    SELECT 1 FROM deliveries AS earlier WHERE earlier.status = 'pending'
    AND earlier.lane = deliveries.lane
    AND earlier.event_id < deliveries.event_id
    AND earlier.handler = deliveries.handler))""" % FORWARD_SUFFIX
DUE_LANE_HEADS = """
SELECT lane, MIN(event_id) FROM deliveries
WHERE status = 'pending' AND next_attempt_at <= :now""" + NOT_HELD + """
  AND lane NOT IN (SELECT lane FROM deliveries WHERE status = 'running')
GROUP BY lane ORDER BY 2 LIMIT :limit"""
WALKED_LANE_HEADS = """
WITH RECURSIVE lanes(lane) AS (
    SELECT (SELECT MIN(lane) FROM deliveries WHERE status = 'pending')
    UNION ALL
    SELECT (SELECT MIN(lane) FROM deliveries WHERE status = 'pending' AND lane > lanes.lane)
    FROM lanes WHERE lanes.lane IS NOT NULL
),
heads(lane, event_id) AS (
    SELECT lane, (SELECT event_id FROM deliveries
                  WHERE status = 'pending' AND lane = lanes.lane
                    AND next_attempt_at <= :now""" + NOT_HELD + """
                  ORDER BY event_id LIMIT 1)
    FROM lanes WHERE lane IS NOT NULL
)
SELECT lane, event_id FROM heads
WHERE event_id IS NOT NULL
  AND lane NOT IN (SELECT lane FROM deliveries WHERE status = 'running')
ORDER BY event_id LIMIT :limit"""

# How long a claimed delivery stays ours without renewal; the dispatcher renews
# every third of it, so only a dead process loses its leases.
LEASE_SECONDS = 30.0
# /healthz stays 503 this long after an event could not be stored (and none since):
# long enough for a monitor polling every 30 s to see a full disk.
FAILED_COMMIT_MEMORY = 60.0
FANOUT_BATCH = 500
# How long a write waits for another process's write lock (a CLI command, a second server)
# before it fails: an event then gets 503, a handler's outcome is kept and recorded later.
BUSY_TIMEOUT_SECONDS = 2.0
# how often the writer makes sure the inbox file is still the one it opened
FILE_CHECK_SECONDS = 0.5
# How often the checkpointer copies committed pages into the inbox file, and how many WAL frames
# (pages) it lets the WAL hold before starting it over: SQLite's own default (4 MB at 4 KB pages).
CHECKPOINT_SECONDS = 0.01
CHECKPOINT_FRAMES = 1000
# how stale the HTTP front's view of the handlers folder's existence may be
FOLDER_CHECK_SECONDS = 0.25
SQL_ROWS = 100  # rows per multi-row statement: 8 values at most each, under SQLite's 999


def _chunks(items: list, size: int) -> List[list]:
    return [items[start:start + size] for start in range(0, len(items), size)]


def _insert_rows(db, insert: str, placeholders: str, rows: List[tuple]) -> List[Tuple[int, int]]:
    """INSERT many rows with one statement per SQL_ROWS of them; (rows, last rowid) of each."""
    return _with_rows(db, insert + " %s", placeholders, rows)


def _with_rows(db, sql: str, placeholders: str, rows: List[tuple]) -> List[Tuple[int, int]]:
    """Run `sql` once per SQL_ROWS rows, its %s the VALUES list of them (executemany steps once
    a row, each step a round trip through the GIL); (rows, last rowid) of each statement."""
    done = []
    for part in _chunks(rows, SQL_ROWS):
        cursor = db.execute(sql % ",".join([placeholders] * len(part)),
                            [value for row in part for value in row])
        done.append((len(part), cursor.lastrowid))
    return done


class _FileLost(Exception):
    """The inbox file is no longer the one this process opened."""


def _file_identity(path: str) -> Tuple[int, int]:
    status = os.stat(path)
    return status.st_dev, status.st_ino


class InboxUnavailable(Exception):
    """The inbox cannot commit (disk full, locked by another process, unreadable file)."""


@dataclass
class Claim:
    """An event leased to this process, with the handlers due to run it."""

    event_id: int
    event_type: str
    bridge: Optional[str]
    body: str
    received_at: float
    handlers: List[str]
    attempts: Dict[str, int]  # handler -> this run's attempt number (1 = first)
    claimed_at: float         # time.monotonic() in the transaction that claimed it


class _Write:
    """One unit of work for the inbox's writer, and its result: a function of the connection, an
    event to store or a run's outcome to record (the last two are written a batch at a time).

    Its thread waits on `wakeup` (a lock held until then), released once the
    work is committed; or `on_done` is called then, for a caller that may not wait.
    """

    __slots__ = ("apply", "event", "outcome", "done", "result", "error", "wakeup", "on_done")

    def __init__(self, apply: Optional[Callable[[sqlite3.Connection], object]] = None,
                 event: Optional[tuple] = None,
                 on_done: Optional[Callable[[object, Optional[Exception]], None]] = None,
                 outcome: Optional[tuple] = None):
        # `event`: the columns of an event to store (see _insert_events);
        # `outcome`: how a run ended (see _record_outcomes)
        self.apply, self.event, self.outcome = apply, event, outcome
        self.done, self.result, self.error = False, None, None
        self.on_done = on_done  # called in the writer's thread; else a thread waits on `wakeup`
        self.wakeup = None
        if on_done is None:
            self.wakeup = threading.Lock()
            self.wakeup.acquire()

    def finish(self) -> None:
        """Report the outcome: call on_done, or wake the thread waiting for it."""
        if self.on_done is not None:
            self.on_done(self.result, self.error)
        else:
            self.wakeup.release()


def _events_and_rest(works: List[_Write]) -> Tuple[List[_Write], List[_Write]]:
    """The events to store, and the rest (delivery bookkeeping), each in its queued order."""
    return ([work for work in works if work.event is not None],
            [work for work in works if work.event is None])


class Inbox:
    """The SQLite file: events, dedup keys and per-handler delivery state.

    Every write of this process goes through _write() to one writer thread:
    one connection, explicit BEGIN IMMEDIATE transactions, and group commit.
    The writer takes everything queued (events to store, outcomes to record,
    claims): the events in one transaction with fsync, then the rest in one
    without, and wakes exactly the threads whose work that was (or calls
    back the HTTP front). A burst of acks costs one fsync, and waits for
    none of the delivery bookkeeping queued with it.
    Reads (counts, listings) use a second connection: in WAL mode they never
    wait for a write, and a slow count never holds up an ack. A third, the
    checkpointer's, copies committed pages from the WAL into the file (see
    _checkpoint_continually), so that no commit, and no ack, waits for it.
    """

    def __init__(self, path: str, busy_timeout: Optional[float] = None):
        self.path = path
        busy_timeout = BUSY_TIMEOUT_SECONDS if busy_timeout is None else busy_timeout
        self._lock = threading.Lock()           # held by the writer while it commits a batch
        self._queued = threading.Condition(threading.Lock())  # guards _queue and _closing
        self._queue: List[_Write] = []
        # a batch is being committed (by the writer or flush_here)
        self._writing = False
        self._closing = False
        self._writer: Optional[threading.Thread] = None
        self._read_lock = threading.Lock()
        # (when, why) of the last event commit, if it failed
        self._failed_commit: Optional[Tuple[float, str]] = None
        self._reader: Optional[sqlite3.Connection] = None
        self._checkpoints: Optional[threading.Thread] = None
        self._stop_checkpoints = threading.Event()
        self._commits = 0  # transactions committed by this Inbox: the checkpointer looks at it
        self._synchronous = ""
        try:
            self._db = self._connect(busy_timeout)
            # A statement that writes many rows (a batch's INSERT) keeps a journal of its own,
            # to undo just itself: in memory, not in a temporary file created and removed at
            # every commit (that was an eighth of an ack's time).
            self._db.execute("PRAGMA temp_store=MEMORY")
        except sqlite3.Error as exc:
            raise InboxUnavailable("cannot open the inbox %s: %s (check that its folder exists "
                                   "and is writable,"
                                   " or pass --db)" % (path, exc)) from None
        self._file_identity = _file_identity(path)
        self._file_checked_at = float("-inf")
        self._writer = threading.Thread(target=self._write_batches, name="wabhook-inbox-writer",
                                        daemon=True)
        self._writer.start()
        try:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._migrate()
            self._reader = self._connect(busy_timeout)
            # SQLite's own checkpoint runs inside the COMMIT that fills the WAL past its limit:
            # every CHECKPOINT_FRAMES frames one batch of acks waited 4-6 ms for it. It is left
            # as a backstop, far off, for when the checkpointer cannot keep up.
            self._db.execute("PRAGMA wal_autocheckpoint=%d" % (10 * CHECKPOINT_FRAMES))
            checkpointer = self._connect(busy_timeout)
            checkpointer.execute("PRAGMA synchronous=FULL")  # whatever a build's default
            self._checkpoints = threading.Thread(target=self._checkpoint_continually,
                                                 args=(checkpointer,),
                                                 name="wabhook-inbox-checkpoints", daemon=True)
            self._checkpoints.start()
        except sqlite3.Error as exc:
            self.close()
            raise InboxUnavailable("cannot open the inbox %s: %s" % (path, exc)) from None
        except InboxUnavailable:
            self.close()
            raise

    def _connect(self, busy_timeout: float) -> sqlite3.Connection:
        return sqlite3.connect(self.path, timeout=busy_timeout, isolation_level=None,
                               check_same_thread=False)

    def close(self):
        """Commit what is queued, stop the writer, close the file."""
        with self._queued:
            self._closing = True
            self._queued.notify()
        if self._writer is not None and self._writer is not threading.current_thread():
            self._writer.join()
        self._stop_checkpoints.set()
        if self._checkpoints is not None:
            self._checkpoints.join()  # before taking _lock, which it may be waiting for
        with self._lock, self._read_lock:
            self._db.close()
            if self._reader is not None:
                self._reader.close()

    def _migrate(self):
        def migrate(db):
            version = db.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise InboxUnavailable("%s was written by a newer wabhook (schema %d)" % (self.path,
                                                                                          version))
            for schema, name in REPLACED_INDEXES:
                if version < schema:
                    db.execute("DROP INDEX IF EXISTS " + name)
            for ddl in (DDL_EVENTS, DDL_DELIVERIES):
                db.execute(ddl)
            for table, column, sql_type in ADDED_COLUMNS:
                if column not in {row[1] for row in db.execute("PRAGMA table_info(%s)" % table)}:
                    db.execute("ALTER TABLE %s ADD COLUMN %s %s" % (table, column, sql_type))
            self._move_dedup_keys(db)
            for ddl in DDL_INDEXES:
                db.execute(ddl)
            db.execute("PRAGMA user_version=%d" % SCHEMA_VERSION)
        self._write(migrate)

    @staticmethod
    def _move_dedup_keys(db) -> None:
        """Schema 3 and older kept dedup keys in a table of their own (a row, its key's index and an
        expiry index: three B-trees written at every ack); they move into their events' rows."""
        if not db.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'dedup'"
                          ).fetchone():
            return
        now = time.time()
        # by event: one seek a key, not a scan of the table a key (it goes with the table)
        db.execute("CREATE INDEX IF NOT EXISTS dedup_by_event ON dedup(event_id)")
        db.execute("UPDATE events SET (dedup_key, dedup_until) = (SELECT key, expires_at FROM dedup"
                   " WHERE dedup.event_id = events.id AND expires_at > ?)"
                   " WHERE id IN (SELECT event_id FROM dedup WHERE expires_at > ?)", (now, now))
        db.execute("DROP TABLE dedup")  # and its indexes

    # -- the one write path --------------------------------------------------

    def _write(self, apply: Optional[Callable[[sqlite3.Connection], object]] = None,
               event: Optional[tuple] = None, outcome: Optional[tuple] = None):
        """Run `apply(db)`, store `event` or record `outcome`, in a write transaction grouped with
        whatever else is queued.

        Returns its result only after COMMIT. A batch that stores events is
        committed with synchronous=FULL, so an ack survives a power loss;
        delivery bookkeeping alone commits without fsync (a lost outcome only
        re-runs a handler). Raises InboxUnavailable when it cannot commit.
        """
        work = self._enqueue(_Write(apply, event, outcome=outcome))
        work.wakeup.acquire()
        if work.error is not None:
            raise work.error
        return work.result

    def _enqueue(self, work: _Write, notify: bool = True) -> _Write:
        with self._queued:
            if self._closing:
                work.error, work.done = InboxUnavailable("inbox %s is closed" % self.path), True
                work.finish()
                return work
            self._queue.append(work)
            if notify and len(self._queue) == 1:
                self._queued.notify()
        return work

    def _write_batches(self) -> None:
        """The writer thread: commit whatever is queued, as one batch, until closed."""
        while True:
            with self._queued:
                while (not self._queue or self._writing) and not self._closing:
                    self._queued.wait()
                if not self._queue:
                    return
                batch, self._queue, self._writing = self._queue, [], True
            self._commit_and_finish(batch)

    def flush_here(self) -> None:
        """Commit the events queued in the calling thread, unless the writer is at it already.

        The HTTP front calls this after each turn of its loop: with the writer
        idle, a request's way from socket to COMMIT to 200 then takes no
        hand-off between threads (which costs more than the fsync at low
        concurrency); with the writer busy, it takes the queue next. Delivery
        bookkeeping queued meanwhile is left to the writer, which this wakes.
        """
        with self._queued:
            if self._writing:
                return
            batch, bookkeeping = _events_and_rest(self._queue)
            if not batch:
                return
            self._queue, self._writing = bookkeeping, True
        self._commit_and_finish(batch)

    def _commit_and_finish(self, batch: List[_Write]) -> None:
        """Commit the batch's events, then the rest (delivery bookkeeping) in a transaction of its
        own: the acks go out after their fsync, not after the claims and outcomes queued with
        them."""
        parts = [part for part in _events_and_rest(batch) if part]
        try:
            while parts:
                part = parts.pop(0)
                try:
                    self._commit(part)
                finally:
                    self._finish(part)
        finally:
            for part in parts:  # not committed: _commit raised on an earlier part
                self._finish(part)
            with self._queued:
                self._writing = False
                if self._queue:
                    self._queued.notify()

    def _finish(self, part: List[_Write]) -> None:
        """Answer every piece of work of a committed part (an error for what was not made)."""
        for work in part:
            if not work.done:  # only if _commit itself failed
                work.error, work.done = InboxUnavailable("inbox %s: the write was not made"
                                                         % self.path), True
            work.finish()

    def _commit(self, batch: List[_Write]) -> None:
        """Apply a batch in one transaction. Work that raises is taken out and the rest committed
        again."""
        with self._lock:
            while batch:
                failed = self._try_commit(batch)
                batch = [work for work in batch if work not in failed]
                if not failed:
                    return

    def _try_commit(self, batch: List[_Write]) -> List[_Write]:
        """Commit the batch, or fail it whole (InboxUnavailable); else return the work that
        raised."""
        db = self._db
        events = [work for work in batch if work.event is not None]
        outcomes = [work for work in batch if work.outcome is not None]
        done: List[Tuple[_Write, object]] = []
        current = events
        try:
            self._check_file()
            self._set_synchronous("FULL" if events else "NORMAL")
            db.execute("BEGIN IMMEDIATE")
            try:
                if events:
                    done += zip(events, self._insert_events(db, time.time(),
                                                            [work.event for work in events]))
                # before the claims: a lane whose run ended is free for them
                current = outcomes
                if outcomes:
                    done += zip(outcomes, self._record_outcomes(db, [work.outcome
                                                                     for work in outcomes]))
                for work in batch:
                    if work.apply is not None:
                        current = [work]
                        done.append((work, work.apply(db)))
                current = []
                db.execute("COMMIT")
                self._commits += 1
            except BaseException:
                with contextlib.suppress(sqlite3.Error):
                    db.execute("ROLLBACK")
                raise
        except (sqlite3.Error, _FileLost) as exc:
            error = InboxUnavailable("inbox %s cannot commit: %s" % (self.path, exc))
            if events:
                self._failed_commit = (time.monotonic(), str(error))
            for work in batch:
                work.error, work.done = error, True
            return []
        # a bug in one piece of work, or InboxUnavailable it raised itself
        except BaseException as exc:
            if not current:
                raise
            for work in current:
                work.error, work.done = exc, True
            return current
        for work, result in done:
            work.result, work.done = result, True
        if any(not work.result[1] for work in events):
            self._failed_commit = None  # an event was stored: writes get through again
        return []

    def _check_file(self) -> None:
        """_FileLost if the inbox file was deleted or replaced since it was opened (looked at twice
        a second).

        SQLite would go on writing into the unlinked file, and every event
        acknowledged from then on would be gone at the next start.
        """
        now = time.monotonic()
        if now - self._file_checked_at < FILE_CHECK_SECONDS:
            return
        self._file_checked_at = now
        try:
            identity = _file_identity(self.path)
        except OSError:
            identity = None
        if identity != self._file_identity:
            raise _FileLost("the file was deleted or replaced while wabhook ran; restart it "
                            "(events stored"
                            " since are in the old file, if a process still holds it)")

    def _checkpoint_continually(self, db: sqlite3.Connection) -> None:
        """The checkpointer thread: every CHECKPOINT_SECONDS that saw a commit, copy what the WAL
        holds into the file, on a connection of its own, while the writer goes on committing.

        The WAL starts over from its beginning only when a write begins with
        every frame copied, which never happens while frames are added during
        each copy: once it holds CHECKPOINT_FRAMES, the few frames added
        meanwhile are copied with the writer paused (under _lock), and its
        next commit starts the WAL over. A checkpoint is made with fsync (this
        connection is set to synchronous=FULL), so a frame is only written
        over once the file holds it durably.
        """
        seen = -1
        try:
            while not self._stop_checkpoints.wait(CHECKPOINT_SECONDS):
                if self._commits == seen:
                    continue
                seen = self._commits
                try:
                    frames = db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()[1]
                    if frames >= CHECKPOINT_FRAMES:
                        with self._lock:
                            db.execute("PRAGMA wal_checkpoint(PASSIVE)")
                except sqlite3.Error:
                    pass  # a full disk, a file gone: the writer reports those; this tries again
        finally:
            db.close()

    def _set_synchronous(self, mode: str) -> None:
        if mode != self._synchronous:
            self._db.execute("PRAGMA synchronous=" + mode)
            self._synchronous = mode

    def _read(self, sql, params=()):
        with self._read_lock:
            try:
                return self._reader.execute(sql, params).fetchall()
            except sqlite3.Error as exc:
                raise InboxUnavailable("inbox %s cannot be read: %s" % (self.path, exc)) from None

    # -- receiving ---------------------------------------------------------

    def commit_event(self, body: str, event_type: str, bridge: Optional[str], lane: str,
                     dedup_key: Optional[str], dedup_ttl: float) -> Tuple[int, bool]:
        """Store one event durably; (inbox id, duplicate). Returns only after COMMIT."""
        return self._write(event=(body, event_type, bridge, lane, dedup_key, dedup_ttl))

    def submit_event(self, body: str, event_type: str, bridge: Optional[str], lane: str,
                     dedup_key: Optional[str], dedup_ttl: float,
                     on_done: Callable[[Optional[Tuple[int, bool]], Optional[Exception]], None],
                     flush_here: bool = False) -> None:
        """commit_event() without waiting: on_done(result, error) is called after COMMIT by the
        writer;
        or, with `flush_here`, by the caller's own next flush_here() if the writer is idle then."""
        self._enqueue(_Write(event=(body, event_type, bridge, lane, dedup_key, dedup_ttl),
                             on_done=on_done), notify=not flush_here)

    @staticmethod
    def _insert_events(db, now: float, events: List[tuple]) -> List[Tuple[int, bool]]:
        """Store a batch of events, (inbox id, duplicate) for each, in a few statements whatever its
        size.

        Each statement is a round trip through the GIL, which the threads
        parsing the next requests hold meanwhile: the batch is stored with one
        dedup lookup and one multi-row INSERT, not statements an event. A key
        is a column of its event's row: storing an event writes two B-trees
        (the row, and its key's index entry) besides the two status indexes.
        """
        keys = [key for _body, _type, _bridge, _lane, key, _ttl in events if key is not None]
        known: Dict[str, int] = {}  # key -> the inbox id of its stored event
        for part in _chunks(keys, SQL_ROWS):
            known.update(db.execute("SELECT dedup_key, id FROM events WHERE dedup_key IN (%s)"
                                    " AND dedup_until > ?" % ",".join("?" * len(part)),
                                    part + [now]))
        rows: List[tuple] = []
        row_of: Dict[str, int] = {}  # key -> its row in `rows`, for a key new in this batch
        # each event: (inbox id, None, True) for a duplicate of a stored event, else (None, its
        # row or its first copy's row, duplicate)
        marks: List[Tuple[Optional[int], Optional[int], bool]] = []
        for body, event_type, bridge, lane, key, ttl in events:
            if key is not None and key in known:
                marks.append((known[key], None, True))
            elif key is not None and key in row_of:
                marks.append((None, row_of[key], True))  # earlier in this batch
            else:
                if key is not None:
                    row_of[key] = len(rows)
                marks.append((None, len(rows), False))
                rows.append((now, bridge, event_type, lane, body, key,
                             None if key is None else now + ttl))
        # SQLite gives each new row the largest id so far plus one (the write lock is ours),
        # so the rows of one INSERT have consecutive ids, ending at its last row's.
        ids: List[int] = []
        for count, last in _insert_rows(db, "INSERT INTO events (received_at, bridge, event, lane,"
                                            " body, dedup_key, dedup_until) VALUES",
                                        "(?, ?, ?, ?, ?, ?, ?)", rows):
            ids += range(last - count + 1, last + 1)
        return [(ids[row] if event_id is None else event_id, duplicate)
                for event_id, row, duplicate in marks]

    # -- dispatching -------------------------------------------------------

    def claim_due(self, owner: str, limit: int, handlers_for: Callable[[str], List[str]],
                  now: Optional[float] = None) -> List[Claim]:
        """Lease up to `limit` events, the oldest due one of each idle lane.

        New events are first fanned out to the handlers present now. A lane with
        a running delivery (in any process sharing the file) is skipped, which
        is what keeps one chat's events in order.
        """
        fixed_now = now

        def claim(db) -> List[Claim]:
            # The time inside the transaction: a run never starts before its event was stored.
            now = time.time() if fixed_now is None else fixed_now
            self._fan_out(db, handlers_for, now)
            heads = self._claimable_heads(db, now, limit) if limit > 0 else []
            if not heads:
                return []
            # Three statements for all the heads, not three a head. `+status`: look the
            # events' rows up by their key, not by an index on status that would walk
            # the whole backlog.
            marks = ",".join("?" * len(heads))
            due = " AND +status = 'pending' AND +next_attempt_at <= ?" + NOT_HELD
            attempts: Dict[int, Dict[str, int]] = {event_id: {} for event_id in heads}
            for event_id, handler, count in db.execute(
                    "SELECT event_id, handler, attempts FROM deliveries WHERE event_id IN (%s)"
                    % marks + due,
                    heads + [now]):
                attempts[event_id][handler] = count + 1
            # all of it held: nothing to run
            heads = [event_id for event_id in heads if attempts[event_id]]
            if not heads:
                return []
            marks = ",".join("?" * len(heads))
            db.execute("UPDATE deliveries SET status = 'running', attempts = attempts + 1,"
                       " lease_owner = ?, lease_until = ?, updated_at = ?, started_at = ?"
                       " WHERE event_id IN (%s)" % marks + due,
                       [owner, now + LEASE_SECONDS, now, now] + heads + [now])
            events = {row[0]: row[1:] for row in db.execute(
                "SELECT id, event, bridge, body, received_at FROM events WHERE id IN (%s)" % marks,
                heads)}
            claimed_at = time.monotonic()
            return [Claim(event_id, *events[event_id], sorted(attempts[event_id]),
                          attempts[event_id], claimed_at)
                    for event_id in heads]
        return self._write(claim)

    @staticmethod
    def _claimable_heads(db, now: float, limit: int) -> List[int]:
        """The event ids to claim: the heads of up to `limit` idle lanes, oldest first."""
        running = {lane for (lane,) in db.execute(RUNNING_LANES)}
        front = db.execute(OLDEST_PENDING, (HEAD_SCAN_ROWS,))
        heads: Dict[str, int] = {}
        # (lane, handler) of order-holding handlers whose earlier delivery waits for a retry
        held = set()
        due = seen = 0
        # row by row: it usually stops after a few
        for lane, event_id, next_attempt_at, handler in front:
            seen += 1
            if holds_chat(handler) and (next_attempt_at > now or (lane, handler) in held):
                held.add((lane, handler))
                continue
            if next_attempt_at > now:
                continue
            due += 1
            if lane not in running and lane not in heads:
                heads[lane] = event_id  # the first due row of a lane, in id order, is its head
                if len(heads) == limit:
                    break
        if len(heads) == limit or seen < HEAD_SCAN_ROWS:
            return list(heads.values())  # the whole backlog was seen, or its front sufficed
        query = DUE_LANE_HEADS if due * 2 < seen else WALKED_LANE_HEADS
        return [event_id for _lane, event_id in db.execute(query, {"now": now, "limit": limit})]

    def _fan_out(self, db, handlers_for, now):
        """Give new events their delivery rows, one per handler present now; an event no handler
        wants is done."""
        rows = db.execute("SELECT id, event, lane FROM events WHERE dispatched = 0 ORDER "
                          "BY id LIMIT ?",
                          (FANOUT_BATCH,)).fetchall()
        deliveries, wanted, unwanted = [], [], []
        for event_id, event_type, lane in rows:
            names = handlers_for(event_type)
            deliveries += [(event_id, name, lane, now) for name in names]
            (wanted if names else unwanted).append(event_id)
        _insert_rows(db, "INSERT OR IGNORE INTO deliveries (event_id, handler, lane, status, "
                         "next_attempt_at,"
                         " updated_at) VALUES", "(?, ?, ?, 'pending', 0, ?)", deliveries)
        for status, event_ids in (("pending", wanted), ("done", unwanted)):
            for part in _chunks(event_ids, SQL_ROWS):
                db.execute("UPDATE events SET dispatched = 1, status = ? WHERE id IN (%s)"
                           % ",".join("?" * len(part)), [status] + part)
        return len(rows)

    def has_undispatched(self) -> bool:
        """Whether some stored event has no delivery rows yet."""
        return bool(self._read("SELECT 1 FROM events WHERE dispatched = 0 LIMIT 1"))

    def record_outcome(self, event_id: int, handler: str, owner: str, status: str,
                       error: Optional[str] = None, retry_at: float = 0.0,
                       on_done: Optional[Callable[[Optional[bool], Optional[Exception]],
                                                  None]] = None,
                       output: Optional[str] = None, exit_status: Optional[int] = None):
        """Store how one run ended: status done, skipped (its file is gone), pending (retry at
        `retry_at`)
        or dead, with what it printed and, for a script, its exit status.

        Only a delivery this owner still holds is updated, so a run that
        outlived its lease (or a shutdown) cannot overwrite a newer state.
        Returns whether it did; with `on_done`, returns at once and calls
        on_done(updated, error) after COMMIT instead.
        """
        outcome = (event_id, handler, owner, status, retry_at, error, time.time(), output,
                   exit_status)
        if on_done is not None:
            self._enqueue(_Write(outcome=outcome, on_done=on_done))
            return None
        return self._write(outcome=outcome)

    @staticmethod
    def _record_outcomes(db, outcomes: List[tuple]) -> List[bool]:
        """Record a batch of runs' outcomes (see record_outcome); whether each updated its delivery.

        Three statements a hundred of them (SQL_ROWS), not two a run: the
        deliveries still running, the update of those this owner holds, and
        their events' summary status. An outcome is a tuple (event_id,
        handler, owner, status, retry_at, error, ended_at, output, exit_status).
        """
        running: set = set()  # (event_id, handler, owner) of the deliveries running now
        for part in _chunks(sorted({outcome[0] for outcome in outcomes}), SQL_ROWS):
            running.update(db.execute("SELECT event_id, handler, lease_owner FROM deliveries"
                                      " WHERE event_id IN (%s) AND +status = 'running'"
                                      % ",".join("?" * len(part)), part))
        updated, rows = [], []
        for event_id, handler, owner, status, retry_at, error, ended_at, output, exit_status in (
                outcomes):
            held = (event_id, handler, owner) in running
            running.discard((event_id, handler, owner))  # a second outcome of that run: too late
            updated.append(held)
            if held:
                rows.append((event_id, handler, status, retry_at, error, ended_at, output,
                             exit_status))
        _with_rows(db, "WITH outcome(event_id, handler, status, next_attempt_at, last_error,"
                       " updated_at, output, exit_status) AS (VALUES %s)"
                       " UPDATE deliveries SET (status, next_attempt_at, last_error, updated_at,"
                       " output, exit_status) = (SELECT outcome.status, outcome.next_attempt_at,"
                       " outcome.last_error, outcome.updated_at, outcome.output,"
                       " outcome.exit_status FROM outcome WHERE outcome.event_id ="
                       " deliveries.event_id AND outcome.handler = deliveries.handler),"
                       " lease_owner = NULL, lease_until = NULL"
                       " WHERE (event_id, handler) IN (SELECT event_id, handler FROM outcome)",
                   "(?, ?, ?, ?, ?, ?, ?, ?)", rows)
        Inbox._settle_events(db, sorted({row[0] for row in rows}))
        return updated

    @staticmethod
    def _settle_events(db, event_ids: List[int]) -> None:
        """Set the events' summary status from their deliveries."""
        for part in _chunks(event_ids, SQL_ROWS):
            db.execute("UPDATE events SET status = CASE"
                       " WHEN EXISTS (SELECT 1 FROM deliveries WHERE event_id = events.id"
                       " AND status IN ('pending', 'running')) THEN 'pending'"
                       " WHEN EXISTS (SELECT 1 FROM deliveries WHERE event_id = events.id"
                       " AND status = 'dead') THEN 'dead'"
                       " WHEN EXISTS (SELECT 1 FROM deliveries WHERE event_id = events.id"
                       " AND status = 'discarded') THEN 'discarded'"
                       " ELSE 'done' END WHERE id IN (%s)" % ",".join("?" * len(part)), part)

    def renew_leases(self, owner: str, now: Optional[float] = None) -> None:
        """Extend the leases of every delivery `owner` is running by LEASE_SECONDS."""
        now = time.time() if now is None else now
        self._write(lambda db: db.execute(
            "UPDATE deliveries SET lease_until = ? WHERE status = 'running' AND lease_owner = ?",
            (now + LEASE_SECONDS, owner)))

    def release_leases(self, owner: str, event_id: Optional[int] = None,
                       handlers: Optional[List[str]] = None) -> int:
        """Give back running deliveries without counting the attempt (shutdown, abandoned run)."""
        sql = ("UPDATE deliveries SET status = 'pending', attempts = MAX(attempts - 1, 0),"
               " lease_owner = NULL, lease_until = NULL, next_attempt_at = 0"
               " WHERE status = 'running' AND lease_owner = ?")
        params: list = [owner]
        if event_id is not None:
            sql += " AND event_id = ? AND handler IN (%s)" % ",".join("?" * len(handlers or []))
            params += [event_id] + list(handlers or [])
        return self._write(lambda db: db.execute(sql, params).rowcount)

    def recover_leases(self, after_failure: Callable[[int], Tuple[str, float]],
                       owner_is_dead: Callable[[str], bool], now: Optional[float] = None) -> int:
        """Take back deliveries whose owner died: its lease ran out, or its process is gone.

        The killed run counted as a failed attempt (`after_failure` gives the
        next state), so a handler that kills its process every time still ends
        in the dead letters.
        """
        now = time.time() if now is None else now

        def recover(db) -> int:
            recovered: List[int] = []  # their events
            rows = db.execute("SELECT event_id, handler, attempts, lease_owner, lease_until "
                              "FROM deliveries"
                              " WHERE status = 'running'").fetchall()
            for event_id, handler, attempts, owner, lease_until in rows:
                if (lease_until or 0) > now and not owner_is_dead(owner or ""):
                    continue
                error = "the process running this handler stopped during the run (%s)" % owner
                status, retry_at = after_failure(attempts)
                # Retried at once, not after a backoff: a killed run is its chat's head,
                # and the chat's later events must not overtake it.
                retry_at = now if status == "pending" else retry_at
                db.execute("UPDATE deliveries SET status = ?, next_attempt_at = ?, last_error = ?,"
                           " lease_owner = NULL, lease_until = NULL, updated_at = ?"
                           " WHERE event_id = ? AND handler = ?",
                           (status, retry_at, error, now, event_id, handler))
                recovered.append(event_id)
            self._settle_events(db, sorted(set(recovered)))
            return len(recovered)
        return self._write(recover)

    def stuck_deliveries(self, running_longer_than: float) -> int:
        """How many deliveries have been running longer than that: a lane that no longer moves."""
        return self._read("SELECT COUNT(*) FROM deliveries WHERE status = 'running' AND "
                          "updated_at < ?",
                          (time.time() - running_longer_than,))[0][0]

    def next_retry_at(self) -> Optional[float]:
        """When the next delivery waiting for a retry becomes due (None: none waits)."""
        row = self._read("SELECT MIN(next_attempt_at) FROM deliveries WHERE status = 'pending'"
                         " AND next_attempt_at > ?", (time.time(),))
        return row[0][0] if row else None

    # -- operating ---------------------------------------------------------

    def replay(self, event_ids: List[int]) -> List[int]:
        """Queue events again: their dead (or discarded) deliveries, or, if none, every handler
        anew."""
        def replay(db) -> List[int]:
            replayed = []
            for event_id in event_ids:
                if db.execute("SELECT 1 FROM events WHERE id = ?", (event_id,)).fetchone() is None:
                    continue
                revived = db.execute(
                    "UPDATE deliveries SET status = 'pending', attempts = 0, next_attempt_at = 0,"
                    " last_error = NULL WHERE event_id = ? AND +status IN ('dead', 'discarded')",
                    (event_id,)).rowcount
                if not revived:
                    db.execute("DELETE FROM deliveries WHERE event_id = ? AND status != 'running'",
                               (event_id,))
                    db.execute("UPDATE events SET dispatched = 0 WHERE id = ?", (event_id,))
                db.execute("UPDATE events SET status = 'pending' WHERE id = ?", (event_id,))
                replayed.append(event_id)
            return replayed
        return self._write(replay)

    def discard(self, event_ids: List[int]) -> Dict[int, str]:
        """Set dead events aside: status `discarded`, kept for the record, no longer counted as
        dead.

        Returns each id's status before (absent: no such event); only the
        ones that were dead changed.
        """
        def discard(db) -> Dict[int, str]:
            found = {}
            for part in _chunks(list(event_ids), SQL_ROWS):
                marks = ",".join("?" * len(part))
                found.update(db.execute("SELECT id, status FROM events WHERE id IN (%s)" % marks,
                                        part))
                # updated_at stays: it is when the last run ended (`show`, the page).
                db.execute("UPDATE deliveries SET status = 'discarded'"
                           " WHERE event_id IN (%s) AND +status = 'dead'" % marks, part)
                db.execute("UPDATE events SET status = 'discarded' WHERE id IN (%s) AND "
                           "status = 'dead'"
                           % marks, part)
            return found
        return self._write(discard)

    def dead_event_ids(self, after: int = 0, limit: int = 500) -> List[int]:
        """Ids of dead events after `after`, in id order, at most `limit` of them."""
        return [row[0] for row in self._read(
            "SELECT id FROM events WHERE status = 'dead' AND id > ? ORDER BY id LIMIT ?",
            (after, limit))]

    def prune(self, retention: float, now: Optional[float] = None, batch: int = 1000) -> int:
        """Delete delivered events older than `retention`, and their dedup keys with them (no key
        lasts longer: see validate_config). Dead and pending ones stay, and so do their keys, each
        a duplicate's match until its dedup_until."""
        now = time.time() if now is None else now
        removed = 0
        def prune_batch(db) -> List[int]:
            ids = [row[0] for row in db.execute(
                "SELECT id FROM events WHERE status = 'done' AND received_at < ? ORDER "
                "BY id LIMIT ?",
                (now - retention, batch))]
            marks = ",".join("?" * len(ids))
            if ids:
                db.execute("DELETE FROM deliveries WHERE event_id IN (%s)" % marks, ids)
                db.execute("DELETE FROM events WHERE id IN (%s)" % marks, ids)
            return ids
        while True:
            ids = self._write(prune_batch)
            removed += len(ids)
            if len(ids) < batch:
                return removed

    def counts(self, statuses=("pending", "done", "dead", "discarded")) -> Dict[str, int]:
        """How many events have each summary status (one indexed count per status)."""
        return {status: self._read("SELECT COUNT(*) FROM events WHERE status = ?", (status,))[0][0]
                for status in statuses}

    def check_writable(self) -> None:
        """Raise InboxUnavailable unless a write transaction can start now and events are being
        stored.

        An empty transaction succeeds on a full disk, so an event commit that
        failed within FAILED_COMMIT_MEMORY seconds, with none stored since,
        counts too.
        """
        failed = self._failed_commit
        if failed is not None and time.monotonic() - failed[0] < FAILED_COMMIT_MEMORY:
            raise InboxUnavailable(failed[1])
        self._write(lambda db: None)

    def list_events(self, status: Optional[str] = None, limit: int = 20,
                    event_type: Optional[str] = None,
                    bridge: Optional[str] = None, before: Optional[int] = None,
                    after: Optional[int] = None) -> List[dict]:
        """The newest events matching the filters, each with its deliveries; newest first.

        `status` is an event's (pending, done, dead, discarded) or `skipped`
        (events with a skipped delivery); `bridge` "-" is the default bridge;
        `before`/`after` page by id. With `after`, the oldest first instead
        (what `events --follow` prints next).
        """
        where: List[str] = []
        params: List[object] = []
        if status == "skipped":  # a delivery status: the events with one
            where.append(SKIPPED_EVENTS)
        elif status:
            where.append("status = ?")
            params.append(status)
        if event_type:
            where.append("event = ?")
            params.append(event_type)
        if bridge == "-":
            where.append("bridge IS NULL")
        elif bridge:
            where.append("bridge = ?")
            params.append(bridge)
        if before is not None:
            where.append("id < ?")
            params.append(before)
        if after is not None:
            where.append("id > ?")
            params.append(after)
        rows = self._read("SELECT id, received_at, bridge, event, status, body FROM events%s"
                          " ORDER BY id %s LIMIT ?"
                          % (" WHERE " + " AND ".join(where) if where else "",
                             "ASC" if after is not None else "DESC"), params + [limit])
        deliveries: Dict[int, List[dict]] = {row[0]: [] for row in rows}
        for part in _chunks(list(deliveries), SQL_ROWS):  # one query a hundred events, not one each
            for event_id, handler, d_status, attempts, error in self._read(
                    "SELECT event_id, handler, status, attempts, last_error FROM deliveries"
                    " WHERE event_id IN (%s) ORDER BY event_id, handler"
                    % ",".join("?" * len(part)), part):
                deliveries[event_id].append({"handler": handler, "status": d_status,
                                             "attempts": attempts, "last_error": error})
        return [{"id": event_id, "received_at": received_at, "bridge": bridge_label,
                 "event": event_name, "status": event_status, "body": body,
                 "deliveries": deliveries[event_id]}
                for event_id, received_at, bridge_label, event_name, event_status, body in rows]

    def newest_id(self) -> int:
        """The id of the newest event stored (0: none yet)."""
        return self._read("SELECT COALESCE(MAX(id), 0) FROM events")[0][0]

    def event_detail(self, event_id: int) -> Optional[dict]:
        """One event with everything known about each delivery (None: no such event)."""
        rows = self._read("SELECT id, received_at, bridge, event, status, body FROM "
                          "events WHERE id = ?",
                          (event_id,))
        if not rows:
            return None
        event_id, received_at, bridge, event_name, status, body = rows[0]
        deliveries = []
        for (handler, d_status, attempts, error, updated_at, started_at, exit_status, output,
             next_attempt_at) in self._read(
                "SELECT handler, status, attempts, last_error, updated_at, started_at, "
                "exit_status, output,"
                " next_attempt_at FROM deliveries WHERE event_id = ? ORDER BY handler",
                (event_id,)):
            ran = attempts > 0 and started_at is not None
            deliveries.append({
                "handler": handler, "status": d_status, "attempts": attempts, "last_error": error,
                "output": output, "exit_status": exit_status, "started_at": started_at if ran
                else None,
                "finished_at": updated_at if ran and d_status != "running" else None,
                "next_attempt_at": next_attempt_at if d_status == "pending" else 0})
        return {"id": event_id, "received_at": received_at, "bridge": bridge, "event": event_name,
                "status": status, "body": body, "deliveries": deliveries}

    def stats(self) -> dict:
        """Counts for `stats` and /metrics: events by status and type, deliveries by handler."""
        by_type = {event_type: count for event_type, count in self._read(
            "SELECT event, COUNT(*) FROM events GROUP BY event ORDER BY event")}
        by_handler: Dict[str, Dict[str, int]] = {}
        for handler, status, count in self._read(
                "SELECT handler, status, COUNT(*) FROM deliveries GROUP BY handler, status "
                "ORDER BY handler"):
            by_handler.setdefault(handler, {})[status] = count
        return {"events": self.counts(), "by_type": by_type, "deliveries_by_handler": by_handler,
                "oldest_pending_age_seconds": self.oldest_pending_age()}

    def oldest_pending_age(self) -> float:
        """Seconds since the oldest event not yet fully delivered arrived (0: none); one index
        seek."""
        rows = self._read("SELECT received_at FROM events WHERE status = 'pending' ORDER "
                          "BY id LIMIT 1")
        return round(max(0.0, time.time() - rows[0][0]), 3) if rows else 0


class NotReceived(Exception):
    """The server does not take events now (it is stopping, its handlers folder or inbox is gone):
    the sender should send again. `code` and the message are what it is told."""

    def __init__(self, code: str, message: str, close: bool = False):
        super().__init__(message)
        self.code, self.close = code, close


class Intake:
    """The way in of one event, from its parsed body to its committed row.

    receive() chooses the dedup key and the lane and hands the event to the
    inbox without waiting; the caller (the HTTP front) commits what it handed
    over once a turn with commit_received(), and on_done comes back after
    COMMIT; stored() then says what that answer means. Refusals are
    NotReceived, which the front turns into 503s.
    """

    def __init__(self, inbox: Inbox, config: Config, log: logging.Logger,
                 folder_missing: Callable[[float], bool], on_stored: Callable[[str, bool], None]):
        self.inbox, self.config, self.log = inbox, config, log
        self.folder_missing, self.on_stored = folder_missing, on_stored
        self.accepting = False  # False before start and from the first stop signal on

    def receive(self, body: str, payload: dict, bridge: Optional[str],
                on_done: Callable[[Optional[Tuple[int, bool]], Optional[Exception]], None]) -> None:
        """Hand one event to the inbox; on_done((inbox id, duplicate), None) after COMMIT, or (None,
        error)."""
        if not self.accepting:
            raise NotReceived("shutting_down", "the server is shutting down; send again",
                              close=True)
        if self.folder_missing(FOLDER_CHECK_SECONDS):
            self.log.error("answered 503: the handlers folder is missing")
            raise NotReceived("handlers_missing", "the handlers folder is missing; send again "
                                                  "once it is back")
        key, ttl = identity_key(payload, bridge), self.config.retention
        if key is None and self.config.dedup_window > 0:
            import hashlib  # here, not at the top: see _NoTLS
            digest = hashlib.sha256(("%s\n%s" % (bridge or "", body)).encode("utf-8",
                                                                             "surrogatepass"))
            key, ttl = "body:" + digest.hexdigest(), self.config.dedup_window
        self.inbox.submit_event(body, payload["event"], bridge, lane_of(payload, bridge), key, ttl,
                                on_done,
                                flush_here=True)

    def commit_received(self) -> None:
        """Commit the events receive() took since the last call, in this thread if the inbox's
        writer is idle."""
        self.inbox.flush_here()

    def stored(self, event_type: str, result: Optional[Tuple[int, bool]],
               error: Optional[Exception]) -> Optional[NotReceived]:
        """What the inbox's answer to receive() means: None (stored), or why it was not.

        Called in the front's own thread, so the inbox's writer goes on to the
        next batch at once.
        """
        if error is not None:
            self.log.error("answered 503 for a %s event: %s", _printable(event_type, 64), error)
            return NotReceived("inbox_unavailable", "the event could not be stored; send it again")
        self.on_stored(event_type, result[1])
        return None


# ---------------------------------------------------------------------------
# 4. Handlers
# ---------------------------------------------------------------------------

# An editor's save or a `git pull` can leave a handler briefly missing, empty
# or half-written. A file is trusted as gone or broken only after this long.
SETTLE_SECONDS = 1.0
RESCAN_SECONDS = 0.25       # how stale the folder listing may be
# A run takes a handler as unchanged, without a stat of its own, when another run looked at
# its file after this run's event was claimed and at most this long ago (see Registry.get).
SHARED_CHECK_SECONDS = 0.05
OUTPUT_CAP = 64 * 1024      # bytes of a script's output kept for the log
OUTPUT_KEPT = 16 * 1024     # bytes of a run's output stored with its delivery (`show`, the page)
OUTPUT_CHUNK = 16 * 1024


class HandlerLoadError(Exception):
    """A handler cannot run: a Python one fails to import or has no usable handle(event), a script
    has no exec bit or no interpreter line. Its message says what to fix."""


class HandlerFailed(Exception):
    """A handler run failed: the message says how (exit status, timeout)."""

    def __init__(self, message: str, exit_status: Optional[int] = None,
                 output: Optional[str] = None):
        super().__init__(message)
        self.exit_status, self.output = exit_status, output


class HandlerGone(Exception):
    """The handler's file was removed after the event was dispatched to it."""


def handler_event(filename: str) -> str:
    """The event a handler file is for: 'message.alerts.py' -> 'message'."""
    return filename.split(".", 1)[0]


def is_candidate(filename: str) -> bool:
    """Whether a file name may be a handler: not hidden, not starting with an underscore."""
    return not filename.startswith(("_", "."))


def is_handler_file(filename: str, mode: int) -> bool:
    """Whether a regular file of the handlers folder is a handler: the one definition, for the
    server and `check`.

    `<event>[.<label>].py`, `<event>[.<label>].forward`, any executable
    `<event>[.<label>][.ext]`, and also a
    file named after a documented event that cannot run (no exec bit): that
    one is a broken handler whose events wait for the fix, not a file to ignore.
    """
    if not is_candidate(filename):
        return False
    return (filename.endswith((".py", FORWARD_SUFFIX)) or _is_executable(mode)
            or handler_event(filename) in KNOWN_PREFIXES)


def holds_chat(name: str) -> bool:
    """Whether the handler keeps its chat's order across retries: the chat's next event waits for it
    until this one succeeds (or is dead-lettered).

    Forwarders do: what they feed (a stream, another service) sees each chat in
    order. Other handlers do not (SPEC: a retry does not hold up the chat); at
    most one event of a chat runs at a time either way.
    """
    return name.endswith(FORWARD_SUFFIX)


def script_problem(name: str, path: str) -> Optional[str]:
    """Why an executable handler cannot run (the sentence `check` prints and the server logs), or
    None."""
    if not _is_executable(os.stat(path).st_mode):
        return "is not executable: run chmod +x %s (or name it .py and define handle(event))" % name
    with open(path, "rb") as handle:
        start = handle.read(4)
    if not start.startswith(b"#!") and start != b"\x7fELF":
        return ("has no interpreter line: make its first line #!/bin/sh, or "
                "#!/usr/bin/env python3, or"
                " whatever runs it")
    return None


def near_event(prefix: str) -> Optional[str]:
    """The documented event a handler's name was probably meant for (within two edits), or None."""
    if prefix in KNOWN_PREFIXES:
        return None
    distance, closest = min((_edit_distance(prefix, known), known) for known in KNOWN_PREFIXES)
    return closest if distance <= 2 else None


def _edit_distance(first: str, second: str) -> int:
    """Levenshtein distance: insertions, deletions and substitutions."""
    previous = list(range(len(second) + 1))
    for index, char in enumerate(first, 1):
        current = [index]
        for other_index, other in enumerate(second, 1):
            current.append(min(previous[other_index] + 1, current[-1] + 1,
                               previous[other_index - 1] + (char != other)))
        previous = current
    return previous[-1]


def _signature(path: str):
    st = os.stat(path)
    return (st.st_mtime_ns, st.st_size, st.st_ino, st.st_mode)


def _is_executable(mode: int) -> bool:
    return bool(mode & 0o111)


class PythonHandler:
    """A `<event>[.<label>].py` file defining handle(event); runs in a worker thread."""

    # what kind of handler (python, script, forward): only a Python run cannot be killed
    form = "python"

    def __init__(self, name: str, path: str, signature, module: types.ModuleType):
        self.name, self.path, self.signature, self.module = name, path, signature, module
        self.is_async = inspect.iscoroutinefunction(module.handle)
        try:  # handle(event, body=None) also gets the event's JSON text exactly as received
            self.wants_body = "body" in inspect.signature(module.handle).parameters
        except ValueError:
            self.wants_body = False

    @classmethod
    def load(cls, name: str, path: str) -> "PythonHandler":
        """Load a handler module; HandlerLoadError unless it has a usable handle(event)."""
        source, signature = _read_settled(path)
        module_name = "wabhook_handler_" + re.sub(r"\W", "_", name[:-3])
        module = types.ModuleType(module_name)
        module.__file__ = path
        # Registered while its code runs, as an import would: dataclasses and
        # pickle look their module up in sys.modules.
        sys.modules[module_name] = module
        try:
            code = compile(source, path, "exec")
            exec(code, module.__dict__)
        except BaseException:
            sys.modules.pop(module_name, None)
            raise HandlerLoadError("cannot load handler %s:\n%s"
                                   % (name, traceback.format_exc())) from None
        handle = getattr(module, "handle", None)
        if handle is None:
            raise HandlerLoadError("defines no handle(event) function: add def handle(event): to %s"
                                   % name)
        if not callable(handle):
            raise HandlerLoadError("its handle is not a function: define def handle(event): in %s"
                                   % name)
        try:
            inspect.signature(handle).bind(None)
        except TypeError:
            raise HandlerLoadError("its handle() must take one argument, the event: def "
                                   "handle(event):") from None
        except ValueError:
            pass  # no signature to inspect (a builtin): trust it
        return cls(name, path, signature, module)

    def run(self, event: Event, body: str, context: "RunContext") -> None:
        """Call handle(event) (awaited if async); what it raises is the run's failure."""
        arguments = {"body": body} if self.wants_body else {}
        if self.is_async:  # async def handle(event): run to completion, within --script-timeout
            # here, not at the top: it costs every start 25 ms, and few handlers are async
            import asyncio
            asyncio.run(asyncio.wait_for(self.module.handle(event, **arguments), context.timeout))
        else:
            self.module.handle(event, **arguments)


class ScriptHandler:
    """An executable `<event>[.<label>][.ext]` file: event JSON on stdin, exit 0 is success."""

    form = "script"

    def __init__(self, name: str, path: str, signature):
        self.name, self.path, self.signature = name, path, signature

    def run(self, event: Event, body: str, context: "RunContext") -> Tuple[int, str]:
        """Run the script on one event: (exit status, output); HandlerFailed unless it exits 0 in
        time."""
        env = dict(context.environment, WABHOOK_EVENT=event.event, WABHOOK_ID=str(event.id),
                   WABHOOK_BRIDGE=event.bridge or "")
        log, timeout = context.log, context.timeout
        process = self._start(env)
        context.processes.add(process)
        output = _OutputReader(process.stdout)
        feeder = threading.Thread(target=_feed_stdin, args=(process.stdin, body.encode("utf-8")),
                                  daemon=True)
        feeder.start()
        timed_out = False
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
        finally:
            # The group goes too: a script's children must not outlive the run
            # (they would also hold its output pipe open).
            _kill_group(process.pid)
            process.wait()
            context.processes.discard(process)
            output.join(timeout=5)
        text = output.text()
        if text:
            for line in text.splitlines():
                log.info("%s | %s", self.name, line, extra={"handler": self.name,
                                                            "event_id": event.id})
            if output.dropped:
                log.warning("%s printed %d more bytes (not logged)", self.name, output.dropped,
                            extra={"handler": self.name, "event_id": event.id})
        if timed_out:
            raise HandlerFailed("timed out after %gs; its process group was killed" % timeout,
                                process.returncode, text)
        if process.returncode != 0:
            tail = text.strip().splitlines()[-1:] if text.strip() else []
            raise HandlerFailed("exit status %d%s" % (process.returncode, (": " + tail[0][:500])
                                                      if tail else ""),
                                process.returncode, text)
        return process.returncode, text


    def _start(self, env: Dict[str, str]) -> subprocess.Popen:
        """The script's process; a save or `git pull` in progress is waited out (up to
        SETTLE_SECONDS)."""
        deadline = time.monotonic() + SETTLE_SECONDS
        while True:
            try:
                # No shell: the path is ours, the payload goes through stdin only.
                return subprocess.Popen([self.path], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                        stderr=subprocess.STDOUT, cwd=os.path.dirname(self.path),
                                        env=env, start_new_session=True)
            except OSError as exc:
                # ENOENT: replaced by a rename or checkout just now; ETXTBSY: still open for
                # writing.
                if exc.errno not in (errno.ENOENT, errno.ETXTBSY) or time.monotonic() > deadline:
                    raise
            time.sleep(0.05)


def _feed_stdin(pipe, data: bytes):
    try:
        pipe.write(data)
    except (BrokenPipeError, OSError):
        pass  # the script did not read all of it; its exit status tells
    finally:
        with contextlib.suppress(OSError):
            pipe.close()


def _kill_group(pgid: int):
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


class _OutputReader(threading.Thread):
    """Reads a pipe to the end in bounded chunks, keeping the first OUTPUT_CAP bytes."""

    def __init__(self, pipe):
        super().__init__(daemon=True)
        self.pipe, self.kept, self.dropped = pipe, bytearray(), 0
        self.start()

    def run(self):
        """Read the pipe to its end, keeping the first OUTPUT_CAP bytes."""
        with self.pipe:
            while True:
                chunk = (self.pipe.read1(OUTPUT_CHUNK) if hasattr(self.pipe, "read1")
                         else self.pipe.read(OUTPUT_CHUNK))
                if not chunk:
                    return
                room = OUTPUT_CAP - len(self.kept)
                self.kept += chunk[:max(room, 0)]
                self.dropped += max(len(chunk) - max(room, 0), 0)

    def text(self) -> str:
        """The kept output, decoded as UTF-8 (undecodable bytes replaced)."""
        return bytes(self.kept).decode("utf-8", "replace")


def _read_settled(path: str) -> Tuple[str, tuple]:
    """The source of a Python handler, waiting out a save in progress.

    A file that is empty, does not compile, or changes while being read, and
    was modified within SETTLE_SECONDS, is read again until it settles.
    """
    deadline = time.monotonic() + SETTLE_SECONDS * 2
    while True:
        signature = _signature(path)
        with open(path, "rb") as handle:
            data = handle.read()
        unsettled = _signature(path) != signature
        if not unsettled:
            recent = time.time() - signature[0] / 1e9 < SETTLE_SECONDS
            if recent:
                try:
                    unsettled = not data.strip() or not compile(data, path, "exec")
                except (SyntaxError, ValueError):
                    unsettled = True
        if not unsettled or time.monotonic() > deadline:
            return data.decode("utf-8", "replace"), signature
        time.sleep(0.05)


# A `.forward` file names a URL; wabhook POSTs each event's body there (see parse_forward_file).
FORWARD_TIMEOUT = 10.0           # seconds a delivery may take when the file sets none
FORWARD_IDLE_PER_TARGET = 16     # idle keep-alive connections kept per (scheme, host, port)
# An idle connection older than this is closed, not reused: servers drop idle keep-alive
# connections after a few seconds (gunicorn 2 s, Node 5 s, Apache 5 s), and a request sent
# just as the server closes is lost to a reset (retried once, see ForwardPool.post).
FORWARD_IDLE_SECONDS = 4.0
# bytes of a target's reply read; a longer one closes its connection
FORWARD_REPLY_CAP = 64 * 1024
FORWARD_KEYWORDS = ("url", "header", "secret", "timeout", "wrap")
# `wrap NAME`: the body in the envelope an ingest wants instead of as stored. kafka: what a
# Kafka REST proxy's produce call takes (Confluent REST Proxy v2, Redpanda's HTTP Proxy): one
# record whose key is the event's chat, so the topic's partitioning keeps each chat in order.
FORWARD_WRAPS = {"kafka": "application/vnd.kafka.json.v2+json"}
FORWARD_EXAMPLES = {"wrap": "wrap kafka", "url": "url https://ingest.example.com/whatsapp",
                    "header": "header Authorization: Bearer ${INGEST_TOKEN}",
                    "secret": "secret ${FORWARD_SECRET}", "timeout": "timeout 10"}
# Headers wabhook writes itself: framing and connection management (a wrong one would
# break keep-alive for every later event), and the Standard Webhooks three.
FORWARD_RESERVED_HEADERS = ("host", "content-length", "transfer-encoding", "connection",
                            "keep-alive",
                            "te", "trailer", "upgrade", "expect", "webhook-id", "webhook-timestamp",
                            "webhook-signature")
FORWARD_HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")  # an RFC 9110 token
# printable ASCII and tab, nothing else
FORWARD_HEADER_VALUE = re.compile(r"[\t\x20-\x7e]*")
FORWARD_VARIABLE = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)\}|\$")
FORWARD_COMMENT = re.compile(r"(?:^|\s)#.*")


@dataclass(frozen=True)
class ForwardTarget:
    """What a `.forward` file says, with its ${VAR}s filled in: where and how to POST events."""

    scheme: str                          # http | https
    host: str                            # as http.client takes it: no brackets around IPv6
    port: int
    target: str                          # the request target: path and ?query
    # The file's `header` lines, in order, and the HMAC key of its `secret` (None: not
    # signed): both may hold secrets, so neither is in the repr.
    headers: Tuple[Tuple[str, str], ...] = field(default=(), repr=False)
    key: Optional[bytes] = field(default=None, repr=False)
    timeout: float = FORWARD_TIMEOUT
    wrap: Optional[str] = None           # a FORWARD_WRAPS name, or None: the body as stored

    @property
    def address(self) -> Tuple[str, str, int]:
        """What connections are pooled by."""
        return self.scheme, self.host, self.port

    @property
    def where(self) -> str:
        """host:port for messages (never the path or query: they may hold a token)."""
        return "%s:%d" % ("[%s]" % self.host if ":" in self.host else self.host, self.port)


def parse_forward_file(text: str, environ: Dict[str, str],
                       name: str = "the .forward file") -> ForwardTarget:
    """The target a `.forward` file describes, or HandlerLoadError naming the line and the fix.

    The format, one setting a line:

        # handlers/message.forward: every message event goes to this URL
        url https://ingest.example.com/whatsapp
        header Authorization: Bearer ${INGEST_TOKEN}
        header X-Source: wabhook
        secret ${FORWARD_SECRET}   # whsec_...: sign with Standard Webhooks
        timeout 10                 # seconds a delivery may take (default 10)

    - `url` (required, once): http:// or https:// with a host; user:password@ in it
      is sent as Basic authorization. No #fragment.
    - `header Name: value` (any number, sent in order): Name is an HTTP token, the
      value printable ASCII. Content-Type (default application/json) and User-Agent
      (default wabhook/<version>) may be replaced; Host, Content-Length,
      Transfer-Encoding, Connection and the webhook-* headers are wabhook's.
    - `secret whsec_<base64>` (optional, once): sign each POST with Standard
      Webhooks (webhook-id, webhook-timestamp, webhook-signature).
    - `timeout` (optional, once): 10, 2.5, 500ms ...; capped by --script-timeout.
    - `wrap kafka` (optional, once): send {"records": [{"key": CHAT, "value": EVENT}]}
      with Content-Type application/vnd.kafka.json.v2+json, as a Kafka REST proxy's
      POST /topics/NAME takes it.
    - A `#` at the start of a line or after a space starts a comment; blank lines
      are skipped; a keyword is separated from its value by spaces.
    - `${NAME}` in a value is replaced by the environment variable NAME of the
      wabhook process; an unset one is an error. `$$` is a literal `$`; any other
      `$` is an error (so `$TOKEN`, a shell habit, is not sent as such).

    The server reads the file when it loads the handler and again whenever the
    file changes; the variables come from its environment as it started, so a
    new value of one takes a restart (a process's environment cannot change).
    """
    settings: Dict[str, Tuple[int, object]] = {}  # keyword -> (line number, value), once each
    headers: List[Tuple[str, str]] = []
    authorization_line = None
    for number, keyword, value, where in _forward_lines(text, name):
        if keyword == "header":
            header = _forward_header(value, environ, where)
            if header[0].lower() == "authorization":
                authorization_line = number
            headers.append(header)
            continue
        if keyword in settings:
            raise HandlerLoadError("%s: a second %s line (line %d has one): keep one"
                                   % (where, keyword, settings[keyword][0]))
        if keyword == "wrap" and value not in FORWARD_WRAPS:
            raise HandlerLoadError("%s: wrap takes %s" % (where, " or ".join(FORWARD_WRAPS)))
        parse = {"url": _forward_url, "secret": _forward_key,
                 "timeout": _forward_timeout}.get(keyword)
        settings[keyword] = (number, parse(_substitute(value, environ, where), where)
                             if parse else value)
    if "url" not in settings:
        raise HandlerLoadError("%s has no url line: add one, as in: %s"
                               % (name, FORWARD_EXAMPLES["url"]))
    url_line, parts = settings["url"]
    if parts.username is not None:
        if authorization_line:
            raise HandlerLoadError("%s line %d: the url has user:password@ and line %d an"
                                   " Authorization header: keep one"
                                   % (name, url_line, authorization_line))
        credentials = "%s:%s" % (urllib.parse.unquote(parts.username),
                                 urllib.parse.unquote(parts.password or ""))
        basic = base64.b64encode(credentials.encode("utf-8")).decode("ascii")
        headers.append(("Authorization", "Basic " + basic))
    scheme = parts.scheme.lower()
    return ForwardTarget(scheme=scheme, host=parts.hostname,
                         port=parts.port or (443 if scheme == "https" else 80),
                         target=(parts.path or "/") + ("?" + parts.query if parts.query else ""),
                         headers=tuple(headers), key=settings.get("secret", (0, None))[1],
                         timeout=settings.get("timeout", (0, FORWARD_TIMEOUT))[1],
                         wrap=settings.get("wrap", (0, None))[1])


def _forward_lines(text: str, name: str):
    """(line number, keyword, value, "NAME line N") of each setting line; no comments, no blanks."""
    for number, raw_line in enumerate(text.splitlines(), 1):
        line = FORWARD_COMMENT.sub("", raw_line).strip()
        if not line:
            continue
        keyword, value = (line.split(None, 1) + [""])[:2]
        where = "%s line %d" % (name, number)
        if keyword not in FORWARD_KEYWORDS:
            close = difflib.get_close_matches(keyword, FORWARD_KEYWORDS, n=1)
            raise HandlerLoadError("%s: %r is not a setting%s; a .forward file has url, header,"
                                   " secret, timeout and wrap lines"
                                   % (where, keyword[:40],
                                      " (did you mean %s?)" % close[0] if close else ""))
        if not value:
            raise HandlerLoadError("%s: %s needs a value, as in: %s"
                                   % (where, keyword, FORWARD_EXAMPLES[keyword]))
        yield number, keyword, value, where


def _forward_header(value: str, environ: Dict[str, str], where: str) -> Tuple[str, str]:
    """A `header Name: value` line's (name, value), ${VAR}s filled in; HandlerLoadError if bad."""
    header_name, colon, header_value = value.partition(":")
    header_name = header_name.strip()
    if not colon or not FORWARD_HEADER_NAME.fullmatch(header_name):
        raise HandlerLoadError("%s: write a header as header Name: value, with a name of letters,"
                               " digits and -, as in: %s" % (where, FORWARD_EXAMPLES["header"]))
    if header_name.lower() in FORWARD_RESERVED_HEADERS:
        signs = header_name.lower().startswith("webhook-")
        raise HandlerLoadError("%s: wabhook sets the %s header itself: remove this line%s"
                               % (where, header_name,
                                  " (a secret line makes it sign)" if signs else ""))
    header_value = _substitute(header_value, environ, where).strip()
    if not FORWARD_HEADER_VALUE.fullmatch(header_value):
        raise HandlerLoadError("%s: the value of header %s holds a line break, a control character"
                               " or non-ASCII text: header values are printable ASCII (check the"
                               " variables it uses)" % (where, header_name))
    return header_name, header_value


def _substitute(value: str, environ: Dict[str, str], where: str) -> str:
    """${NAME} replaced from `environ`, $$ as $; HandlerLoadError for an unset NAME or a stray $."""
    def replace(match) -> str:
        if match.group(0) == "$$":
            return "$"
        variable = match.group(1)
        if variable is None:
            raise HandlerLoadError("%s: a $ starts a variable, written ${NAME}; write $$ "
                                   "for a $ itself" % where)
        if variable not in environ:
            raise HandlerLoadError("%s: ${%s} is not set in wabhook's environment: set %s where "
                                   "wabhook starts"
                                   " (e.g. Environment= in its systemd unit) and restart it" % (
                                       where, variable, variable))
        return environ[variable]
    return FORWARD_VARIABLE.sub(replace, value)


def _forward_url(url: str, where: str) -> urllib.parse.SplitResult:
    if not re.fullmatch(r"[\x21-\x7e]+", url):
        raise HandlerLoadError("%s: the url holds a space, a control character or non-ASCII text: "
                               "percent-encode"
                               " it (a space is %%20; a host as punycode)" % where)
    parts = urllib.parse.urlsplit(url)
    if parts.scheme.lower() not in ("http",
                                    "https") or not url.lower().startswith(parts.scheme.lower()
                                                                           + "://"):
        raise HandlerLoadError("%s: the url must start with http:// or https://, as in: %s"
                               % (where, FORWARD_EXAMPLES["url"]))
    if not parts.hostname:
        raise HandlerLoadError("%s: the url has no host: write it as https://host[:port]/path"
                               % where)
    try:
        port = parts.port
    except ValueError:
        port = 0
    if port == 0 or (port is None and re.search(r":[^\]]*$", parts.netloc.rpartition("@")[2])):
        raise HandlerLoadError("%s: the url's port must be a number from 1 to 65535" % where)
    if parts.fragment or url.endswith("#"):
        raise HandlerLoadError("%s: the url has a #fragment, which is never sent: remove it"
                               % where)
    return parts


def _forward_key(secret: str, where: str) -> bytes:
    key = b""
    if secret.startswith("whsec_"):
        try:
            key = signing_key(secret)  # the same reading of a whsec_ secret as --secret's
        except ConfigError:
            pass
    if not key:
        raise HandlerLoadError("%s: the secret must be whsec_ followed by base64, the Standard "
                               "Webhooks secret"
                               " the target verifies with" % where)
    return key


def _forward_timeout(text: str, where: str) -> float:
    try:
        seconds = parse_duration(text)
    except ValueError:
        seconds = 0.0
    if not 0 < seconds < float("inf"):
        raise HandlerLoadError("%s: timeout takes seconds above 0, such as 10, 2.5 or 500ms"
                               % where)
    return seconds


def webhook_id(event: Event, body: str) -> str:
    """The `webhook-id` of every POST of this event: "evt_" and 32 hex digits, the same on every
    attempt.

    Made only of what the inbox stored, never of the attempt: an event with a
    natural identity (a message, a call ...) hashes identity_key(), the key the
    inbox deduplicates by, so it is also the same on another host that got the
    same event (an active/standby pair) and equals all.nats.py's Nats-Msg-Id. One
    without (connected, typing ...) hashes its inbox row: bridge, inbox id,
    received_at and body; received_at keeps a new inbox file, whose ids start
    again at 1, from reusing an old id. Retries, restarts and `replay` read the
    same row, so a receiver that remembers ids drops what at-least-once repeats.
    """
    import hashlib
    key = identity_key(event.raw, event.bridge)
    if key is None:
        key = json.dumps([event.bridge or "", event.id, repr(event.received_at), body],
                         separators=(",", ":"))
    return "evt_" + hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()[:32]


class ForwardPool:
    """Idle keep-alive connections to forward targets, shared by every ForwardHandler of a Registry.

    Keyed by (scheme, host, port): two files naming the same target share its
    connections, and a reloaded file keeps them. A connection is taken out for
    one request and given back only after its reply was read to the end (a
    reply cut short, `Connection: close`, or one over FORWARD_REPLY_CAP closes
    it instead). At most FORWARD_IDLE_PER_TARGET stay idle per target; the
    connections in use are bounded by --workers, since a worker holds one at a
    time. A hung target holds up only the workers waiting on it, each for at
    most its file's timeout: no lock is held while a request is under way.
    """

    def __init__(self):
        # (scheme, host, port) -> [(an http.client.HTTPConnection, idle since)]
        self._idle: Dict[Tuple[str, str, int], List[tuple]] = {}
        self._lock = threading.Lock()
        self._tls = None  # the ssl.SSLContext for https targets, made on first use
        self._swept_at = time.monotonic()
        self._closed = False

    def post(self, target: ForwardTarget, body: bytes, headers: List[Tuple[str, str]],
             timeout: float) -> Tuple[int, bytes, str]:
        """POST `body` to the target: (status, the reply's first FORWARD_REPLY_CAP bytes, its
        Location).

        HandlerFailed when no reply came (connect, TLS, timeout, reset); the
        whole exchange, connecting included, takes at most `timeout` seconds.
        A kept-alive connection the target closed meanwhile fails the request
        (a reset or broken pipe while sending, or the connection closed before
        the reply's status line): that one is sent again, once, on a new
        connection; a new connection failing so is a failed attempt. The
        target may have taken the first one after all (and closed without
        answering); both carry the same webhook-id, so it can drop the second,
        as it drops any repeat that at-least-once allows.
        """
        import http.client  # here, not at the top: see _NoTLS
        deadline = time.monotonic() + timeout
        connection = self._take(target.address)
        reused = connection is not None
        connected = reused
        try:
            if connection is None:
                connection = self._connect(target, deadline)
                connected = True
            try:
                response, sock = self._send(connection, target, body, headers, deadline)
            except (ConnectionResetError, BrokenPipeError, ConnectionAbortedError) as exc:
                # RemoteDisconnected is a ConnectionResetError: the status line never came.
                if not reused:
                    raise
                connection.close()
                connection, connected = None, False
                self._log_stale(target, exc)
                connection = self._connect(target, deadline)
                connected = True
                response, sock = self._send(connection, target, body, headers, deadline)
            reply, complete = self._read_reply(response, sock, deadline)
        except socket.timeout:
            if connection is not None:
                connection.close()
            raise HandlerFailed("%s %s within %gs" % ("no answer from" if connected
                                                      else "cannot connect to",
                                                      target.where, timeout)) from None
        except (OSError, http.client.HTTPException) as exc:
            if connection is not None:
                connection.close()
            raise HandlerFailed(_connection_problem(target, exc)) from None
        # not the target's doing (a bug of ours): no connection left half-used
        except BaseException:
            if connection is not None:
                connection.close()
            raise
        if complete and connection.sock is not None:
            self._give(target.address, connection)
        else:
            connection.close()
        return response.status, reply, response.getheader("Location", "")

    def close(self) -> None:
        """Close every idle connection; those in use close when their request ends (shutdown)."""
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, {}
        for connections in idle.values():
            for connection, _since in connections:
                connection.close()

    def _take(self, address) -> "Optional[http.client.HTTPConnection]":
        """The most recently used idle connection to `address` that still looks open, or None."""
        stale = []
        found = None
        with self._lock:
            connections = self._idle.get(address, [])
            now = time.monotonic()
            while connections:
                connection, since = connections.pop()
                if now - since > FORWARD_IDLE_SECONDS:
                    stale.append(connection)
                    stale.extend(c for c, _since in connections)  # older still
                    connections.clear()
                elif _peer_closed(connection.sock):
                    stale.append(connection)
                else:
                    found = connection
                    break
        for connection in stale:
            connection.close()
        return found

    def _give(self, address, connection: "http.client.HTTPConnection") -> None:
        """Keep a connection whose reply was read to the end for the next request (or close it)."""
        now = time.monotonic()
        expired = []
        with self._lock:
            connections = self._idle.setdefault(address, [])
            if self._closed or len(connections) >= FORWARD_IDLE_PER_TARGET:
                expired.append(connection)
            else:
                connections.append((connection, now))
            # targets no longer used (a file edited)
            if now - self._swept_at > FORWARD_IDLE_SECONDS:
                self._swept_at = now
                for key in list(self._idle):
                    kept = [(c, since) for c, since in self._idle[key]
                            if now - since <= FORWARD_IDLE_SECONDS]
                    expired.extend(c for c, since in self._idle[key]
                                   if now - since > FORWARD_IDLE_SECONDS)
                    if kept:
                        self._idle[key] = kept
                    else:
                        del self._idle[key]
        for old in expired:
            old.close()

    def _connect(self, target: ForwardTarget, deadline: float) -> "http.client.HTTPConnection":
        import http.client
        remaining = _remaining(deadline)
        if target.scheme == "https":
            connection = http.client.HTTPSConnection(target.host, target.port, timeout=remaining,
                                                     context=self._tls_context())
        else:
            connection = http.client.HTTPConnection(target.host, target.port, timeout=remaining)
        try:
            connection.connect()
        except BaseException:
            connection.close()
            raise
        # Headers and body go out as two writes: without NODELAY the body waits for the
        # ACK of the headers, 40 ms on a delayed ACK (Python before 3.12? sets it; we make sure).
        connection.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return connection

    def _tls_context(self):
        """The one ssl.SSLContext for https targets."""
        with self._lock:  # one context: loading the system's CA certificates takes milliseconds
            if self._tls is None:
                self._tls = use_tls().create_default_context()
            return self._tls

    @staticmethod
    def _send(connection: "http.client.HTTPConnection", target: ForwardTarget, body: bytes,
              headers: List[Tuple[str, str]], deadline: float):
        """Send the request and read the reply's head: (response, its socket)."""
        sock = connection.sock
        sock.settimeout(_remaining(deadline))
        connection.putrequest("POST", target.target, skip_accept_encoding=True)
        for header_name, value in headers:
            connection.putheader(header_name, value)
        connection.putheader("Content-Length", str(len(body)))
        connection.endheaders(body)
        sock.settimeout(_remaining(deadline))
        # getresponse() drops connection.sock on Connection: close
        return connection.getresponse(), sock

    @staticmethod
    def _read_reply(response: "http.client.HTTPResponse", sock, deadline: float
                    ) -> Tuple[bytes, bool]:
        """(the reply's first FORWARD_REPLY_CAP bytes, whether it was read to its end), within the
        deadline."""
        parts, size = [], 0
        while size <= FORWARD_REPLY_CAP:
            # read to its end (on Connection: close, its socket is closed now)
            if response.isclosed():
                return b"".join(parts), True
            sock.settimeout(_remaining(deadline))  # a trickling reply cannot outlast the timeout
            chunk = response.read(16 * 1024)
            if not chunk:
                return b"".join(parts), True
            parts.append(chunk)
            size += len(chunk)
        return b"".join(parts)[:FORWARD_REPLY_CAP], False

    @staticmethod
    def _log_stale(target: ForwardTarget, exc: Exception) -> None:
        logging.getLogger("wabhook").debug("a kept-alive connection to %s was closed by "
                                           "the target (%s):"
                                           " sending again on a new one", target.where,
                                           type(exc).__name__)


def _remaining(deadline: float) -> float:
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise socket.timeout("timed out")
    return remaining


def _peer_closed(sock) -> bool:
    """Whether an idle connection's peer closed it (or sent what no request asked for): cheap, no
    wait.

    TLS connections are not looked at (their socket cannot peek, and a TLS 1.3
    server may send session tickets after the handshake); a closed one fails
    its next request before any reply byte, which post() sends again.
    """
    if sock is None:
        return True
    if isinstance(sock, SSLSocket):
        return False
    timeout = sock.gettimeout()
    sock.settimeout(0.0)  # a socket with a timeout would wait for data to peek at
    try:
        sock.recv(1, socket.MSG_PEEK)  # b"": closed; a byte: not ours to read
        return True
    except BlockingIOError:
        return False  # nothing to read: open and quiet, as an idle connection should be
    except OSError:
        return True
    finally:
        sock.settimeout(timeout)


def _connection_problem(target: ForwardTarget, exc: Exception) -> str:
    """One sentence for a delivery that got no reply."""
    import http.client
    ssl = use_tls()  # imported already by http.client
    if isinstance(exc, ssl.SSLCertVerificationError):
        return "the TLS certificate of %s is not trusted: %s" % (target.where, exc.verify_message
                                                                 or exc)
    if isinstance(exc, ssl.SSLError):
        return "TLS with %s failed: %s" % (target.where, exc.reason or exc)
    if isinstance(exc, socket.gaierror):
        return "cannot resolve %s: %s" % (target.host, exc.strerror or exc)
    if isinstance(exc, ConnectionRefusedError):
        return "%s refused the connection (is the target running?)" % target.where
    if isinstance(exc, http.client.RemoteDisconnected):
        return "%s closed the connection without answering" % target.where
    if isinstance(exc, http.client.HTTPException):
        return "%s answered with something other than HTTP/1.x: %s" % (target.where,
                                                                       type(exc).__name__)
    return "cannot reach %s: %s" % (target.where, exc.strerror or exc if isinstance(exc, OSError)
                                    else exc)


def _load_forward_file(name: str, path: str, environ: Dict[str, str]) -> Tuple[ForwardTarget,
                                                                               tuple]:
    """(the target, the file's signature as read), waiting out a save in progress.

    A file that changes while read, or that is wrong and was modified within
    SETTLE_SECONDS (an editor's truncate-then-write, a checkout), is read
    again until it settles; then its error stands.
    """
    deadline = time.monotonic() + SETTLE_SECONDS * 2
    while True:
        signature = _signature(path)
        with open(path, "rb") as handle:
            data = handle.read()
        if _signature(path) == signature or time.monotonic() > deadline:
            try:
                try:
                    text = data.decode("utf-8-sig")
                except UnicodeDecodeError:
                    raise HandlerLoadError("%s is not UTF-8 text: save it as UTF-8"
                                           % name) from None
                return parse_forward_file(text, environ, name), signature
            except HandlerLoadError:
                if (time.time() - signature[0] / 1e9 >= SETTLE_SECONDS
                        or time.monotonic() > deadline):
                    raise
        time.sleep(0.05)


class ForwardHandler:
    """A `<event>[.<label>].forward` file: POST each event's body to the URL it names; a 2xx is
    success.

    The file is read when loaded; the Registry loads it again when it changes,
    like any handler. Its ${VAR}s are filled in then, from wabhook's own
    environment, which is fixed when wabhook starts: a new value takes a restart.
    """

    form = "forward"

    def __init__(self, name: str, path: str, signature, target: ForwardTarget):
        self.name, self.path, self.signature, self.target = name, path, signature, target

    @classmethod
    def load(cls, name: str, path: str, environ: Dict[str, str]) -> "ForwardHandler":
        """Read and check a .forward file; HandlerLoadError if it is not usable."""
        target, signature = _load_forward_file(name, path, environ)
        return cls(name, path, signature, target)

    def run(self, event: Event, body: str, context: "RunContext") -> None:
        """POST the event's body as stored (or wrapped); HandlerFailed unless the target answers 2xx
        in time."""
        sent = body
        if self.target.wrap == "kafka":
            sent = json.dumps({"records": [{"key": lane_of(event.raw, event.bridge),
                                            "value": event.raw}]})
        payload = sent.encode("utf-8")
        timeout = min(self.target.timeout, context.timeout)  # the file's, within --script-timeout
        status, reply, location = context.connections.post(self.target, payload,
                                                           self.headers(event, body, payload),
                                                           timeout)
        if 200 <= status < 300:
            return None
        text = _printable(reply.decode("utf-8", "replace").strip(), 200)
        if 300 <= status < 400 and location:
            text = "a redirect to %s, which wabhook does not follow: put that URL in %s" % (
                _printable(location, 200), self.name)
        raise HandlerFailed("target answered %d%s" % (status, ": " + text if text else ""))

    def headers(self, event: Event, body: str, payload: bytes) -> List[Tuple[str, str]]:
        """The file's headers, then the defaults it does not replace, then the Standard Webhooks
        ones."""
        headers = list(self.target.headers)
        written = {header_name.lower() for header_name, _value in headers}
        if "content-type" not in written:
            headers.append(("Content-Type", FORWARD_WRAPS.get(self.target.wrap or "",
                                                              "application/json")))
        if "user-agent" not in written:
            headers.append(("User-Agent", "wabhook/" + __version__))
        message_id, timestamp = webhook_id(event, body), str(int(time.time()))
        headers += [("webhook-id", message_id), ("webhook-timestamp", timestamp)]
        if self.target.key is not None:
            headers.append(("webhook-signature", webhook_signature(self.target.key, message_id,
                                                                   timestamp, payload)))
        return headers


SCRIPT_ENVIRONMENT = ("PATH", "HOME", "LANG", "TZ")


def script_environment(config: Config, environ: Dict[str, str]) -> Dict[str, str]:
    """What every script's environment starts from: PATH, HOME, LANG, TZ and the --script-env names.

    Never the server's whole environment: WABHOOK_TOKEN and WABHOOK_SECRET
    (the way a systemd unit passes them) must not reach every script.
    """
    names = SCRIPT_ENVIRONMENT + tuple(name for name in config.script_env
                                       if name not in SCRIPT_ENVIRONMENT)
    return {name: environ[name] for name in names if name in environ}


def make_importable(folder: str) -> None:
    """Put the handlers folder on sys.path, so handlers can `import _common`."""
    folder = os.path.abspath(folder)
    if folder not in sys.path:
        sys.path.insert(0, folder)


# How many event types without a handler are named in the log, once each (see _say_unhandled).
UNHANDLED_TYPES_NAMED = 1000


class Registry:
    """The handlers folder: which handlers exist, loading and reloading them.

    The folder is listed again at most every RESCAN_SECONDS; a handler is
    reloaded when its file changes (mtime, size or inode: in-place writes and
    write-and-rename saves both show) and forgotten once it has been gone for
    SETTLE_SECONDS. Python helpers (`_*.py`) are re-imported when they change.
    """

    def __init__(self, folder: str, log: Optional[logging.Logger] = None,
                 environ: Optional[Dict[str, str]] = None):
        self.folder = os.path.abspath(folder)
        self.log = log or logging.getLogger("wabhook")
        self._warned: Dict[str, tuple] = {}      # name -> signature of the file last warned about
        self._said_unhandled: set = set()        # event types logged as arriving with no handler
        self._said_too_many = False
        self._loading: Dict[str, threading.Lock] = {}  # name -> held while that file is (re)loaded
        self._folder_checked_at, self._folder_missing = float("-inf"), False
        self._lock = threading.RLock()
        self._listed_at = 0.0
        self._files: Dict[str, tuple] = {}       # name -> signature, as last listed
        self._last_seen: Dict[str, float] = {}   # name -> when it was last listed
        # name -> PythonHandler | ScriptHandler | ForwardHandler
        self._loaded: Dict[str, object] = {}
        self._checked: Dict[str, float] = {}     # name -> when a stat last found it unchanged
        self._helpers: Dict[str, tuple] = {}     # _helper.py -> signature
        self.environ = dict(environ or {})       # what ${VAR} in a .forward file reads
        make_importable(self.folder)

    def _list(self, force: bool = False):
        now = time.monotonic()
        if not force and now - self._listed_at < RESCAN_SECONDS:
            return
        self._listed_at = now
        files, helpers = {}, {}
        try:
            names = os.listdir(self.folder)
        except OSError:
            # The folder itself is gone (moved, a deploy swapping it): nothing in it is
            # trusted as deleted. The dispatcher waits for it (see Dispatcher._loop).
            return
        for name in names:
            path = os.path.join(self.folder, name)
            try:
                signature = _signature(path)
            except OSError:
                continue
            if not (signature[3] & 0o170000 == 0o100000):  # regular files only
                continue
            if name.startswith("_") and name.endswith(".py"):
                helpers[name] = signature
            elif is_handler_file(name, signature[3]):
                files[name] = signature
                self._last_seen[name] = now
        for name in set(self._files) - set(files):
            self._last_seen[name] = now  # first seen missing now: gone SETTLE_SECONDS from here
        for name, seen in list(self._last_seen.items()):
            if name not in files and now - seen >= SETTLE_SECONDS:
                del self._last_seen[name]
                self._loaded.pop(name, None)
                self._warned.pop(name, None)
                self.log.info("dropped handler %s: its file is gone; events from now on "
                              "do not go to it", name)
        if helpers != self._helpers:
            self._forget_helpers([name for name in helpers
                                  if helpers[name] != self._helpers.get(name)])
            self._helpers = helpers
        self._files = files

    def _forget_helpers(self, changed: List[str]):
        """Drop imported helper modules of the folder, so handlers re-import the new code."""
        # a .pyc is checked by whole-second mtime and size only: a quick re-save fools it
        for name in changed:
            with contextlib.suppress(OSError):
                os.remove(importlib.util.cache_from_source(os.path.join(self.folder, name)))
        for module_name, module in list(sys.modules.items()):
            module_file = getattr(module, "__file__", None) or ""
            if module_file and os.path.dirname(os.path.abspath(module_file)) == self.folder:
                del sys.modules[module_name]
        self._loaded = {name: h for name, h in self._loaded.items() if h.form != "python"}

    def folder_missing(self, within: float = 0.0) -> bool:
        """Whether the handlers folder is gone, as seen at most `within` seconds ago."""
        now = time.monotonic()
        if now - self._folder_checked_at >= within:
            self._folder_checked_at, self._folder_missing = now, not os.path.isdir(self.folder)
        return self._folder_missing

    def names(self) -> List[str]:
        """Every handler present now (or gone for less than SETTLE_SECONDS), sorted."""
        with self._lock:
            self._list()
            now = time.monotonic()
            present = set(self._files)
            present |= {name for name, seen in self._last_seen.items()
                        if now - seen < SETTLE_SECONDS}
            return sorted(present)

    def fresh_lookup(self) -> Callable[[str], List[str]]:
        """handlers_for() over a listing of the folder taken at its first call.

        One fan-out pass uses one: an event goes to the handlers present when it
        is dispatched, even one added a moment ago.
        """
        found: Dict[str, List[str]] = {}

        def lookup(event_type: str) -> List[str]:
            if not found:
                with self._lock:
                    self._list(force=True)
                found[""] = []  # listed
            if event_type not in found:
                found[event_type] = self.handlers_for(event_type)
                if (not found[event_type] and event_type not in self._said_unhandled
                        and self._say_unhandled(event_type)):
                    self.log.info("a %s event arrived and no handler takes it: add "
                                  "handlers/%s.py (or an"
                                  " all.py) to handle such events (said once per type)",
                                  event_type, event_type if re.fullmatch(r"[\w-]{1,64}", event_type)
                                  else "<type>")
            return found[event_type]
        return lookup

    def _say_unhandled(self, event_type: str) -> bool:
        """Whether to name this type in the log: the types named are remembered, up to
        UNHANDLED_TYPES_NAMED of them (a sender that makes up types must not grow memory)."""
        if len(self._said_unhandled) < UNHANDLED_TYPES_NAMED:
            self._said_unhandled.add(event_type)
            return True
        if not self._said_too_many:
            self._said_too_many = True
            self.log.warning("more than %d event types arrived with no handler; no more of them "
                             "are named in the log", UNHANDLED_TYPES_NAMED)
        return False

    def handlers_for(self, event_type: str) -> List[str]:
        """Names of the handlers an event of this type goes to: its own, then `all*`."""
        names = self.names()
        own = [n for n in names if handler_event(n) == event_type]
        return own + [n for n in names if handler_event(n) == ALL_EVENTS and n not in own]

    def get(self, name: str, claimed_at: float):
        """The loaded handler, (re)loaded if its file changed; HandlerGone if it stays gone.

        A run whose event was claimed at `claimed_at` (time.monotonic()) gets
        code at least as new as the file was then: a stat, or another run's
        stat made since and less than SHARED_CHECK_SECONDS ago. So a claim of
        several events costs one stat, not one each: a stat gives up the
        interpreter lock and waits to take it back, and with the loop's look
        for the folder, one a run took a tenth of a backlog's drain here.
        """
        cached = self._loaded.get(name)
        if cached is not None:
            checked, now = self._checked.get(name, float("-inf")), time.monotonic()
            if claimed_at <= checked and now - checked < SHARED_CHECK_SECONDS:
                return cached
            with contextlib.suppress(OSError):
                if _signature(cached.path) == cached.signature:
                    self._checked[name] = now  # taken before the stat: it saw the file as of then
                    return cached  # unchanged: one stat, not a listing of the folder per run
        deadline = time.monotonic() + SETTLE_SECONDS
        while True:
            with self._lock:
                self._list(force=True)
                signature = self._files.get(name)
                cached = self._loaded.get(name)
            if signature is not None:
                if cached is not None and cached.signature == signature:
                    return cached
                # Loading runs the handler's module code: not under the lock, so
                # a slow import cannot stall fan-out or the other workers.
                # one load a file: workers starting together share it
                with self._loading_lock(name):
                    current = self._loaded.get(name)
                    if current is not None and current.signature == signature:
                        return current
                    try:
                        handler = self._load(name, signature)
                    except FileNotFoundError:
                        continue  # removed since it was listed (a git checkout): look for it again
                    except HandlerLoadError as exc:
                        self._warn_once(name, signature, str(exc))
                        raise
                    with self._lock:
                        self._loaded[name] = handler
                self.log.info("%s handler %s", "reloaded" if cached is not None else "loaded", name)
                return handler
            if time.monotonic() > deadline:
                raise HandlerGone("handler file %s was removed" % name)
            time.sleep(0.05)

    def _loading_lock(self, name: str) -> threading.Lock:
        with self._lock:
            return self._loading.setdefault(name, threading.Lock())

    def _load(self, name: str, signature) -> object:
        """A handler object for the file, or HandlerLoadError saying what to fix."""
        path = os.path.join(self.folder, name)
        if name.endswith(".py"):
            return PythonHandler.load(name, path)
        if name.endswith(FORWARD_SUFFIX):  # by name, whatever its mode: settings, not a program
            return ForwardHandler.load(name, path, self.environ)
        problem = script_problem(name, path)
        if problem:
            raise HandlerLoadError("%s %s" % (name, problem))
        return ScriptHandler(name, path, signature)

    def _warn_once(self, name: str, signature, problem: str) -> None:
        """One WARNING for a broken handler, when first seen and after each change of its file."""
        if self._warned.get(name) != signature:
            self._warned[name] = signature
            self.log.warning("broken handler %s: %s; its events wait for the fix (%s check says"
                             " the same)", name, problem.rstrip(), _program_name(),
                             extra={"handler": name})


class HandlerOutput:
    """Stands in for sys.stdout/sys.stderr while serving.

    What a Python handler prints becomes log lines attributed to the handler
    and its event (like a script's output); every other thread writes through
    to the real stream unchanged. At most OUTPUT_CAP bytes a run are logged.
    """

    def __init__(self, stream, log: logging.Logger, level: int):
        self._stream, self._log, self._level = stream, log, level
        self._context = threading.local()

    @contextlib.contextmanager
    def attributed_to(self, handler: str, event_id: int, captured: Optional[List[str]] = None):
        """Route this thread's writes to the log for the duration of one handler run (and to
        `captured`)."""
        self._context.run = {"handler": handler, "event_id": event_id, "partial": "", "logged": 0,
                             "captured": captured if captured is not None else []}
        try:
            yield
        finally:
            run, self._context.run = self._context.run, None
            if run["partial"]:
                self._emit(run, run["partial"])

    def write(self, text):
        """Log a handler run's writes line by line (and capture them); else pass them on."""
        run = getattr(self._context, "run", None)
        if run is None or getattr(self._context, "emitting", False):
            return self._stream.write(text)
        lines = (run["partial"] + text).split("\n")
        run["partial"] = lines.pop()
        for line in lines:
            self._emit(run, line)
        return len(text)

    def _emit(self, run, line: str):
        run["logged"] += len(line)
        if run["logged"] > OUTPUT_CAP:
            return
        if run["logged"] <= OUTPUT_KEPT:
            run["captured"].append(line + "\n")
        self._context.emitting = True  # a log handler writing to this stream must not loop back
        try:
            self._log.log(self._level, "%s | %s", run["handler"], line,
                          extra={"handler": run["handler"], "event_id": run["event_id"]})
        finally:
            self._context.emitting = False

    def flush(self):
        """Flush the underlying stream, unless a handler run's lines are being logged."""
        if getattr(self._context, "run", None) is None:
            self._stream.flush()

    def __getattr__(self, name):
        return getattr(self._stream, name)


Problem = namedtuple("Problem", "file message")


def check_handlers(folder: str, environ: Optional[Dict[str, str]] = None) -> Tuple[List[str],
                                                                                   List[Problem]]:
    """Load every handler in `folder` as the server would: (handler names that are fine, problems
    found)."""
    problems: List[Problem] = []
    good: List[str] = []
    if os.path.exists(folder) and not os.path.isdir(folder):
        return good, [Problem(folder, "is a file, not a folder: pass the folder your "
                                      "handlers are in")]
    if not os.path.isdir(folder):
        return good, [Problem(folder, "the handlers folder does not exist (create it, or pass "
                                      "--handlers DIR)")]
    registry = Registry(folder, log=logging.getLogger("wabhook.check"), environ=environ)
    registry.log.disabled = True  # the problems are printed, not logged
    registry._list(force=True)
    for name, signature in sorted(registry._files.items()):
        meant = near_event(handler_event(name))
        if meant:
            problems.append(Problem(name, "%r matches no documented event; did you mean "
                                          "%s? (name it %s)"
                                    % (handler_event(name), meant, meant
                                       + name[len(handler_event(name)):])))
            continue
        try:
            registry._load(name, signature)
        except HandlerLoadError as exc:
            problems.append(Problem(name, str(exc).rstrip()))
            continue
        good.append(name)
    return good, problems


# ---------------------------------------------------------------------------
# 5. Dispatch
# ---------------------------------------------------------------------------

RETRY_DELAY_CAP = 3600.0
IDLE_POLL_SECONDS = 1.0     # other processes (the CLI's replay, a second server) are seen this fast
# Events leased, at most, per worker (the runs and the claims waiting for a worker). With 2, a
# waiting claim waits at most one run (at most --script-timeout), so its delivery, `running`
# from its claim on, never looks stuck to /healthz (running for longer than --script-timeout
# plus its lease). 4 drained a backlog a tenth faster here, but a claim could wait three runs.
CLAIMS_AHEAD = 2
# at start, then this often (or every --retention if shorter, at most every second)
PRUNE_EVERY_SECONDS = 600.0


def retry_delay(attempt: int, base: float, cap: float = RETRY_DELAY_CAP,
                rand: Callable[[], float] = random.random) -> float:
    """Seconds to wait after failed attempt number `attempt` (1 = the first run).

    Exponential: base, 2*base, 4*base ... capped at `cap`, then spread by
    +/-25% jitter so handlers failing together do not retry in lockstep.
    """
    doublings = min(max(attempt - 1, 0), 64)  # 2.0 ** 1024 overflows; the cap comes long before
    delay = min(cap, base * (2.0 ** doublings))
    return delay * (0.75 + 0.5 * rand())


def _owner_is_dead(owner: str) -> bool:
    """True when a lease owner ("host:pid:nonce") is a process of this host that no longer runs."""
    host, _, rest = owner.partition(":")
    pid_text = rest.partition(":")[0]
    if host != socket.gethostname() or not pid_text.isdigit():
        return False
    pid = int(pid_text)
    if pid == os.getpid():
        return False  # ourselves: leases are renewed while we live
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


class RunContext:
    """What a handler run needs besides its event, owned by the dispatcher: the time it may take
    (--script-timeout), a script's environment, the live script processes (killed at shutdown),
    the forwarders' keep-alive connections, and the log its output goes to."""

    def __init__(self, timeout: float, environment: Dict[str, str], log: logging.Logger):
        self.timeout, self.environment, self.log = timeout, environment, log
        self.processes: set = set()
        self.connections = ForwardPool()

    def kill_running(self) -> None:
        """Kill the process group of every script still running (shutdown)."""
        for process in list(self.processes):
            _kill_group(process.pid)


class _Run:
    """What one worker thread is running now; the watchdog may abandon it."""

    __slots__ = ("claim", "handler", "form", "started", "abandoned", "output", "exit_status")

    def __init__(self, claim: Claim, handler: str):
        self.claim, self.handler, self.form = claim, handler, None
        self.started, self.abandoned = time.monotonic(), False
        self.output: List[str] = []  # what the run printed
        self.exit_status: Optional[int] = None


class Dispatcher:
    """Claims due events from the inbox and runs their handlers in a pool of threads.

    One loop thread claims (a lease in the inbox, at most one event per idle
    lane) as long as workers are free, and renews leases, recovers those of
    dead processes, and prunes. Worker threads run the handlers of a claim one
    after another and record each outcome as soon as it is known.
    """

    def __init__(self, config: Config, inbox: Inbox, registry: Registry, metrics: "Metrics",
                 log: logging.Logger, script_environment: Optional[Dict[str, str]] = None):
        self.config, self.inbox, self.registry, self.metrics, self.log = (
            config, inbox, registry, metrics, log)
        self.context = RunContext(config.script_timeout, script_environment or {}, log)
        self.owner = "%s:%d:%s" % (socket.gethostname(), os.getpid(), os.urandom(4).hex())
        self._tasks: "queue.Queue[Optional[Claim]]" = queue.Queue()
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._stop_waiting = threading.Event()
        self._idle = threading.Condition()
        self._busy = 0
        self._runs: Dict[int, _Run] = {}
        # outcomes the inbox could not take yet (see _store_outcome)
        self._unrecorded: List[tuple] = []
        self._recording_failed = False
        self._next_worker = 0
        self._loop_thread: Optional[threading.Thread] = None

    def start(self) -> None:
        """Take back runs a stopped process left, then start the workers and the loop."""
        recovered = self.inbox.recover_leases(self.after_failure, _owner_is_dead)
        if recovered:
            self.log.warning("took back %d deliveries left running by a stopped process", recovered)
        for _ in range(self.config.workers):
            self._start_worker()
        self._loop_thread = threading.Thread(target=self._loop, name="wabhook-dispatch",
                                             daemon=True)
        self._loop_thread.start()

    def wake(self) -> None:
        """Tell the loop there may be something to claim (a new event). A no-op while every worker
        is busy:
        a finishing worker wakes the loop itself, so a burst of acks behind hung handlers costs
        nothing here."""
        if self._wants_claims():
            self._wake.set()

    @property
    def busy(self) -> int:
        """Handler runs in progress now."""
        return len(self._runs)

    def _start_worker(self) -> None:
        worker_id = self._next_worker
        self._next_worker += 1
        threading.Thread(target=self._work, args=(worker_id,), name="wabhook-worker-%d" % worker_id,
                         daemon=True).start()

    # -- the loop ----------------------------------------------------------

    def _loop(self) -> None:
        last_upkeep, last_prune, last_fan_out, failing = 0.0, float("-inf"), float("-inf"), False
        folder_missing = False
        prune_every = max(1.0, min(PRUNE_EVERY_SECONDS, self.config.retention))
        while not self._stopping.is_set():
            self._wake.clear()
            now = time.monotonic()
            try:
                if now - last_upkeep >= LEASE_SECONDS / 3:
                    last_upkeep = now
                    self.inbox.renew_leases(self.owner)
                    self.inbox.recover_leases(self.after_failure, _owner_is_dead)
                if now - last_prune >= prune_every:
                    last_prune = now
                    pruned = self.inbox.prune(self.config.retention)
                    if pruned:
                        self.log.info("pruned %d delivered events older than the retention", pruned)
                self._abandon_overdue_runs()
                self._retry_unrecorded()
                claims, wait = [], IDLE_POLL_SECONDS
                # as the intake does, at most every FOLDER_CHECK_SECONDS: not a stat a claim
                if self.registry.folder_missing(FOLDER_CHECK_SECONDS):
                    # Not a folder of no handlers: fanning out now would mark every event done.
                    if not folder_missing:
                        self.log.error("the handlers folder %s is missing; events are "
                                       "stored and wait for"
                                       " it to come back", self.registry.folder)
                    folder_missing = True
                elif self._wants_claims() or now - last_fan_out >= IDLE_POLL_SECONDS:
                    # a listing, at most every RESCAN_SECONDS: drops are seen (and logged)
                    self.registry.names()
                    if folder_missing:
                        self.log.info("the handlers folder %s is back; dispatching resumes",
                                      self.registry.folder)
                    folder_missing = False
                    # With enough claimed, new events are still fanned out (so an event no
                    # handler wants is done) once a poll, not once an ack.
                    last_fan_out = now
                    limit = (CLAIMS_AHEAD * self.config.workers - self._busy
                             if self._wants_claims() else 0)
                    claims = self.inbox.claim_due(self.owner, limit, self.registry.fresh_lookup())
                    wait = self._idle_wait(claims)
                if failing:
                    self.log.info("the inbox is writable again; dispatching resumes")
                failing = False
            except InboxUnavailable as exc:
                if not failing:
                    self.log.error("cannot dispatch: %s (retrying every second)", exc)
                failing, claims, wait = True, [], IDLE_POLL_SECONDS
            for claim in claims:
                with self._idle:
                    self._busy += 1
                self._tasks.put(claim)
            self._wake.wait(wait)

    def _wants_claims(self) -> bool:
        """Whether to claim more: a worker is free, and the events leased (running or waiting for
        a worker) are at most half of the CLAIMS_AHEAD times --workers that may be.

        Claims are made ahead, up to CLAIMS_AHEAD times --workers in all, so a
        worker that finishes finds its next event already leased instead of
        waiting for a claim transaction; claiming only once half of them are
        taken makes one claim serve several workers. Nothing is claimed ahead
        of workers that are all stuck in handlers.
        """
        return (len(self._runs) < self.config.workers
                and self._busy <= CLAIMS_AHEAD * self.config.workers // 2)

    def _idle_wait(self, claims: List[Claim]) -> float:
        """How long the loop may sleep when nothing wakes it (a finishing worker, a new event)."""
        if not self._wants_claims():
            return IDLE_POLL_SECONDS
        if claims or self.inbox.has_undispatched():
            return 0.0  # there may be more to claim right away
        due = self.inbox.next_retry_at()
        if due is None:
            return IDLE_POLL_SECONDS
        return min(IDLE_POLL_SECONDS, max(0.0, due - time.time()))

    def _abandon_overdue_runs(self) -> None:
        """A Python handler past --script-timeout cannot be killed: fail the run and replace its
        worker."""
        limit = self.config.script_timeout
        overdue = []
        with self._idle:
            for worker_id, run in list(self._runs.items()):
                if (run.form == "python" and not run.abandoned
                        and time.monotonic() - run.started > limit):
                    run.abandoned = True
                    del self._runs[worker_id]
                    self._busy -= 1
                    overdue.append(run)
        for run in overdue:
            self.log.error("handler %s is still running event %d after %gs; its result "
                           "will be ignored"
                           " and its thread left to finish", run.handler, run.claim.event_id, limit,
                           extra={"handler": run.handler, "event_id": run.claim.event_id})
            self._record(run.claim, run.handler, "failed",
                         "timed out after %gs (Python handlers cannot be killed; the run "
                         "was abandoned)" % limit,
                         limit, run)
            rest = run.claim.handlers[run.claim.handlers.index(run.handler) + 1:]
            if rest:
                self.inbox.release_leases(self.owner, run.claim.event_id, rest)
            self._start_worker()

    # -- the workers -------------------------------------------------------

    def _work(self, worker_id: int) -> None:
        while True:
            claim = self._tasks.get()
            if claim is None:
                return
            try:
                if self._run_claim(worker_id, claim):
                    return  # abandoned by the watchdog: a replacement took our place
            except Exception:
                # A bug of ours, not a handler's (those are caught per run): the worker lives on.
                with self._idle:
                    self._runs.pop(worker_id, None)
                self._fail_claim(claim, "wabhook failed while running it:\n"
                                 + traceback.format_exc())
            with self._idle:
                self._busy -= 1
                self._idle.notify_all()
            self.wake()

    def after_failure(self, attempt: int) -> Tuple[str, float]:
        """The one decision after failed attempt number `attempt`: ("pending", retry time) or
        ("dead", 0)."""
        if attempt >= self.config.retries:
            return "dead", 0.0
        return "pending", time.time() + retry_delay(attempt, self.config.retry_delay)

    def _fail_claim(self, claim: Claim, error: str) -> None:
        """Record the claim's unfinished runs as failed, so a lasting bug is retried with backoff,
        not spun."""
        self.log.error("failed while running event %d:\n%s", claim.event_id, error)
        for handler in claim.handlers:  # runs recorded already are skipped: their lease is gone
            status, retry_at = self.after_failure(claim.attempts.get(handler, 1))
            self._store_outcome((claim.event_id, handler, status, error, retry_at, None, None))

    def _run_claim(self, worker_id: int, claim: Claim) -> bool:
        """Run every handler of a claim in turn; True if the watchdog abandoned this thread."""
        for index, handler_name in enumerate(claim.handlers):
            if self._stopping.is_set():
                self.inbox.release_leases(self.owner, claim.event_id, claim.handlers[index:])
                return False
            run = _Run(claim, handler_name)
            with self._idle:
                self._runs[worker_id] = run
            outcome, error, duration = self._run_handler(run)
            with self._idle:
                if run.abandoned:
                    return True
                self._runs.pop(worker_id, None)
            # the whole handlers folder vanished: nothing ran, nothing counts
            if outcome == "released":
                self.inbox.release_leases(self.owner, claim.event_id, claim.handlers[index:])
                return False
            self._record(claim, handler_name, outcome, error, duration, run)
        return False

    def _run_handler(self, run: _Run) -> Tuple[str, Optional[str], float]:
        """(outcome, error, seconds): outcome is ok, failed or skipped."""
        started = time.monotonic()
        claim = run.claim
        try:
            # its prints while loading count too
            with self._attributed(run.handler, claim.event_id, run.output):
                handler = self.registry.get(run.handler, claim.claimed_at)
                run.form = handler.form
                event = parse_event(json.loads(claim.body), claim.bridge, claim.event_id,
                                    claim.received_at)
                result = handler.run(event, claim.body, self.context)
            if result is not None:  # a script: its exit status and output
                run.exit_status, run.output[:] = result[0], [result[1]]
            return "ok", None, time.monotonic() - started
        except HandlerGone as exc:
            if self.registry.folder_missing():
                return "released", str(exc), time.monotonic() - started
            return "skipped", str(exc), time.monotonic() - started
        except HandlerFailed as exc:
            if exc.output is not None:
                run.output[:] = [exc.output]
            run.exit_status = exc.exit_status
            return "failed", str(exc), time.monotonic() - started
        except HandlerLoadError as exc:
            return "failed", str(exc), time.monotonic() - started
        except BaseException:  # a handler's exception, even SystemExit, is a failed run
            return "failed", traceback.format_exc(), time.monotonic() - started

    def _attributed(self, handler: str, event_id: int, captured: List[str]):
        """While a handler runs, its prints go to the log as `handler | line` (see HandlerOutput)
        and to `captured`."""
        stack = contextlib.ExitStack()
        for stream in (sys.stdout, sys.stderr):
            if isinstance(stream, HandlerOutput):
                stack.enter_context(stream.attributed_to(handler, event_id, captured))
        return stack

    def _record(self, claim: Claim, handler: str, outcome: str, error: Optional[str],
                duration: float,
                run: _Run) -> None:
        attempt = claim.attempts.get(handler, 1)
        extra = {"handler": handler, "event_id": claim.event_id}
        self.metrics.handler_run(handler, outcome, duration)
        if outcome == "ok":
            status, retry_at = "done", 0.0
            self.log.debug("handler %s handled event %d in %.3fs", handler, claim.event_id,
                           duration, extra=extra)
        elif outcome == "skipped":
            status, retry_at = "skipped", 0.0  # shown as such: the handler never saw the event
            self.log.warning("handler %s skipped event %d: %s", handler, claim.event_id, error,
                             extra=extra)
        else:
            status, retry_at = self.after_failure(attempt)
            if status == "dead":
                self.log.error("handler %s failed event %d (attempt %d of %d), dead-lettered;"
                               " replay it with `%s replay %d`:\n%s", handler, claim.event_id,
                               attempt,
                               self.config.retries, _program_name(), claim.event_id, error,
                               extra=extra)
            else:
                self.log.warning("handler %s failed event %d (attempt %d of %d), next try "
                                 "in %.1fs:\n%s",
                                 handler, claim.event_id, attempt, self.config.retries,
                                 retry_at - time.time(),
                                 error, extra=extra)
        output = "".join(run.output)
        if len(output) > OUTPUT_KEPT:
            output = (output[:OUTPUT_KEPT]
                      + "\n[%d more characters not kept]" % (len(output) - OUTPUT_KEPT))
        self._store_outcome((claim.event_id, handler, status, error, retry_at, output or None,
                             run.exit_status))

    def _store_outcome(self, outcome: tuple) -> None:
        """Record a run's outcome without waiting for the commit (it joins the next batch).

        One the inbox cannot take now (locked, disk full) is kept, its lease
        renewed, and recorded by the loop once the inbox is writable again, so
        its chat is not held up past the fault; if this process dies
        meanwhile, the lease runs out and the run is repeated: at least once.
        """
        def stored(_updated, error):
            if error is None:
                return
            with self._idle:
                self._unrecorded.append(outcome)
                first, self._recording_failed = not self._recording_failed, True
            if first:
                self.log.error("cannot record handler outcomes: %s; they are kept and "
                               "recorded once the"
                               " inbox is writable", error)
        event_id, handler, status, error, retry_at, output, exit_status = outcome
        self.inbox.record_outcome(event_id, handler, self.owner, status, error, retry_at,
                                  on_done=stored,
                                  output=output, exit_status=exit_status)

    def _retry_unrecorded(self) -> None:
        with self._idle:
            outcomes, self._unrecorded = self._unrecorded, []
            if not outcomes and self._recording_failed:
                self._recording_failed = False
                self.log.info("handler outcomes are recorded again")
        for outcome in outcomes:
            self._store_outcome(outcome)

    # -- shutdown ----------------------------------------------------------

    def stop_waiting(self) -> None:
        """End stop()'s wait for running handlers now (a second SIGTERM); safe from a signal
        handler."""
        self._stop_waiting.set()

    def stop(self, timeout: float) -> bool:
        """Stop claiming, let running handlers finish within `timeout` (or until stop_waiting()),
        give back the rest.

        True if every running handler finished in time.
        """
        self._stopping.set()
        self._wake.set()
        if self._loop_thread is not None:
            self._loop_thread.join()
        while True:  # claims queued but not started go back untouched
            try:
                claim = self._tasks.get_nowait()
            except queue.Empty:
                break
            if claim is not None:
                with contextlib.suppress(InboxUnavailable):
                    self.inbox.release_leases(self.owner, claim.event_id, claim.handlers)
                with self._idle:
                    self._busy -= 1
        deadline = time.monotonic() + timeout
        with self._idle:
            while (self._busy > 0 and time.monotonic() < deadline
                   and not self._stop_waiting.is_set()):
                self._idle.wait(min(0.1, max(0.0, deadline - time.monotonic())))
            finished = self._busy <= 0
        if not finished:
            if self._stop_waiting.is_set():
                self.log.warning("a second signal: %d running handler runs abandoned; they "
                                 "go back to the"
                                 " inbox", self._busy)
            else:
                self.log.warning("%d handler runs did not finish within %gs; they go "
                                 "back to the inbox",
                                 self._busy, timeout)
            with contextlib.suppress(InboxUnavailable):
                self.inbox.release_leases(self.owner)
            self.context.kill_running()
        for _ in range(self._next_worker):
            self._tasks.put(None)
        return finished


# ---------------------------------------------------------------------------
# 6. HTTP front
# ---------------------------------------------------------------------------

SIGNATURE_TOLERANCE = 300   # seconds a Standard Webhooks timestamp may be off
MAX_EVENT_TYPE = 128        # characters in an event's type
MAX_JSON_CONTAINERS = 10000  # arrays and objects in a body (brackets counted, strings included)
MAX_JSON_DEPTH = 100         # how deep they may nest: any JSON parser a script uses copes with that
CHUNK_LINE_LIMIT = 1024
READ_CHUNK = 64 * 1024


class HTTPError(Exception):
    """A refused request: its status, a stable error code, and a message safe to show."""

    status = 500

    def __init__(self, code: str, message: str, close: bool = False, headers: Tuple = ()):
        super().__init__(message)
        self.code, self.message, self.close, self.headers = code, message, close, headers


class BadRequest(HTTPError):
    """400."""
    status = 400


class Unauthorized(HTTPError):
    """401."""
    status = 401


class NotFound(HTTPError):
    """404."""
    status = 404


class MethodNotAllowed(HTTPError):
    """405."""
    status = 405


class RequestTimeout(HTTPError):
    """408."""
    status = 408


class LengthRequired(HTTPError):
    """411."""
    status = 411


class PayloadTooLarge(HTTPError):
    """413."""
    status = 413


class URITooLong(HTTPError):
    """414."""
    status = 414


class HeadersTooLarge(HTTPError):
    """431."""
    status = 431


class VersionNotSupported(HTTPError):
    """505."""
    status = 505


class ServiceUnavailable(HTTPError):
    """503."""
    status = 503


class Conflict(HTTPError):
    """409."""
    status = 409


class Forbidden(HTTPError):
    """403."""
    status = 403


def _printable(text: str, limit: int = 200) -> str:
    """Request text made safe for one log line (no control characters, bounded)."""
    return ascii(text[:limit])[1:-1]


def presented_tokens(query: str, headers) -> List[str]:
    """Every token a request offers: ?token=, a Bearer token, a Basic-auth password."""
    tokens = urllib.parse.parse_qs(query, keep_blank_values=True).get("token", [])
    authorization = headers.get("Authorization", "")
    scheme, _, credentials = authorization.partition(" ")
    if scheme.lower() == "bearer":
        tokens.append(credentials.strip())
    elif scheme.lower() == "basic":
        try:
            decoded = base64.b64decode(credentials.strip(), validate=True).decode("utf-8")
            tokens.append(decoded.partition(":")[2])
        except (binascii.Error, ValueError):
            pass
    return tokens


try:
    # What hmac.compare_digest is when Python has no OpenSSL: the same constant-time
    # comparison, without importing hmac (and OpenSSL with it, see _NoTLS) to check a token.
    from _operator import _compare_digest as compare_digest
except ImportError:  # another Python than CPython
    from hmac import compare_digest


def token_matches(expected: str, tokens: List[str]) -> bool:
    """Constant-time comparison of each presented token with the expected one."""
    wanted = expected.encode("utf-8")
    matched = False
    for token in tokens:
        matched |= compare_digest(token.encode("utf-8", "surrogateescape"), wanted)
    return matched


def signing_key(secret: str) -> bytes:
    """The HMAC key of a Standard Webhooks secret: base64 after the `whsec_` prefix."""
    encoded = secret[len("whsec_"):] if secret.startswith("whsec_") else secret
    try:
        return base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError):
        raise ConfigError("--secret must be base64 (a whsec_... secret from the sender)") from None


def webhook_signature(key: bytes, message_id: str, timestamp: str, body: bytes) -> str:
    """The Standard Webhooks `webhook-signature` value (v1, HMAC-SHA256 of "id.timestamp.body"):
    the one signing code, for `send --secret`, forwarding and verifying."""
    import hashlib
    import hmac
    signed = ("%s.%s." % (message_id, timestamp)).encode("utf-8", "surrogateescape") + body
    return "v1," + base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode("ascii")


def sign_body(key: bytes, body: bytes, now: Optional[float] = None) -> Dict[str, str]:
    """Standard Webhooks headers for a body: what `send --secret` (and a sender that signs) adds."""
    message_id = "msg_" + os.urandom(12).hex()
    timestamp = str(int(time.time() if now is None else now))
    return {"webhook-id": message_id, "webhook-timestamp": timestamp,
            "webhook-signature": webhook_signature(key, message_id, timestamp, body)}


def verify_signature(key: bytes, headers, body: bytes, now: Optional[float] = None) -> None:
    """Check a Standard Webhooks signature; raise Unauthorized unless one v1 signature matches."""
    message_id = headers.get("webhook-id", "")
    timestamp = headers.get("webhook-timestamp", "")
    signatures = headers.get("webhook-signature", "")
    if not (message_id and timestamp and signatures):
        raise Unauthorized("missing_signature", "webhook-id, webhook-timestamp and "
                                                "webhook-signature are required",
                           close=False)
    # str.isdigit() also takes "²", which int() refuses
    if not re.fullmatch(r"[0-9]{1,15}", timestamp):
        raise Unauthorized("bad_signature", "webhook-timestamp is not a Unix time")
    now = time.time() if now is None else now
    if abs(now - int(timestamp)) > SIGNATURE_TOLERANCE:
        raise Unauthorized("stale_signature", "webhook-timestamp is more than 5 minutes off")
    expected = webhook_signature(key, message_id, timestamp, body)[3:].encode("ascii")
    matched = False
    for part in signatures.split():
        version, _, signature = part.partition(",")
        if version == "v1":
            matched |= compare_digest(signature.encode("utf-8", "surrogateescape"), expected)
    if not matched:
        raise Unauthorized("bad_signature", "no webhook-signature matches the body")


def _refuse_constant(name: str):
    raise ValueError("%s is not JSON" % name)


# json.loads(text, parse_constant=_refuse_constant), without building a decoder each call.
_BODY_DECODER = json.JSONDecoder(parse_constant=_refuse_constant)


def parse_body(body: bytes) -> Tuple[str, dict]:
    """(the body as text to store, the JSON object) or BadRequest. Content-Type is ignored.

    Only what every handler can be given is accepted: UTF-8 (a byte-order
    mark is dropped), standard JSON (no NaN or Infinity, which scripts'
    parsers refuse), and an event type of at most MAX_EVENT_TYPE characters
    without NUL (it goes into a script's environment, where NUL cannot).
    """
    try:
        # Decoded here, strictly: json.loads(bytes) would take UTF-16 without a BOM,
        # which is valid UTF-8 full of NUL bytes to every script that reads it.
        text = body.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise BadRequest("bad_json", "the body is not UTF-8 text") from None
    # Parsing runs in the thread that serves every connection, and 1 MiB of [[],[],...] is 25 MB
    # of Python objects and 60 ms of it: a body is refused unparsed past MAX_JSON_CONTAINERS
    # (an event has a handful; the count also counts brackets inside strings).
    containers = body.count(b"[") + body.count(b"{")
    if containers > MAX_JSON_CONTAINERS:
        raise BadRequest("too_complex", "the body holds more than %d JSON arrays and objects"
                         % MAX_JSON_CONTAINERS)
    if containers > MAX_JSON_DEPTH and _nesting(body) > MAX_JSON_DEPTH:
        raise BadRequest("too_complex", "the body nests arrays and objects more than %d deep"
                         % MAX_JSON_DEPTH)
    try:
        payload = _BODY_DECODER.decode(text)
    except (ValueError, RecursionError):
        raise BadRequest("bad_json", "the body is not valid JSON") from None
    if not isinstance(payload, dict):
        raise BadRequest("not_an_object", "the body must be a JSON object")
    event_type = payload.get("event")
    if not isinstance(event_type, str) or not event_type.strip():
        raise BadRequest("missing_event", "the body needs an \"event\" member that is a "
                                          "non-empty string")
    if len(event_type) > MAX_EVENT_TYPE or "\x00" in event_type or _has_surrogates(event_type):
        raise BadRequest("bad_event", "the \"event\" member must be 1 to %d characters of "
                                      "text, without NUL"
                         % MAX_EVENT_TYPE)
    return text, payload


def _nesting(body: bytes) -> int:
    """How deep arrays and objects nest (brackets inside strings count too: an upper bound)."""
    depth = deepest = 0
    for match in re.finditer(rb"[\[{\]}]", body):
        depth += 1 if match.group() in b"[{" else -1
        deepest = max(deepest, depth)
    return deepest


def _has_surrogates(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


# Limits of a request head (request line and header fields), checked before
# any body is read and before the token: they bound what a stranger can make
# the server hold.
MAX_REQUEST_LINE = 8 * 1024   # longer: 414
MAX_HEAD = 64 * 1024          # request line and header fields in all; more: 431
MAX_HEADER_FIELDS = 100       # more: 431
FIELD_NAME = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+")  # an RFC 9110 token
FIELD_VALUE_FORBIDDEN = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")  # controls other than tab
CONTENT_LENGTH = re.compile(r"[0-9]{1,18}")
REQUEST_LINE = re.compile(rb"([!#$%&'*+.^_`|~0-9A-Za-z-]+) ([\x21-\x7e\x80-\xff]+) "
                          rb"HTTP/([0-9])\.([0-9])")


class Headers:
    """A request's header fields by lower-case name; a field sent twice keeps every value."""

    __slots__ = ("_fields",)

    def __init__(self, fields: Dict[str, List[str]]):
        self._fields = fields

    def get(self, name: str, default=None):
        """The first value of header `name` (any case), else `default`."""
        values = self._fields.get(name.lower())
        return values[0] if values else default

    def get_all(self, name: str) -> List[str]:
        """Every value of header `name` (any case), in the order received."""
        return self._fields.get(name.lower(), [])


class Request:
    """One parsed request head, and how its body is framed."""

    __slots__ = ("method", "path", "query", "headers", "keep_alive", "length", "chunked",
                 "bridge")

    def __init__(self, method: str, target: str, headers: Headers, keep_alive: bool):
        self.method, self.headers, self.keep_alive = method, headers, keep_alive
        self.bridge: Optional[str] = None  # the path's bridge label, once routed to the hook
        if not target.startswith("/"):  # absolute form: POST http://host/hook?token=... HTTP/1.1
            parts = urllib.parse.urlsplit(target)
            target = (parts.path or "/") + ("?" + parts.query if parts.query else "")
        self.path, _, self.query = target.partition("?")
        self.length, self.chunked = _body_framing(headers)

    @property
    def has_body(self) -> bool:
        """Whether a body follows the head (chunked, or a Content-Length above 0)."""
        return self.chunked or self.length > 0


def _body_framing(headers: Headers) -> Tuple[int, bool]:
    """(Content-Length, chunked) as RFC 9112 §6 allows them, else BadRequest (the connection
    closes)."""
    encodings = headers.get_all("Transfer-Encoding")
    lengths = headers.get_all("Content-Length")
    if encodings and lengths:  # a request smuggling attempt, or a broken proxy: never guess
        raise BadRequest("bad_request", "Content-Length and Transfer-Encoding must not "
                                        "come together",
                         close=True)
    if encodings:
        codings = [coding.strip().lower() for coding in ",".join(encodings).split(",")]
        if codings != ["chunked"]:
            raise BadRequest("bad_transfer_encoding", "only chunked transfer-encoding is supported",
                             close=True)
        return 0, True
    if not lengths:
        return 0, False
    if ((len(lengths) > 1 and len(set(value.strip() for value in lengths)) != 1)
            or not CONTENT_LENGTH.fullmatch(lengths[0].strip())):
        raise BadRequest("bad_length", "Content-Length is not one whole number", close=True)
    return int(lengths[0]), False


def parse_head(head: bytes) -> Request:
    """The request in a head (request line and header fields, without the blank line), or
    HTTPError."""
    lines = head.split(b"\n")
    request_line = lines[0].rstrip(b"\r")
    if len(request_line) > MAX_REQUEST_LINE:
        raise URITooLong("http_414", "the request line is over %d bytes" % MAX_REQUEST_LINE,
                         close=True)
    match = REQUEST_LINE.fullmatch(request_line)
    if not match:
        raise BadRequest("bad_request", "the request line is not METHOD TARGET HTTP/1.1",
                         close=True)
    method, target, major, minor = match.groups()
    if major != b"1":
        raise VersionNotSupported("http_505", "only HTTP/1.0 and HTTP/1.1 are served", close=True)
    if len(lines) - 1 > MAX_HEADER_FIELDS:
        raise HeadersTooLarge("http_431", "more than %d header fields" % MAX_HEADER_FIELDS,
                              close=True)
    fields: Dict[str, List[str]] = {}
    for line in lines[1:]:
        line = line[:-1] if line.endswith(b"\r") else line
        name, colon, value = line.partition(b":")
        # No whitespace before the colon, no folded lines, no control bytes: a
        # proxy in front may read such a line differently (RFC 9112 §5).
        if not colon or not FIELD_NAME.fullmatch(name):
            raise BadRequest("bad_request", "a header line is not NAME: VALUE", close=True)
        value = value.strip(b" \t")
        if FIELD_VALUE_FORBIDDEN.search(value):
            raise BadRequest("bad_request", "a header value holds control characters", close=True)
        fields.setdefault(name.decode("ascii").lower(), []).append(value.decode("latin-1"))
    headers = Headers(fields)
    tokens = {token.strip().lower() for token in ",".join(headers.get_all("Connection")).split(",")}
    keep_alive = "keep-alive" in tokens if minor == b"0" else "close" not in tokens
    return Request(method.decode("ascii"), target.decode("latin-1"), headers, keep_alive)


class _NoTLS(Exception):
    """Stands for ssl's SSLSocket and errors while this process has no TLS connection: nothing is
    one, nothing raises it.

    OpenSSL costs about 6 MB of memory for the life of the process, which a server
    of plain HTTP need not hold: ssl, http.client, hashlib and hmac are imported
    where they are first needed (TLS, forwarding, --secret, --dedup-window), not
    at the top.
    """


SSLSocket = SSLError = SSLWantReadError = SSLWantWriteError = _NoTLS


def use_tls():
    """Import ssl and put its SSLSocket and errors in place of _NoTLS; returns the module."""
    global SSLSocket, SSLError, SSLWantReadError, SSLWantWriteError
    import ssl
    SSLSocket, SSLError = ssl.SSLSocket, ssl.SSLError
    SSLWantReadError, SSLWantWriteError = ssl.SSLWantReadError, ssl.SSLWantWriteError
    return ssl


class _ChunkedBody:
    """Decodes a chunked body as its bytes arrive: feed() takes what it can from the buffer."""

    __slots__ = ("limit", "parts", "total", "state", "remaining")

    def __init__(self, limit: int):
        self.limit, self.parts, self.total, self.state, self.remaining = limit, [], 0, "size", 0

    def feed(self, buffer: bytearray) -> Optional[bytes]:
        """The whole body once its last chunk and trailer are in; None while more is needed."""
        while True:
            if self.state == "data":
                piece = bytes(buffer[:self.remaining])
                del buffer[:len(piece)]
                self.parts.append(piece)
                self.remaining -= len(piece)
                if self.remaining:
                    return None
                self.state = "crlf"
            elif self.state == "crlf":
                if len(buffer) < 2:
                    return None
                if buffer[:2] != b"\r\n":
                    raise BadRequest("bad_chunk", "a chunk does not end with CRLF", close=True)
                del buffer[:2]
                self.state = "size"
            else:
                line = self._line(buffer)
                if line is None:
                    return None
                if self.state == "trailer":
                    if not line.strip():  # trailer fields are ignored
                        return b"".join(self.parts)
                    continue
                self._start_chunk(line)

    @staticmethod
    def _line(buffer: bytearray) -> Optional[bytes]:
        newline = buffer.find(b"\n", 0, CHUNK_LINE_LIMIT + 1)
        if newline < 0:
            if len(buffer) > CHUNK_LINE_LIMIT:
                raise BadRequest("bad_chunk", "a chunk header line is too long", close=True)
            return None
        line = bytes(buffer[:newline + 1])
        del buffer[:newline + 1]
        return line

    def _start_chunk(self, line: bytes) -> None:
        size_text = line.split(b";", 1)[0].strip()
        if not re.fullmatch(rb"[0-9A-Fa-f]{1,16}", size_text):
            raise BadRequest("bad_chunk", "a chunk size is not hexadecimal", close=True)
        size = int(size_text, 16)
        if size == 0:
            self.state = "trailer"
            return
        self.total += size
        if self.total > self.limit:
            raise PayloadTooLarge("body_too_large", "the body is over %d bytes" % self.limit,
                                  close=True)
        self.state, self.remaining = "data", size


def _find_head(buffer: bytearray) -> Optional[bytes]:
    """Take the next request head out of the buffer; None until its blank line is in.

    Empty lines before a request line are skipped (RFC 9112 §2.2), and a head
    that grows past MAX_HEAD is refused before it is all read.
    """
    while buffer[:1] in (b"\r", b"\n") and buffer:
        del buffer[:1]
    end, separator = buffer.find(b"\n\r\n"), 3
    bare = buffer.find(b"\n\n")
    if bare >= 0 and (end < 0 or bare < end):
        end, separator = bare, 2  # a client that ends lines with LF only
    if end >= 0 and end <= MAX_HEAD:
        head = bytes(buffer[:end])
        del buffer[:end + separator]
        return head
    if len(buffer) > MAX_HEAD:
        newline = buffer.find(b"\n")
        if newline < 0 or newline > MAX_REQUEST_LINE:
            raise URITooLong("http_414", "the request line is over %d bytes" % MAX_REQUEST_LINE,
                             close=True)
        raise HeadersTooLarge("http_431", "the request head is over %d bytes" % MAX_HEAD,
                              close=True)
    return None


@functools.lru_cache(maxsize=2)
def _http_date(second: int) -> str:
    return time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(second))


def http_response(status: int, body: bytes, content_type: str, close: bool = False,
                  headers: Tuple = (),
                  head_only: bool = False) -> bytes:
    """Status line, headers and body as one buffer: one write, one packet for a small reply."""
    lines = ["HTTP/1.1 %d %s" % (status, http.HTTPStatus(status).phrase),
             "Server: wabhook/" + __version__,
             "Date: " + _http_date(int(time.time())),
             "Content-Type: " + content_type,
             "Content-Length: %d" % len(body)]
    lines += ["%s: %s" % header for header in headers]
    if close:
        lines.append("Connection: close")
    head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
    return head if head_only else head + body


class _Connection:
    """One client connection as the front sees it: bytes in, the request being read, bytes out."""

    __slots__ = ("sock", "peer", "buffer", "out", "deadline", "request", "started", "body", "busy",
                 "close_after", "handshaking", "eof", "writing", "reserved")

    def __init__(self, sock: socket.socket, peer: str, deadline: float, handshaking: bool):
        self.sock, self.peer, self.deadline, self.handshaking = sock, peer, deadline, handshaking
        self.buffer, self.out = bytearray(), bytearray()
        self.request: Optional[Request] = None   # the request whose body is being read or answered
        self.started: Optional[float] = None
        # a _ChunkedBody, or the Content-Length still to come
        self.body = None
        # answered elsewhere (the inbox's commit, a thread)
        self.busy = False
        self.close_after = False
        self.eof = False
        # registered for EVENT_WRITE: a reply did not fit the socket
        self.writing = False
        self.reserved = 0                         # bytes of --max-inflight its body holds so far


# How often the front looks for connections past their deadline, and for a stop.
SWEEP_SECONDS = 0.05
ACCEPT_PAUSE_SECONDS = 0.1  # after accept() ran out of descriptors
# a request still arriving after this may be closed to make room for a new connection
SLOW_REQUEST_SECONDS = 0.25


class FrontServices(typing.Protocol):
    """What the HTTP front uses of the server (the Server provides it): the one interface between
    them."""

    config: Config
    log: logging.Logger
    metrics: "Metrics"                 # rejected(status), ack(seconds)
    signing_key: Optional[bytes]       # --secret's key: verify each POST's signature
    intake: Intake                     # receive(), commit_received(), stored()
    operator: "Operator"               # endpoint(path): /healthz, /metrics, the page, /api/


class HTTPFront:
    """The listening socket and every connection, served by one thread with a selector.

    That thread reads and parses every request (strictly, RFC 9112) and
    hands a complete event to the inbox, whose writer commits it with others
    and calls back; the 200 goes out from here after COMMIT. One thread
    instead of one per connection: thousands of idle connections cost a few
    KB each, and the inbox's writer competes for the GIL with one thread
    rather than a crowd. Requests for /healthz and /metrics, which may wait
    on the inbox, are answered from a short-lived thread.

    `app` gives it what FrontServices declares, and nothing else is used.
    """

    def __init__(self, app: "FrontServices", listener: socket.socket):
        self.app, self.config, self.listener = app, app.config, listener
        self.selector = selectors.DefaultSelector()
        self.connections: Dict[int, _Connection] = {}
        self._inflight = 0  # bytes held by the bodies being read (--max-inflight)
        self._received = False  # events handed to the inbox this turn, to commit at its end
        self._waiting: List[_Connection] = []  # bodies not read while the budget is spent
        self._bodies: Dict[_Connection, None] = {}  # bodies in progress, oldest first
        self._completed: "collections.deque" = collections.deque()  # (connection, reply function)
        self._wakeup_receiver, self._wakeup_sender = socket.socketpair()
        self._wakeup_pending = False
        self._stopping = False
        self._listening = True
        self._accept_paused_until: Optional[float] = None
        self._refused, self._refusal_logged, self._accept_error_logged = (
            0, float("-inf"), float("-inf"))
        self.thread: Optional[threading.Thread] = None

    def start(self) -> None:
        """Watch the listener and the wakeup pipe, and serve in a thread of its own."""
        self.listener.setblocking(False)
        self._wakeup_receiver.setblocking(False)
        self.selector.register(self.listener, selectors.EVENT_READ, None)
        self.selector.register(self._wakeup_receiver, selectors.EVENT_READ, "wakeup")
        self.thread = threading.Thread(target=self._serve, name="wabhook-http", daemon=True)
        self.thread.start()

    def stop(self) -> None:
        """Close the listener and every connection; returns once the front's thread has ended."""
        self._stopping = True
        self._wake()
        if self.thread is not None:
            self.thread.join()

    def stop_listening(self) -> None:
        """Accept no new connection (open ones are answered 503 by the app meanwhile)."""
        self._listening = False
        self._wake()

    def complete(self, connection: _Connection, reply: Callable, *args) -> None:
        """Run reply(connection, *args) in the front's thread soon: how another thread answers a
        request."""
        self._completed.append((connection, reply, args))
        if threading.current_thread() is not self.thread:
            self._wake()

    def _wake(self) -> None:
        if not self._wakeup_pending:
            self._wakeup_pending = True
            with contextlib.suppress(OSError):
                self._wakeup_sender.send(b"x")

    # -- the loop ------------------------------------------------------------

    def _serve(self) -> None:
        next_sweep = time.monotonic() + SWEEP_SECONDS
        try:
            while not self._stopping:
                for key, mask in self.selector.select(SWEEP_SECONDS):
                    if key.data is None:
                        self._accept()
                    elif key.data == "wakeup":
                        self._drain_wakeup()
                    else:
                        self._on_ready(key.data, mask)
                self._run_completed()
                if self._received:  # the events of this turn, as one batch
                    self._received = False
                    self.app.intake.commit_received()
                    self._run_completed()
                if not self._listening and self.listener.fileno() >= 0:
                    with contextlib.suppress(KeyError, ValueError):
                        self.selector.unregister(self.listener)
                    self.listener.close()
                now = time.monotonic()
                if now >= next_sweep:
                    next_sweep = now + SWEEP_SECONDS
                    self._sweep(now)
                if self._accept_paused_until is not None and now >= self._accept_paused_until:
                    self._accept_paused_until = None
                    if self._listening:
                        self.selector.register(self.listener, selectors.EVENT_READ, None)
        finally:
            for connection in list(self.connections.values()):
                self._close(connection)
            with contextlib.suppress(KeyError, ValueError):
                self.selector.unregister(self.listener)
            self.listener.close()
            self.selector.close()
            self._wakeup_receiver.close()
            self._wakeup_sender.close()

    def _accept(self) -> None:
        for _ in range(64):  # a burst is taken in one go, without starving the open connections
            try:
                sock, address = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except SSLError:
                continue
            except OSError as exc:
                self._cannot_accept(exc)
                return
            if len(self.connections) >= self.config.max_connections and not self._make_room():
                sock.close()
                self._note_refusal()
                continue
            sock.setblocking(False)
            with contextlib.suppress(OSError):
                # no 40 ms delayed-ACK stall
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            connection = _Connection(sock, address[0], time.monotonic() + self.config.timeout,
                                     isinstance(sock, SSLSocket))
            self.connections[sock.fileno()] = connection
            self.selector.register(sock, selectors.EVENT_READ, connection)

    def _make_room(self) -> bool:
        """Close the connection idle the longest (between requests, nothing pending); else the one
        whose
        request has been arriving the longest, if for over SLOW_REQUEST_SECONDS (a sender that
        trickles);
        False if there is neither."""
        idle, slow = [], []
        stalled_before = time.monotonic() + self.config.timeout - SLOW_REQUEST_SECONDS
        for connection in self.connections.values():
            if connection.busy or connection.out:
                continue
            if connection.request is None and not connection.buffer and not connection.handshaking:
                idle.append(connection)
            # deadline: when its request began, plus --timeout
            elif connection.deadline < stalled_before:
                slow.append(connection)
        if not idle and not slow:
            return False
        self._close(min(idle or slow, key=lambda connection: connection.deadline))
        return True

    def _note_refusal(self) -> None:
        """A new connection refused at --max-connections: logged at most once a second."""
        self._refused += 1
        now = time.monotonic()
        if now - self._refusal_logged >= 1.0:
            self.app.log.warning("refused %d connections: %d are open, every one busy "
                                 "with a request"
                                 " (--max-connections %d)", self._refused, len(self.connections),
                                 self.config.max_connections)
            self._refused, self._refusal_logged = 0, now

    def _cannot_accept(self, exc: OSError) -> None:
        """accept() failed: out of file descriptors (EMFILE, ENFILE) or memory. Make room, pause,
        say so."""
        now = time.monotonic()
        if now - self._accept_error_logged >= 60.0:
            self._accept_error_logged = now
            self.app.log.error("cannot accept connections: %s; %d are open (raise the "
                               "descriptor limit,"
                               " e.g. LimitNOFILE= in the systemd unit, or lower "
                               "--max-connections)",
                               exc.strerror or exc, len(self.connections))
        self._make_room()
        # The listener stays readable while the backlog waits: without a pause the loop would spin.
        self.selector.unregister(self.listener)
        self._accept_paused_until = now + ACCEPT_PAUSE_SECONDS

    def _drain_wakeup(self) -> None:
        # Drained first, cleared after: a wake-up sent meanwhile stays in the socket,
        # and one skipped because the flag was still set finds its reply queued already.
        with contextlib.suppress(OSError):
            while self._wakeup_receiver.recv(4096):
                pass
        self._wakeup_pending = False

    def _run_completed(self) -> None:
        while self._completed:
            connection, reply, args = self._completed.popleft()
            connection.busy = False
            if connection.sock.fileno() < 0:
                continue
            if connection.sock.fileno() not in self.connections:  # closed while it was busy
                self._close(connection)
                continue
            reply(connection, *args)

    def _sweep(self, now: float) -> None:
        """Connections past their deadline: an idle or slow head is closed, a slow body gets 408."""
        for connection in list(self.connections.values()):
            if connection.busy or now < connection.deadline:
                continue
            if connection.request is not None and connection.body is not None:
                self._refuse(connection, RequestTimeout(
                    "body_timeout", "the body did not arrive within the timeout", close=True))
            else:
                # idle, or a head too slow: closed without a word, as http.server does
                self._close(connection)

    def _on_ready(self, connection: _Connection, mask: int) -> None:
        try:
            if connection.handshaking:
                connection.sock.do_handshake()
                connection.handshaking = False
                self.selector.modify(connection.sock, selectors.EVENT_READ, connection)
            if mask & selectors.EVENT_WRITE and connection.out:
                self._flush(connection)
                self._advance(connection)
            elif mask & selectors.EVENT_READ:
                self._receive(connection)
        except SSLWantReadError:
            pass
        except SSLWantWriteError:
            connection.writing = True
            self.selector.modify(connection.sock, selectors.EVENT_READ | selectors.EVENT_WRITE,
                                 connection)
        except (OSError, ValueError) as exc:  # reset, a failed handshake, a closed socket
            self.app.log.debug("connection from %s ended: %s", connection.peer, exc)
            self._close(connection)

    def _receive(self, connection: _Connection) -> None:
        sock = connection.sock
        if self._must_wait(connection):
            return
        while True:
            try:
                data = sock.recv(READ_CHUNK)
            except (BlockingIOError, SSLWantReadError):
                break
            if not data:
                connection.eof = True
                break
            connection.buffer += data
            if connection.body is not None:
                self._hold(connection, len(data))
            if not (isinstance(sock, SSLSocket) and sock.pending()):
                break  # epoll tells of the rest; TLS bytes already decrypted it cannot see
        self._advance(connection)

    def _close(self, connection: _Connection) -> None:
        """Forget a connection and close its socket; a busy one is closed once its answer comes
        back,
        so that no other thread ever writes to a descriptor number the kernel has handed on."""
        if connection.sock.fileno() < 0:
            return
        self._release(connection)
        self.connections.pop(connection.sock.fileno(), None)
        with contextlib.suppress(KeyError, ValueError, OSError):
            self.selector.unregister(connection.sock)
        connection.eof = connection.close_after = True
        if not connection.busy:
            with contextlib.suppress(OSError):
                connection.sock.close()

    # -- requests --------------------------------------------------------------

    def _advance(self, connection: _Connection) -> None:
        """Read and answer as many requests as the buffer holds, one at a time."""
        while not connection.busy and connection.sock.fileno() >= 0 and not connection.out:
            try:
                if connection.request is None:
                    head = _find_head(connection.buffer)
                    if head is None:
                        if connection.eof:
                            self._close(connection)
                        return
                    connection.started = time.monotonic()
                    connection.deadline = connection.started + self.config.timeout  # for the body
                    connection.request = parse_head(head)
                    self._route(connection, connection.request)
                elif connection.body is None or not self._read_body(connection):
                    return
            except HTTPError as exc:
                self._refuse(connection, exc)

    def _route(self, connection: _Connection, request: Request) -> None:
        app, config, path = self.app, self.config, request.path
        endpoint = app.operator.endpoint(path)  # /healthz, /metrics, the page, /api/ (section 7)
        if endpoint is not None:
            if endpoint.methods is not None:
                self._require_method(request, *endpoint.methods)
            if endpoint.token:
                self._require_token(request)
            if endpoint.private:
                app.operator.admit(request.method, request.headers)
            if endpoint.static is not None:
                self._answer(connection, 200, *endpoint.static)
            else:
                self._answer_in_thread(connection, functools.partial(endpoint.answer,
                                                                     request.method, path,
                                                                     request.query),
                                       API_HEADERS if endpoint.private else ())
            return
        prefix = config.path.rstrip("/")
        if path != config.path and not path.startswith(prefix + "/"):
            raise NotFound("not_found", "no such path; events go to %s or %s/<bridge>"
                           % (config.path, prefix))
        label = path[len(prefix) + 1:] if path != config.path else ""
        if label and not BRIDGE_LABEL.fullmatch(label):
            raise NotFound("bad_bridge", "a bridge label is 1 to 128 of A-Z a-z 0-9 . _ : -")
        request.bridge = label or None
        self._require_method(request, "POST")
        self._require_token(request)
        if not request.has_body and not request.headers.get_all("Content-Length"):
            raise LengthRequired("length_required", "send Content-Length or a chunked body",
                                 close=True)
        if request.length > config.max_body:
            raise PayloadTooLarge("body_too_large", "the body is over %d bytes" % config.max_body,
                                  close=True)
        self._hold(connection, len(connection.buffer))  # body bytes that came with the head
        connection.body = _ChunkedBody(config.max_body) if request.chunked else request.length
        if request.headers.get("Expect", "").lower() == "100-continue" and not connection.buffer:
            connection.sock.send(b"HTTP/1.1 100 Continue\r\n\r\n")
        self._read_body(connection)

    def _hold(self, connection: _Connection, size: int) -> None:
        """Count body bytes received against --max-inflight: what is in memory, not what was
        announced
        (a Content-Length promised and trickled must not crowd out the senders that do send)."""
        self._inflight += size
        connection.reserved += size
        self._bodies.setdefault(connection, None)

    def _release(self, connection: _Connection) -> None:
        """The body is read (or its connection gone): its bytes leave the budget; waiting bodies go
        on."""
        self._inflight -= connection.reserved
        connection.reserved = 0
        self._bodies.pop(connection, None)
        waiting, self._waiting = self._waiting, []
        for other in waiting:  # read again, each to be held back again if it still must wait
            if other.sock.fileno() >= 0:
                with contextlib.suppress(KeyError, ValueError, OSError):
                    self.selector.register(other.sock, selectors.EVENT_READ, other)

    def _must_wait(self, connection: _Connection) -> bool:
        """Past --max-inflight, a connection in the middle of a large body is not read (its sender
        waits). The oldest body in progress goes on, so that the budget frees up; so does a small
        one (an event is a few KB): at most READ_CHUNK a connection beyond the budget."""
        if connection.body is None or self._inflight < self.config.max_inflight:
            return False
        if next(iter(self._bodies), None) is connection:
            return False
        size = connection.reserved if isinstance(connection.body,
                                                 _ChunkedBody) else connection.request.length
        if size <= READ_CHUNK:
            return False
        with contextlib.suppress(KeyError, ValueError):
            self.selector.unregister(connection.sock)
        self._waiting.append(connection)
        return True

    def _read_body(self, connection: _Connection) -> bool:
        """Take the body from the buffer once it is all in, and hand the event on; False while it is
        not."""
        request, buffer = connection.request, connection.buffer
        if isinstance(connection.body, _ChunkedBody):
            body = connection.body.feed(buffer)
        elif len(buffer) >= connection.body:
            body = bytes(buffer[:connection.body])
            del buffer[:connection.body]
        else:
            body = None
        if body is None:
            if connection.eof:
                raise BadRequest("truncated_body", "the connection closed before the "
                                                   "whole body arrived",
                                 close=True)
            return False
        connection.body = None
        self._release(connection)
        # read whole: the connection can carry the next request
        request.length, request.chunked = 0, False
        if self.app.signing_key is not None:
            verify_signature(self.app.signing_key, request.headers, body)
        text, payload = parse_body(body)
        connection.busy = True
        connection.deadline = float("inf")
        event_type = payload["event"]

        # The inbox's writer calls back right after COMMIT; all else happens in this thread,
        # so the writer goes on to its next batch at once (sending the 200 from the writer
        # was measured: it slows every batch more than it saves a reply).
        try:
            self.app.intake.receive(
                text, payload, request.bridge,
                lambda result, error: self.complete(connection, self._acked, event_type, result,
                                                    error))
        except NotReceived as exc:
            raise ServiceUnavailable(exc.code, str(exc), close=exc.close) from None
        self._received = True
        return True

    def _acked(self, connection: _Connection, event_type: str, result: Optional[Tuple[int, bool]],
               error: Optional[Exception]) -> None:
        """The inbox's answer for an event: the 200 (after COMMIT), or the error it means."""
        refusal = self.app.intake.stored(event_type, result, error)
        if refusal is not None:
            self._refuse(connection, ServiceUnavailable(refusal.code, str(refusal),
                                                        close=refusal.close))
        else:
            started = connection.started
            self._answer(connection, 200, b'{"ok": true, "id": %d, "duplicate": %s}' % (
                result[0], b"true" if result[1] else b"false"), "application/json")
            self.app.metrics.ack(time.monotonic() - started)
        self._advance(connection)

    def _answer_and_go_on(self, connection: _Connection, *reply) -> None:
        self._answer(connection, *reply)
        self._advance(connection)

    def _refuse_and_go_on(self, connection: _Connection, exc: HTTPError) -> None:
        self._refuse(connection, exc)
        self._advance(connection)

    def _answer_in_thread(self, connection: _Connection, make_reply: Callable[[], tuple],
                          headers: Tuple = ()) -> None:
        """Answer from a thread of its own: the reply may wait for the inbox, the front may not."""
        connection.busy = True
        connection.deadline = float("inf")

        def run():
            try:
                reply = make_reply()
            except HTTPError as exc:
                self.complete(connection, self._refuse_and_go_on, exc)
                return
            if len(reply) == 2:  # (status, JSON payload)
                reply = (reply[0], json.dumps(reply[1]).encode("utf-8"), "application/json")
            self.complete(connection, self._answer_and_go_on, *reply, headers)
        threading.Thread(target=run, name="wabhook-http-reply", daemon=True).start()

    def _require_method(self, request: Request, *allowed):
        if request.method not in allowed:
            raise MethodNotAllowed("method_not_allowed", "use " + " or ".join(allowed),
                                   close=request.has_body,
                                   headers=(("Allow", ", ".join(allowed)),))

    def _require_token(self, request: Request):
        token = self.config.token
        if token and not token_matches(token, presented_tokens(request.query, request.headers)):
            raise Unauthorized("unauthorized", "a valid token is required (?token=, Bearer or "
                                               "Basic password)",
                               close=True, headers=(("WWW-Authenticate", 'Bearer '
                                                                         'realm="wabhook"'),))

    # -- replies -----------------------------------------------------------

    def _answer(self, connection: _Connection, status: int, body: bytes, content_type: str,
                headers: Tuple = ()) -> None:
        """A successful reply; the connection closes after it if the request asked, or left a body
        unread."""
        request = connection.request
        self._send(connection, status, body, content_type, not request.keep_alive
                   or request.has_body, headers)

    def _refuse(self, connection: _Connection, exc: HTTPError) -> None:
        """The one way an error reply is made: JSON body, a log line, a metric, the access log."""
        request = connection.request
        close = exc.close or connection.eof or (request is not None and request.has_body)
        self.app.metrics.rejected(exc.status)
        self.app.log.warning("%s %s from %s: %d %s (%s)", _printable(request.method) if request
                             else "-",
                             _printable(request.path) if request else "-", connection.peer,
                             exc.status, exc.code, exc.message)
        body = json.dumps({"ok": False, "error": exc.code, "message": exc.message}).encode("utf-8")
        self._send(connection, exc.status, body, "application/json", close, exc.headers)

    def _send(self, connection: _Connection, status: int, body: bytes, content_type: str,
              close: bool,
              headers: Tuple = ()) -> None:
        """Queue a reply, send what the socket takes, and end the request."""
        request = connection.request
        connection.out += http_response(status, body, content_type, close, headers,
                                        head_only=request is not None and request.method == "HEAD")
        self._finish(connection, status, close)

    def _finish(self, connection: _Connection, status: int, close: bool) -> None:
        """End a request whose reply is queued (or sent): the access log, then ready for the
        next."""
        request = connection.request
        if self.config.access_log:  # the query (a token) is never logged
            took = (" %.1fms" % ((time.monotonic() - connection.started) * 1000)
                    if connection.started else "")
            self.app.log.info('%s "%s %s" %d%s', connection.peer, _printable(request.method)
                              if request else "-",
                              _printable(request.path) if request else "-", status, took)
        connection.request, connection.body, connection.started = None, None, None
        self._release(connection)
        connection.close_after = close
        connection.deadline = time.monotonic() + self.config.timeout  # for the next request
        self._flush(connection)

    def _flush(self, connection: _Connection) -> None:
        try:
            sent = connection.sock.send(connection.out) if connection.out else 0
        except (BlockingIOError, SSLWantWriteError):
            sent = 0
        except OSError:
            self._close(connection)
            return
        del connection.out[:sent]
        if connection.out:
            if not connection.writing:
                connection.writing = True
                self.selector.modify(connection.sock, selectors.EVENT_READ | selectors.EVENT_WRITE,
                                     connection)
            return
        if connection.close_after:
            self._close(connection)
        elif connection.writing:
            connection.writing = False
            self.selector.modify(connection.sock, selectors.EVENT_READ, connection)


# ---------------------------------------------------------------------------
# 7. Operator endpoints
# ---------------------------------------------------------------------------

DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
ACK_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)


class _Histogram:
    __slots__ = ("buckets", "counts", "total", "count")

    def __init__(self, buckets):
        self.buckets, self.counts, self.total, self.count = buckets, [0] * len(buckets), 0.0, 0

    def observe(self, value: float):
        """Count one value in every bucket it fits, in the sum and in the count."""
        for index, bound in enumerate(self.buckets):
            if value <= bound:
                self.counts[index] += 1
        self.total += value
        self.count += 1

    def lines(self, name: str, labels: str) -> List[str]:
        """The histogram's lines in the Prometheus text format."""
        sep = "," if labels else ""
        out = ['%s_bucket{%s%sle="%s"} %d' % (name, labels, sep, repr(bound), count)
               for bound, count in zip(self.buckets, self.counts)]
        out.append('%s_bucket{%s%sle="+Inf"} %d' % (name, labels, sep, self.count))
        out.append("%s_sum%s %r" % (name, "{%s}" % labels if labels else "", self.total))
        out.append("%s_count%s %d" % (name, "{%s}" % labels if labels else "", self.count))
        return out


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


class Metrics:
    """This process's counters since start, rendered in the Prometheus text format.

    Event types outside the documented eleven are counted as "unknown", so a
    sender cannot grow the label set without bound.
    """

    def __init__(self):
        self._lock = threading.Lock()
        self.received: Dict[str, int] = {}
        self.duplicates: Dict[str, int] = {}
        self.rejected_by_status: Dict[int, int] = {}
        self.runs: Dict[Tuple[str, str], int] = {}
        self.durations: Dict[str, _Histogram] = {}
        self.ack_latency = _Histogram(ACK_BUCKETS)
        # [second, events stored in it]
        self._recent: "collections.deque[List[int]]" = collections.deque()

    def event_received(self, event_type: str, duplicate: bool):
        """Count a committed event by type, as received or as a duplicate."""
        label = event_type if event_type in EVENT_CLASSES else "unknown"
        second = int(time.monotonic())
        with self._lock:
            counter = self.duplicates if duplicate else self.received
            counter[label] = counter.get(label, 0) + 1
            if not duplicate:
                if self._recent and self._recent[-1][0] == second:
                    self._recent[-1][1] += 1
                else:
                    self._recent.append([second, 1])
                    while self._recent[0][0] <= second - 60:
                        self._recent.popleft()

    def stored_last_minute(self) -> int:
        """Events this process stored during the last 60 seconds (duplicates not counted)."""
        since = int(time.monotonic()) - 60
        with self._lock:
            return sum(count for second, count in self._recent if second > since)

    def rejected(self, status: int):
        """Count a request refused with HTTP status `status`."""
        with self._lock:
            self.rejected_by_status[status] = self.rejected_by_status.get(status, 0) + 1

    def handler_run(self, handler: str, outcome: str, seconds: float):
        """Count a handler run by outcome, and observe how long it took."""
        with self._lock:
            self.runs[(handler, outcome)] = self.runs.get((handler, outcome), 0) + 1
            self.durations.setdefault(handler, _Histogram(DURATION_BUCKETS)).observe(seconds)

    def runs_by_handler(self) -> Dict[str, Dict[str, int]]:
        """{handler: {"done": n, "failed": n, "skipped": n}}: its runs since this process
        started."""
        names = {"ok": "done", "failed": "failed", "skipped": "skipped"}
        by_handler: Dict[str, Dict[str, int]] = {}
        with self._lock:
            for (handler, outcome), count in self.runs.items():
                by_handler.setdefault(handler, {})[names.get(outcome, outcome)] = count
        return by_handler

    def ack(self, seconds: float):
        """Observe how long an event took from request to 200."""
        with self._lock:
            self.ack_latency.observe(seconds)

    def render(self, gauges: Dict[str, int]) -> str:
        """The counters, and the inbox's `gauges`, in the Prometheus text format."""
        out = []

        def family(name, metric_type, help_text):
            out.append("# HELP %s %s" % (name, help_text))
            out.append("# TYPE %s %s" % (name, metric_type))

        with self._lock:
            family("wabhook_info", "gauge", "Version of this wabhook.")
            out.append('wabhook_info{version="%s"} 1' % __version__)
            family("wabhook_events_received_total", "counter", "Events stored, by type "
                                                               "(duplicates excluded).")
            for event_type, count in sorted(self.received.items()):
                out.append('wabhook_events_received_total{event="%s"} %d' % (_label(event_type),
                                                                             count))
            family("wabhook_duplicates_total", "counter", "Events acknowledged as "
                                                          "duplicates, by type.")
            for event_type, count in sorted(self.duplicates.items()):
                out.append('wabhook_duplicates_total{event="%s"} %d' % (_label(event_type), count))
            family("wabhook_requests_rejected_total", "counter", "Requests refused, "
                                                                 "by HTTP status.")
            for status, count in sorted(self.rejected_by_status.items()):
                out.append('wabhook_requests_rejected_total{status="%d"} %d' % (status, count))
            family("wabhook_handler_runs_total", "counter",
                   "Handler runs, by handler and outcome (ok, failed, skipped).")
            for (handler, outcome), count in sorted(self.runs.items()):
                out.append('wabhook_handler_runs_total{handler="%s",outcome="%s"} %d'
                           % (_label(handler), outcome, count))
            family("wabhook_handler_duration_seconds", "histogram", "How long handler runs took.")
            for handler, histogram in sorted(self.durations.items()):
                out += histogram.lines("wabhook_handler_duration_seconds", 'handler="%s"'
                                       % _label(handler))
            family("wabhook_ack_duration_seconds", "histogram", "From request headers "
                                                                "read to 200 sent.")
            out += self.ack_latency.lines("wabhook_ack_duration_seconds", "")
        for name, value in sorted(gauges.items()):
            family("wabhook_events_%s" % name, "gauge", "Events in the inbox whose delivery is %s."
                   % name)
            out.append("wabhook_events_%s %d" % (name, value))
        return "\n".join(out) + "\n"


# The inbox page's three files, served as they are (see PAGE_FILES).
PAGE_HTML = r'''<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="referrer" content="no-referrer">
<title>wabhook inbox</title>
<link rel="icon" href="data:,">
<link rel="stylesheet" href="/ui.css">
<script src="/ui.js" defer></script>
</head>
<body>
<header>
  <h1>wabhook inbox</h1>
  <p id="status" role="status" aria-live="polite">loading&hellip;</p>
  <p id="notice" aria-live="polite"></p>
  <button type="button" id="forget-token" data-action="forget" hidden>Forget token</button>
</header>

<form id="token-form" hidden>
  <h2>Token</h2>
  <p id="token-message">This inbox needs the server's <code>--token</code>.</p>
  <label for="token-input">Token</label>
  <input id="token-input" name="token" type="password" autocomplete="off" required>
  <button type="submit">Open the inbox</button>
  <p class="note">Kept in this tab only (sessionStorage), sent as a Bearer header.</p>
</form>

<main id="app" hidden>
  <section id="counters" aria-labelledby="counters-title">
    <h2 id="counters-title">Counters</h2>
    <dl class="counts">
      <div><dt>received</dt><dd id="count-received">&ndash;</dd></div>
      <div><dt>pending</dt><dd id="count-pending">&ndash;</dd></div>
      <div><dt>dead</dt><dd><button type="button" id="count-dead" data-action="show-dead"
        title="Show the dead letters">&ndash;</button></dd></div>
      <div><dt>discarded</dt><dd id="count-discarded">&ndash;</dd></div>
      <div><dt>per minute</dt><dd id="count-per-minute">&ndash;</dd></div>
      <div><dt>oldest pending</dt><dd id="count-oldest">&ndash;</dd></div>
    </dl>
    <table id="handlers">
      <caption>Handler runs since the server started</caption>
      <thead><tr><th scope="col">handler</th><th scope="col">done</th><th scope="col">failed</th>
        <th scope="col">skipped</th></tr></thead>
      <tbody></tbody>
    </table>
  </section>

  <section id="list" aria-labelledby="list-title">
    <h2 id="list-title">Events</h2>
    <form id="filters" role="search">
      <label>type <input id="filter-type" name="type" list="event-types" size="14"
        autocomplete="off"></label>
      <datalist id="event-types">
        <option value="message"><option value="connected"><option value="disconnected">
        <option value="typing"><option value="poll_vote"><option value="event_response">
        <option value="call_incoming"><option value="call_terminated">
        <option value="offline_sync_preview"><option value="offline_sync_completed">
        <option value="profile_picture_updated">
      </datalist>
      <label>bridge <input id="filter-bridge" name="bridge" size="14"
        placeholder="any (- = default)" autocomplete="off"></label>
      <label>status <select id="filter-status" name="status">
        <option value="">any</option><option value="pending">pending</option>
        <option value="done">done</option><option value="dead">dead</option>
        <option value="discarded">discarded</option><option value="skipped">skipped</option>
        </select></label>
      <button type="submit">Filter</button>
      <button type="reset">Clear</button>
    </form>
    <table id="events">
      <thead><tr><th scope="col">#</th><th scope="col">received (UTC)</th>
        <th scope="col">bridge</th><th scope="col">event</th><th scope="col">status</th>
        <th scope="col">handlers</th><th scope="col">body</th>
        <th scope="col"><span class="sr">actions</span></th></tr></thead>
      <tbody></tbody>
    </table>
    <p id="events-empty" hidden>No events match.</p>
    <nav class="pager" aria-label="Pages">
      <button type="button" id="page-latest" data-action="latest" disabled>Latest</button>
      <button type="button" id="page-newer" data-action="newer" disabled>Newer</button>
      <button type="button" id="page-older" data-action="older" disabled>Older</button>
    </nav>
  </section>

  <section id="detail" aria-labelledby="detail-title" hidden>
    <h2 id="detail-title">Event</h2>
    <button type="button" id="detail-close" data-action="close"
      aria-label="Close the event">Close</button>
    <dl id="detail-meta" class="meta"></dl>
    <p id="detail-actions"></p>
    <h3>Body</h3>
    <pre id="detail-body"></pre>
    <table id="deliveries">
      <caption>Deliveries</caption>
      <thead><tr><th scope="col">handler</th><th scope="col">status</th>
        <th scope="col">attempts</th><th scope="col">started</th><th scope="col">finished</th>
        <th scope="col">exit</th><th scope="col">next attempt</th><th scope="col">last error</th>
        <th scope="col">output</th></tr></thead>
      <tbody></tbody>
    </table>
  </section>
</main>
</body>
</html>
'''

PAGE_CSS = r'''/* wabhook inbox page: system fonts, no external assets. */
:root {
  --fg: #1d232a;
  --muted: #5d6873;
  --line: #d9dee3;
  --bg: #fff;
  --panel: #f5f7f9;
  --accent: #0b63c5;
  --done: #1a7f37;
  --pending: #9a6700;
  --dead: #c4281c;
  --other: #5d6873;
  color-scheme: light dark;
}
@media (prefers-color-scheme: dark) {
  :root {
    --fg: #e6e9ec;
    --muted: #9aa4ae;
    --line: #39414a;
    --bg: #15191d;
    --panel: #1d2227;
    --accent: #5aa2f0;
    --done: #4cc26b;
    --pending: #d8a73a;
    --dead: #f0675b;
  }
}
* { box-sizing: border-box; }
[hidden] { display: none !important; }
body {
  margin: 0 auto;
  max-width: 78rem;
  padding: 0 1rem 2rem;
  color: var(--fg);
  background: var(--bg);
  font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif;
}
code, pre, .time, .preview, td[data-count], dd {
  font-family: ui-monospace, "SFMono-Regular", Menlo, Consolas, monospace;
  font-size: 12.5px;
}
h1 { font-size: 1.25rem; margin: 0; }
h2 { font-size: 1rem; margin: 0 0 .5rem; }
h3 { font-size: .9rem; margin: 1rem 0 .25rem; }
header {
  display: flex;
  align-items: baseline;
  gap: 1rem;
  padding: .75rem 0;
  border-bottom: 1px solid var(--line);
  margin-bottom: 1rem;
}
#status { color: var(--muted); margin: 0; }
#notice { margin: 0; flex: 1; }
#notice.error { color: var(--dead); }
section { margin-bottom: 1.25rem; }

button {
  font: inherit;
  padding: .2rem .6rem;
  border: 1px solid var(--line);
  border-radius: 4px;
  background: var(--panel);
  color: var(--fg);
  cursor: pointer;
}
button:hover:not(:disabled) { border-color: var(--accent); }
button:disabled { opacity: .45; cursor: default; }
button:focus-visible, input:focus-visible, select:focus-visible {
  outline: 2px solid var(--accent);
  outline-offset: 1px;
}
button.link {
  border: 0;
  background: none;
  padding: 0;
  color: var(--accent);
  text-decoration: underline;
}
button.replay { border-color: var(--done); color: var(--done); }
button.discard { border-color: var(--dead); color: var(--dead); }
input, select {
  font: inherit;
  padding: .15rem .35rem;
  border: 1px solid var(--line);
  border-radius: 4px;
  background: var(--bg);
  color: var(--fg);
}

#token-form {
  max-width: 26rem;
  margin: 3rem auto;
  padding: 1.25rem;
  border: 1px solid var(--line);
  border-radius: 6px;
  background: var(--panel);
  display: grid;
  gap: .5rem;
}
#token-form p { margin: 0; }
.note { color: var(--muted); font-size: 12px; }

.counts { display: flex; flex-wrap: wrap; gap: .5rem; margin: 0 0 .75rem; }
.counts div {
  padding: .4rem .8rem;
  border: 1px solid var(--line);
  border-radius: 6px;
  background: var(--panel);
  min-width: 7rem;
}
.counts dt { color: var(--muted); font-size: 12px; }
.counts dd { margin: 0; font-size: 1.2rem; }
#count-dead { font: inherit; padding: 0; border: 0; background: none; color: inherit; }
#count-dead:hover { text-decoration: underline; }
#count-dead.alert { color: var(--dead); font-weight: 600; }

table { border-collapse: collapse; width: 100%; }
caption { text-align: left; color: var(--muted); font-size: 12px; padding-bottom: .25rem; }
th, td {
  text-align: left;
  padding: .25rem .5rem;
  border-bottom: 1px solid var(--line);
  vertical-align: top;
}
thead th { font-weight: 600; color: var(--muted); font-size: 12px; }
#handlers { width: auto; }
td[data-count] { text-align: right; }
#events tbody tr { cursor: pointer; }
#events tbody tr:hover { background: var(--panel); }
#events tbody tr.selected { background: var(--panel); box-shadow: inset 3px 0 var(--accent); }
.preview {
  max-width: 28rem;
  overflow: hidden;
  text-overflow: ellipsis;
  white-space: nowrap;
  color: var(--muted);
}
.actions { white-space: nowrap; }
.actions button + button, #detail-actions button + button { margin-left: .35rem; }
.deliveries { display: flex; flex-direction: column; }
.badge {
  display: inline-block;
  padding: 0 .4rem;
  border-radius: 3px;
  border: 1px solid currentColor;
  font-size: 12px;
}
.st-done { color: var(--done); }
.st-pending, .st-running { color: var(--pending); }
.st-dead { color: var(--dead); }
.st-discarded, .st-skipped, .st-other { color: var(--other); }

#filters {
  display: flex;
  flex-wrap: wrap;
  align-items: center;
  gap: .5rem .9rem;
  margin-bottom: .5rem;
}
.pager { display: flex; gap: .5rem; margin-top: .5rem; }
.sr {
  position: absolute;
  width: 1px;
  height: 1px;
  overflow: hidden;
  clip-path: inset(50%);
  white-space: nowrap;
}

#detail {
  position: relative;
  padding: 1rem;
  border: 1px solid var(--line);
  border-radius: 6px;
  background: var(--panel);
}
#detail-close { position: absolute; top: .75rem; right: .75rem; }
.meta { display: flex; flex-wrap: wrap; gap: .25rem 1.5rem; margin: 0 0 .5rem; }
.meta dt { color: var(--muted); font-size: 12px; }
.meta dd { margin: 0; }
pre { margin: 0; white-space: pre-wrap; overflow-wrap: anywhere; }
#detail-body {
  padding: .6rem .75rem;
  background: var(--bg);
  border: 1px solid var(--line);
  border-radius: 4px;
  max-height: 24rem;
  overflow: auto;
}
#deliveries { margin-top: 1rem; }
#deliveries pre { max-height: 12rem; overflow: auto; }
pre.error { color: var(--dead); }
'''

PAGE_JS = r'''// wabhook inbox page: polls the JSON API once a second and draws counters, events
// and one event. Every value that comes from an event is inserted as text
// (createTextNode / textContent), never as HTML; the page's Content-Security-Policy
// admits this file and ui.css only.
'use strict';

(function () {
  const TOKEN_KEY = 'wabhook-token';
  const POLL_MS = 1000;
  const PAGE_SIZE = 50;
  const STATUSES = ['pending', 'running', 'done', 'dead', 'discarded', 'skipped'];
  const NONE = '\u2013';  // an en dash for a value that is not there (this file stays ASCII)
  const HANDLER_COLUMNS = ['done', 'failed', 'skipped'];  // runs since the server started

  const state = {
    filters: {}, before: null, newer: [], nextBefore: null,   // the page of events shown
    detailId: null, eventsText: null, detailText: null,        // last answers drawn
                                                               // (skip identical redraws)
    locked: false, running: false, again: false, timer: null, pollFailed: false,
  };

  const $ = (selector) => document.querySelector(selector);

  // -- small helpers -----------------------------------------------------------

  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [name, value] of Object.entries(attrs || {})) {
      if (value !== null && value !== undefined) node.setAttribute(name, String(value));
    }
    for (const child of children) {
      if (child === null || child === undefined) continue;
      node.appendChild(child instanceof Node ? child : document.createTextNode(String(child)));
    }
    return node;
  }

  function utc(seconds) {  // 1764113929.5 -> "2025-11-25 23:38:49Z"
    if (!seconds) return NONE;  // null, or 0 for "no next attempt"
    return new Date(seconds * 1000).toISOString().slice(0, 19).replace('T', ' ') + 'Z';
  }

  function age(seconds) {
    if (!seconds) return NONE;
    return seconds < 90 ? Math.round(seconds) + ' s'
      : seconds < 5400 ? Math.round(seconds / 60) + ' min'
      : (seconds / 3600).toFixed(1) + ' h';
  }

  function pretty(body) {
    try { return JSON.stringify(JSON.parse(body), null, 2); } catch (err) { return String(body); }
  }

  function preview(body) {  // a message's text, else the JSON on one line
    let line = String(body);
    try {
      const parsed = JSON.parse(body);
      if (parsed && typeof parsed.body === 'string') line = parsed.body;
    } catch (err) { /* not JSON: show it as it came */ }
    line = line.replace(/\s+/g, ' ');
    return line.length > 90 ? line.slice(0, 90) + '\u2026' : line;
  }

  function badge(status) {
    const known = STATUSES.includes(status) ? status : 'other';
    return el('span', {class: 'badge st-' + known}, status);
  }

  function setStatus(text) { $('#status').textContent = text; }
  function notice(text, isError) {
    $('#notice').textContent = text;
    $('#notice').classList.toggle('error', Boolean(isError));
  }

  function storedToken() {
    try {
      return sessionStorage.getItem(TOKEN_KEY);
    } catch (err) {
      return null;  // storage disabled
    }
  }

  // -- the API -----------------------------------------------------------------

  class ApiError extends Error {}  // an HTTP answer other than 2xx: .status, .code, .message

  async function api(method, path) {
    const headers = {Accept: 'application/json'};
    const token = storedToken();
    if (token) headers.Authorization = 'Bearer ' + token;
    const response = await fetch(path, {method, headers, cache: 'no-store', credentials: 'omit'});
    const text = await response.text();
    let data = null;
    try { data = JSON.parse(text); } catch (err) { /* not JSON: reported below if not ok */ }
    if (!response.ok) {
      const code = data && data.error ? data.error : 'http_' + response.status;
      const message = data && data.message ? data.message : text.slice(0, 200);
      const err = new ApiError(method + ' ' + path + ': ' + response.status + ' ' + code +
                               (message ? ' (' + message + ')' : ''));
      throw Object.assign(err, {status: response.status, code});
    }
    return {data, text};
  }

  // -- polling -----------------------------------------------------------------

  async function refresh() {
    if (state.locked) return;
    if (state.running) {  // one round at a time; run once more after it
      state.again = true;
      return;
    }
    state.running = true;
    clearTimeout(state.timer);
    try {
      do {
        state.again = false;
        await Promise.all([loadStats(), loadEvents(), loadDetail()]);
      } while (state.again);
      $('#app').hidden = false;
      $('#forget-token').hidden = !storedToken();
      if (state.pollFailed) { state.pollFailed = false; notice(''); }
      setStatus('updated ' + utc(Date.now() / 1000));
    } catch (err) {
      failed(err);
    } finally {
      state.running = false;
      clearTimeout(state.timer);
      if (!state.locked && !document.hidden) state.timer = setTimeout(refresh, POLL_MS);
    }
  }

  function failed(err) {
    if (err instanceof ApiError && err.status === 401) return askForToken(null);
    state.pollFailed = true;
    if (err instanceof ApiError) return notice(err.message, true);
    setStatus('cannot reach the server; retrying');  // fetch rejects only on network errors
  }

  async function loadStats() { renderStats((await api('GET', '/api/stats')).data); }

  function eventsPath() {
    const params = new URLSearchParams();
    for (const name of ['type', 'bridge', 'status']) {
      if (state.filters[name]) params.set(name, state.filters[name]);
    }
    if (state.before !== null) params.set('before', state.before);
    params.set('limit', PAGE_SIZE);
    return '/api/events?' + params.toString();
  }

  async function loadEvents() {
    const path = eventsPath();
    const {data, text} = await api('GET', path);
    if (path !== eventsPath()) { state.again = true; return; }   // filters changed meanwhile
    state.nextBefore = data.next_before;
    updatePager();
    if (text === state.eventsText) return;
    state.eventsText = text;
    renderEvents(data.events);
  }

  async function loadDetail() {
    const id = state.detailId;
    if (id === null) return;
    let answer;
    try {
      answer = await api('GET', '/api/events/' + id);
    } catch (err) {
      if (!(err instanceof ApiError) || err.status !== 404) throw err;
      closeDetail();
      return notice('event #' + id + ' is no longer in the inbox', true);
    }
    if (id !== state.detailId || answer.text === state.detailText) return;
    state.detailText = answer.text;
    renderDetail(answer.data);
  }

  // -- drawing -----------------------------------------------------------------

  function renderStats(stats) {
    const counts = stats.events || {};
    $('#count-received').textContent = stats.received;
    $('#count-pending').textContent = counts.pending || 0;
    $('#count-dead').textContent = counts.dead || 0;
    $('#count-dead').classList.toggle('alert', (counts.dead || 0) > 0);
    $('#count-discarded').textContent = counts.discarded || 0;
    $('#count-per-minute').textContent = Number(stats.per_minute || 0).toFixed(1);
    $('#count-oldest').textContent = age(stats.oldest_pending_age_seconds);
    const handlers = stats.handlers || {};
    const rows = Object.keys(handlers).sort().map((name) => el('tr', {'data-handler': name},
      el('th', {scope: 'row'}, name),
      ...HANDLER_COLUMNS.map((column) => el('td', {'data-count': column},
                                            handlers[name][column] || 0))));
    $('#handlers tbody').replaceChildren(...rows);
  }

  function actionButtons(event) {
    if (event.status !== 'dead') return [];
    return ['replay', 'discard'].map((action) => el('button', {
      type: 'button', 'data-action': action, 'data-id': event.id, class: action,
      'aria-label': (action === 'replay' ? 'Replay' : 'Discard') + ' event ' + event.id,
    }, action === 'replay' ? 'Replay' : 'Discard'));
  }

  function handlersSummary(deliveries) {
    if (!deliveries || deliveries.length === 0) return 'no handler';
    const list = el('span', {class: 'deliveries'});
    for (const delivery of deliveries) {
      const known = STATUSES.includes(delivery.status) ? delivery.status : 'other';
      list.appendChild(el('span', {class: 'delivery st-' + known,
                                   title: delivery.last_error || null},
        delivery.handler + ' ' + delivery.status +
        (delivery.attempts > 1 ? ' \u00d7' + delivery.attempts : '')));
    }
    return list;
  }

  function renderEvents(events) {
    const rows = events.map((event) => el('tr', {'data-id': event.id, 'data-status': event.status},
      el('td', {}, el('button', {type: 'button', class: 'link', 'data-action': 'open',
                                 'data-id': event.id, 'aria-label': 'Show event ' + event.id},
                      '#' + event.id)),
      el('td', {class: 'time'}, utc(event.received_at)),
      el('td', {}, event.bridge === null ? '(default)' : event.bridge),
      el('td', {}, event.event),
      el('td', {}, badge(event.status)),
      el('td', {}, handlersSummary(event.deliveries)),
      el('td', {class: 'preview'}, preview(event.body)),
      el('td', {class: 'actions'}, ...actionButtons(event))));
    $('#events tbody').replaceChildren(...rows);
    markSelected();
    $('#events-empty').hidden = rows.length > 0;
  }

  function renderDetail(event) {
    const panel = $('#detail');
    const opened = panel.hidden || panel.getAttribute('data-id') !== String(event.id);
    panel.hidden = false;
    panel.setAttribute('data-id', event.id);
    panel.setAttribute('data-status', event.status);
    $('#detail-title').textContent = 'Event #' + event.id;
    const meta = [['received', utc(event.received_at)],
                  ['bridge', event.bridge === null ? '(default)' : event.bridge],
                  ['event', event.event], ['status', badge(event.status)]];
    $('#detail-meta').replaceChildren(...meta.map(([name, value]) => el('div', {},
      el('dt', {}, name), el('dd', {}, value))));
    $('#detail-actions').replaceChildren(...actionButtons(event));
    $('#detail-body').textContent = pretty(event.body);
    const rows = (event.deliveries || []).map((delivery) => el('tr',
      {'data-handler': delivery.handler, 'data-status': delivery.status},
      el('th', {scope: 'row'}, delivery.handler),
      el('td', {}, badge(delivery.status)),
      el('td', {}, delivery.attempts),
      el('td', {class: 'time'}, utc(delivery.started_at)),
      el('td', {class: 'time'}, utc(delivery.finished_at)),
      el('td', {}, delivery.exit_status ?? NONE),
      el('td', {class: 'time'}, utc(delivery.next_attempt_at)),
      el('td', {}, delivery.last_error ? el('pre', {class: 'error'}, delivery.last_error) : NONE),
      el('td', {}, delivery.output ? el('pre', {}, delivery.output) : NONE)));
    $('#deliveries tbody').replaceChildren(...rows);
    if (opened) panel.scrollIntoView({block: 'nearest'});
  }

  function updatePager() {
    $('#page-older').disabled = state.nextBefore === null || state.nextBefore === undefined;
    $('#page-newer').disabled = $('#page-latest').disabled = state.before === null;
  }

  // -- what the user does ------------------------------------------------------

  function askForToken(message) {
    const hadToken = Boolean(storedToken());
    state.locked = true;
    clearTimeout(state.timer);
    $('#app').hidden = true;
    $('#forget-token').hidden = true;
    $('#token-form').hidden = false;
    $('#token-message').textContent = message || (hadToken
      ? 'The server refused this token (401). Enter the one given to --token.'
      : 'The API answered 401: this inbox needs the token given to the server with --token.');
    setStatus('needs the token');
    $('#token-input').focus();
  }

  function unlock(event) {
    event.preventDefault();
    const token = $('#token-input').value.trim();
    if (!token) return;
    try {
      sessionStorage.setItem(TOKEN_KEY, token);
    } catch (err) {
      return notice('this browser refuses sessionStorage', true);
    }
    $('#token-input').value = '';
    $('#token-form').hidden = true;
    state.locked = false;
    state.eventsText = state.detailText = null;
    setStatus('loading\u2026');
    refresh();
  }

  function applyFilters() {
    state.filters = {type: $('#filter-type').value.trim(), bridge: $('#filter-bridge').value.trim(),
                     status: $('#filter-status').value};
    page('latest');
  }

  function page(direction) {
    if (direction === 'older' && state.nextBefore !== null) {
      state.newer.push(state.before);
      state.before = state.nextBefore;
    } else if (direction === 'newer') {
      state.before = state.newer.length ? state.newer.pop() : null;
    } else if (direction === 'latest') {
      state.before = null;
      state.newer = [];
    }
    state.eventsText = null;
    updatePager();
    refresh();
  }

  function openDetail(id) {
    state.detailId = id;
    state.detailText = null;
    markSelected();
    refresh();
  }

  function closeDetail() {
    state.detailId = state.detailText = null;
    $('#detail').hidden = true;
    markSelected();
  }

  function markSelected() {
    for (const row of document.querySelectorAll('#events tbody tr')) {
      row.classList.toggle('selected', Number(row.dataset.id) === state.detailId);
    }
  }

  async function act(action, id, button) {
    button.disabled = true;
    try {
      await api('POST', '/api/events/' + id + '/' + action);
      notice((action === 'replay' ? 'Replayed' : 'Discarded') + ' event #' + id, false);
    } catch (err) {
      if (err instanceof ApiError && err.status === 401) return askForToken(null);
      notice(err instanceof ApiError ? err.message : 'cannot reach the server', true);
    }
    state.eventsText = state.detailText = null;
    refresh();
  }

  function clicked(event) {
    const button = event.target.closest('button[data-action]');
    const row = event.target.closest('#events tbody tr[data-id]');
    if (!button) {
      if (row && !event.target.closest('a, input, select, pre')) openDetail(Number(row.dataset.id));
      return;
    }
    const action = button.dataset.action;
    const id = Number(button.dataset.id);
    if (action === 'open') openDetail(id);
    else if (action === 'replay' || action === 'discard') act(action, id, button);
    else if (action === 'close') closeDetail();
    else if (action === 'older' || action === 'newer' || action === 'latest') page(action);
    else if (action === 'forget') {
      sessionStorage.removeItem(TOKEN_KEY);
      askForToken('Token forgotten.');
    }
    else if (action === 'show-dead') { $('#filter-status').value = 'dead'; applyFilters(); }
  }

  function start() {
    $('#token-form').addEventListener('submit', unlock);
    $('#filters').addEventListener('submit', (event) => {
      event.preventDefault();
      applyFilters();
    });
    $('#filters').addEventListener('change', applyFilters);
    // 'reset' fires before the fields clear: apply the filters once they have
    $('#filters').addEventListener('reset', () => setTimeout(applyFilters, 0));
    document.addEventListener('click', clicked);
    document.addEventListener('visibilitychange',
                              () => (document.hidden ? clearTimeout(state.timer) : refresh()));
    refresh();
  }

  start();
}());
'''
# (end of the inbox page's files)

PAGE_FILES = {
    "/": (PAGE_HTML.encode("utf-8"), "text/html; charset=utf-8"),
    "/ui.css": (PAGE_CSS.encode("utf-8"), "text/css; charset=utf-8"),
    "/ui.js": (PAGE_JS.encode("utf-8"), "text/javascript; charset=utf-8"),
}
# Event bodies are people's messages: the page runs only its own script (no inline script, no
# other origin), cannot be framed, and the browser sniffs no other type from these files.
# bodies are messages
API_HEADERS = (("X-Content-Type-Options", "nosniff"), ("Cache-Control", "no-store"))
PAGE_HEADERS = (
    ("Content-Security-Policy", "default-src 'self'; img-src 'self' data:; frame-ancestors 'none';"
                                " base-uri 'none'; form-action 'self'"),
    ("X-Content-Type-Options", "nosniff"),
    ("X-Frame-Options", "DENY"),
    ("Referrer-Policy", "no-referrer"),
    ("Cache-Control", "no-store"),
)
API_PAGE_SIZE = 50
API_MAX_PAGE = 200


class InboxAPI:
    """The JSON API behind the inbox page, usable with curl (README: Reference, Inbox page API).

    GET /api/stats, GET /api/events (filters and paging), GET /api/events/ID,
    POST /api/events/ID/replay and /discard: the same Inbox calls as the
    CLI's `events`, `show`, `replay` and `discard`. Runs in a reply thread;
    refusals are HTTPErrors, answered like any other.
    """

    def __init__(self, inbox: "Inbox", metrics: Metrics, wake: Callable[[], None]):
        # wake: the dispatcher, after a replay
        self.inbox, self.metrics, self.wake = inbox, metrics, wake

    def answer(self, method: str, path: str, query: str) -> Tuple[int, dict]:
        """Route a request under /api/ to stats, events, one event, replay or discard."""
        parts = path.rstrip("/").split("/")[2:]  # /api/events/7/replay -> events, 7, replay
        if parts == ["stats"]:
            return 200, self._read_only(method, self.stats)
        if parts == ["events"]:
            return 200, self._read_only(method, lambda: self.events(urllib.parse.parse_qs(query)))
        if len(parts) in (2, 3) and parts[0] == "events" and re.fullmatch(r"[0-9]{1,18}", parts[1]):
            event_id = int(parts[1])
            if len(parts) == 2:
                return 200, self._read_only(method, lambda: self.event(event_id))
            if parts[2] in ("replay", "discard"):
                if method != "POST":
                    raise MethodNotAllowed("method_not_allowed", "use POST",
                                           headers=(("Allow", "POST"),))
                return 200, (self.replay(event_id) if parts[2] == "replay"
                             else self.discard(event_id))
        raise NotFound("not_found", "no such API path; see the README's reference for /api/")

    @staticmethod
    def _read_only(method: str, read: Callable[[], dict]) -> dict:
        if method not in ("GET", "HEAD"):
            raise MethodNotAllowed("method_not_allowed", "use GET",
                                   headers=(("Allow", "GET, HEAD"),))
        return read()

    def stats(self) -> dict:
        """The page's counters, polled every second: index lookups and this process's counters only
        (the CLI's `stats` also counts the whole inbox by type and handler, which scans it)."""
        events = self.inbox.counts()
        return {"received": sum(events.values()), "events": events,
                "per_minute": self.metrics.stored_last_minute(),
                "handlers": self.metrics.runs_by_handler(),
                "oldest_pending_age_seconds": self.inbox.oldest_pending_age(),
                "version": __version__}

    def events(self, query: Dict[str, List[str]]) -> dict:
        """GET /api/events: a page of events filtered by the query, and where the next begins."""
        def one(name: str) -> Optional[str]:
            values = query.get(name)
            return values[-1] if values and values[-1] != "" else None

        status, limit, before = one("status"), one("limit"), one("before")
        if status is not None and status not in EVENT_STATUSES:
            raise BadRequest("bad_query", "status is one of " + ", ".join(EVENT_STATUSES))
        for name, value in (("limit", limit), ("before", before)):
            if value is not None and not re.fullmatch(r"[0-9]{1,18}", value):
                raise BadRequest("bad_query", "%s is a whole number" % name)
        size = min(max(int(limit), 1), API_MAX_PAGE) if limit else API_PAGE_SIZE
        events = self.inbox.list_events(status, size + 1, one("type"), one("bridge"),
                                        int(before) if before else None)
        return {"events": events[:size], "next_before": events[size - 1]["id"] if len(events) > size
                else None}

    def event(self, event_id: int) -> dict:
        """GET /api/events/<id>: one event with its deliveries; NotFound if there is none."""
        event = self.inbox.event_detail(event_id)
        if event is None:
            raise NotFound("not_found", "no event %d in the inbox" % event_id)
        return event

    def replay(self, event_id: int) -> dict:
        """POST /api/events/<id>/replay: queue the event again and wake the dispatcher."""
        if not self.inbox.replay([event_id]):
            raise NotFound("not_found", "no event %d in the inbox" % event_id)
        self.wake()
        return {"replayed": [event_id]}

    def discard(self, event_id: int) -> dict:
        """POST /api/events/<id>/discard: set a dead event aside; Conflict unless dead."""
        before = self.inbox.discard([event_id])
        if event_id not in before:
            raise NotFound("not_found", "no event %d in the inbox" % event_id)
        if before[event_id] != "dead":
            raise Conflict("not_dead", "event %d is %s, not dead: only dead letters are discarded"
                           % (event_id, before[event_id]))
        return {"discarded": [event_id]}


# Headers a reverse proxy adds to what it passes on (see Operator.admit).
PROXY_HEADERS = ("Forwarded", "X-Forwarded-For", "X-Real-IP")
Endpoint = namedtuple("Endpoint", "methods token static answer private")
Endpoint.__doc__ = """One operator path: the methods it takes (None: answer() checks them),
whether it
wants --token, and either `static` (body, content type, headers) or answer(method, path, query) ->
(status, payload) or (status, body, content type), run in a reply thread of its own (it may wait
for the inbox). `private`: the page and its API, which the browser of this machine's user reaches
(see Operator.admit)."""


class Operator:
    """What operators ask the server, besides events: /healthz, /metrics, the inbox page and /api/.

    The HTTP front (section 6) asks endpoint(path) for every request and
    leaves method, token and threading to the Endpoint it gets back.
    """

    def __init__(self, server: "Server"):
        self.server = server
        config = server.config
        # Event bodies are private messages: without a token only this machine may see them.
        self.serves_page = not config.no_ui and (bool(config.token) or is_loopback(config.host))
        self.api = InboxAPI(server.inbox, server.metrics, server.dispatcher.wake)
        self._endpoints = {
            "/healthz": Endpoint(("GET", "HEAD"), False, None, lambda *_request: self.health(),
                                 False),
            "/metrics": Endpoint(("GET", "HEAD"), True, None, lambda *_request: self.metrics(),
                                 False),
        }
        if self.serves_page:  # the page's files hold no data: no token, so the page can ask for it
            for path, (body, content_type) in PAGE_FILES.items():
                self._endpoints[path] = Endpoint(("GET", "HEAD"), False, (body, content_type,
                                                                          PAGE_HEADERS),
                                                 None, True)
        self._api = Endpoint(None, True, None, self.api.answer, True)

    def endpoint(self, path: str) -> Optional[Endpoint]:
        """The operator endpoint at `path`, or None (the path is the hook's, or unknown)."""
        found = self._endpoints.get(path)
        if found is None and self.serves_page and (path == "/api" or path.startswith("/api/")):
            return self._api
        return found

    def admit(self, method: str, headers: "Headers") -> None:
        """Without --token, refuse what could reach the page from beyond this machine's user.

        The page is then served on loopback only, and everything that can reach
        127.0.0.1 is let in, so three more doors are closed: a web page the user
        visits re-pointing its own name at 127.0.0.1 (DNS rebinding: the Host must
        be a loopback one), a reverse proxy on this machine passing the internet's
        requests on (they carry Forwarded or X-Forwarded-For), and a form on any
        site POSTing to 127.0.0.1 (no preflight: the Origin must be this server).
        With a token none of them has it: the page asks for it and sends it as a
        Bearer header, which a cross-site request cannot carry.
        """
        if self.server.config.token:
            return
        host = headers.get("Host", "")
        if not is_loopback(_host_of(host)):
            raise Forbidden("forbidden_host", "without --token the page answers only requests for"
                                              " localhost or a loopback address; set --token to"
                                              " reach it by another name")
        if any(headers.get(name) is not None for name in PROXY_HEADERS):
            raise Forbidden("forbidden_host", "without --token the page is not served through a"
                                              " proxy; set --token to reach it that way")
        origin = headers.get("Origin")
        if (method == "POST" and origin is not None
                and urllib.parse.urlsplit(origin).netloc.lower() != host.lower()):
            raise Forbidden("cross_origin", "a POST from another origin is refused; use the page"
                                            " itself or curl")

    def health(self) -> Tuple[int, dict]:
        """GET /healthz: 200 when events are stored and delivered, else 503 saying why."""
        server = self.server
        payload = {"status": "ok", "version": __version__,
                   "uptime_seconds": round(time.time() - server.started_at, 3)}
        if server.registry.folder_missing():
            payload.update(status="unavailable", error="the handlers folder is missing")
            return 503, payload
        try:
            server.inbox.check_writable()
            payload.update(server.inbox.counts(("pending", "dead")))
            payload["handlers"] = len(server.registry.names())
            payload["running"] = server.dispatcher.busy
            # A run ends by --script-timeout; one still "running" a lease later holds its chat up.
            payload["stuck"] = server.inbox.stuck_deliveries(server.config.script_timeout
                                                             + LEASE_SECONDS)
            if payload["stuck"]:
                payload.update(status="stuck", error="deliveries have been running for longer than"
                                                     " --script-timeout: their chats do not move")
                return 503, payload
            return 200, payload
        except InboxUnavailable as exc:
            server.log.error("health check: %s", exc)
            payload.update(status="unavailable", error="the inbox is not writable")
            return 503, payload

    def metrics(self) -> Tuple[int, bytes, str]:
        """GET /metrics: this process's counters and the inbox's gauges, in the Prometheus text
        format."""
        try:
            gauges = self.server.inbox.counts(("pending", "dead"))
        except InboxUnavailable:
            gauges = {}
        return (200, self.server.metrics.render(gauges).encode("utf-8"),
                "text/plain; version=0.0.4; charset=utf-8")


# ---------------------------------------------------------------------------
# 8. Server lifecycle
# ---------------------------------------------------------------------------

def _host_of(authority: str) -> str:
    """The host of a Host header: 127.0.0.1:3000 -> 127.0.0.1, [::1]:3000 -> ::1, localhost ->
    localhost."""
    if authority.startswith("["):
        return authority[1:authority.find("]")] if "]" in authority else authority
    return authority.rsplit(":", 1)[0] if authority.count(":") == 1 else authority


def is_loopback(host: str) -> bool:
    """True for an address only this machine can reach (127.0.0.0/8, ::1, localhost)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to anything


class ServerError(Exception):
    """The server cannot start (port in use, bad certificate); the message says what to do."""


# a burst of new connections waits in the kernel, not refused (the default 5 stalls it)
LISTEN_BACKLOG = 1024


def _listen(host: str, port: int) -> socket.socket:
    """The listening socket; OSError as socket.bind raises it."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    listener = socket.socket(family, socket.SOCK_STREAM)
    try:
        # restart at once on the same port
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((host, port))
        listener.listen(LISTEN_BACKLOG)
    except OSError:
        listener.close()
        raise
    return listener


class Server:
    """One run of wabhook: owns the inbox, the handler registry, the dispatcher and the listener.

    start() brings them up in that order; stop() takes them down in reverse:
    stop accepting, let running handlers finish, close the inbox.
    """

    def __init__(self, config: Config, log: Optional[logging.Logger] = None):
        self.config = config
        self.log = log or logging.getLogger("wabhook")
        self.started_at = time.time()
        self.signing_key = signing_key(config.secret) if config.secret else None
        self.metrics = Metrics()
        if os.path.exists(config.handlers) and not os.path.isdir(config.handlers):
            raise ServerError("--handlers %s is a file, not a folder: pass the folder your "
                              "handlers are in"
                              % config.handlers)
        if not os.path.isdir(config.handlers):
            try:
                os.makedirs(config.handlers)
                self.log.info("created the handlers folder %s: put <event>.py files in it",
                              config.handlers)
            except OSError as exc:
                raise ServerError("cannot create the handlers folder %s: %s" % (config.handlers,
                                                                                exc)) from None
        self.inbox = Inbox(config.db)
        self.registry = Registry(config.handlers, self.log, environ=os.environ)
        self.dispatcher = Dispatcher(config, self.inbox, self.registry, self.metrics, self.log,
                                     script_environment(config, os.environ))
        self.intake = Intake(self.inbox, config, self.log, self.registry.folder_missing,
                             self._stored)
        self.operator = Operator(self)
        self.front: Optional[HTTPFront] = None

    # -- lifecycle ---------------------------------------------------------

    def start(self) -> "Server":
        """Listen and start serving; ServerError if it cannot listen."""
        config = self.config
        try:
            listener = _listen(config.host, config.port)
        except OSError as exc:
            self.inbox.close()
            raise ServerError("cannot listen on %s port %d: %s%s" % (
                config.host, config.port, exc.strerror or exc,
                " (another program uses it: pick another --port)" if exc.errno == errno.EADDRINUSE
                else "")) from None
        if config.tls_cert:
            ssl = use_tls()
            context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            context.minimum_version = ssl.TLSVersion.TLSv1_2
            try:
                context.load_cert_chain(config.tls_cert, config.tls_key)
            except (OSError, ssl.SSLError) as exc:
                listener.close()
                self.inbox.close()
                raise ServerError("cannot load --tls-cert/--tls-key: %s" % exc) from None
            listener = context.wrap_socket(listener, server_side=True,
                                           do_handshake_on_connect=False)
        self._raise_descriptor_limit()
        self._capture_output()
        self.dispatcher.start()
        self.intake.accepting = True
        self.front = HTTPFront(self, listener)
        self.front.start()
        self.log.info("wabhook %s listening on %s (handlers: %s, inbox: %s)", __version__, self.url,
                      self.registry.folder, config.db)
        if not config.token and not is_loopback(config.host):
            self.log.warning("no --token set while listening on %s: anyone who can reach this "
                             "port can post"
                             " events; set --token and put ?token=... in the webhook URL",
                             config.host)
        if self.operator.serves_page:
            self.log.info("inbox page: %s/%s", self.url[:len(self.url) - len(config.path)],
                          " (it asks for the --token)" if config.token else "")
        elif not config.no_ui:
            self.log.info("the inbox page is off: it shows private messages, so it is "
                          "served only with a"
                          " --token or on a loopback --host (127.0.0.1); --no-ui "
                          "silences this line")
        return self

    def _raise_descriptor_limit(self) -> None:
        """Take the hard limit of open files as the soft one (systemd's default soft limit is
        1,024)."""
        try:
            import resource  # POSIX only
            soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
            wanted = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
            if soft != resource.RLIM_INFINITY and soft < wanted:
                resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
                self.log.info("open files: raised the soft limit from %d to %d", soft, wanted)
        except (ImportError, ValueError, OSError) as exc:
            self.log.warning("open files: cannot raise the soft limit: %s", exc)

    def _capture_output(self):
        """Attribute Python handlers' prints: stdout lines log at INFO, stderr lines at WARNING."""
        if not isinstance(sys.stdout, HandlerOutput):
            sys.stdout = HandlerOutput(sys.stdout, self.log, logging.INFO)
            self._installed_stdout = sys.stdout
        if not isinstance(sys.stderr, HandlerOutput):
            sys.stderr = HandlerOutput(sys.stderr, self.log, logging.WARNING)
            self._installed_stderr = sys.stderr

    def _release_output(self):
        for name in ("stdout", "stderr"):
            installed = getattr(self, "_installed_" + name, None)
            if installed is not None and getattr(sys, name) is installed:
                setattr(sys, name, installed._stream)

    @property
    def port(self) -> int:
        """The port listened on (the one the system chose for port 0)."""
        return self.front.listener.getsockname()[1] if self.front else self.config.port

    @property
    def url(self) -> str:
        """The base URL to reach this server (127.0.0.1 for a wildcard host)."""
        host = self.config.host
        if host in ("0.0.0.0", "::", ""):
            host = "127.0.0.1"
        elif ":" in host:
            host = "[%s]" % host
        scheme = "https" if self.config.tls_cert else "http"
        return "%s://%s:%d%s" % (scheme, host, self.port, self.config.path)

    def _stored(self, event_type: str, duplicate: bool) -> None:
        """An event is committed: count it, and have a new one dispatched."""
        self.metrics.event_received(event_type, duplicate)
        if not duplicate:
            self.dispatcher.wake()

    def stop(self) -> bool:
        """Stop accepting, let running handlers finish (--shutdown-timeout), close the inbox."""
        # a request on an open connection now gets 503 and Connection: close
        self.intake.accepting = False
        if self.front is not None:
            self.front.stop_listening()
        finished = self.dispatcher.stop(self.config.shutdown_timeout)
        if self.front is not None:
            self.front.stop()
        self.dispatcher.context.connections.close()
        self.inbox.close()
        self._release_output()
        self.log.info("stopped; %s", "every running handler finished" if finished
                      else "unfinished runs went back to the inbox")
        return finished


def serve(config: Config, log: logging.Logger) -> int:
    """Run until SIGTERM or SIGINT, then shut down cleanly and return 0."""
    server = Server(config, log).start()
    stop_requested = threading.Event()

    def on_signal(signum, frame):
        # Only flags: the main loop below does the work. A second signal ends the
        # wait for running handlers at once.
        if stop_requested.is_set():
            server.dispatcher.stop_waiting()
        stop_requested.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    while not stop_requested.wait(0.5):
        pass
    log.info("shutting down: no new connections; running handlers get %gs to finish",
             config.shutdown_timeout)
    server.stop()
    return 0


# ---------------------------------------------------------------------------
# 9. CLI
# ---------------------------------------------------------------------------

REPLAY_BATCH = 500


CONTROL_CHARACTERS = re.compile(r"[\x00-\x09\x0b-\x1f\x7f-\x9f]")


def escape_controls(text: str) -> str:
    """Text with control characters (ESC, CR, NUL ...; newlines too) shown as \\xNN: safe for a
    terminal line."""
    return CONTROL_CHARACTERS.sub(lambda match: "\\x%02x" % ord(match.group()), text.replace("\n",
                                                                                             "\\n"))


class _TextFormatter(logging.Formatter):
    """Readable lines in which nothing a sender or a handler wrote can move the cursor or forge a
    line:
    control characters are escaped, and the lines of a long message after its first are indented."""

    def format(self, record: logging.LogRecord) -> str:
        """The record as text, control characters escaped, continuation lines indented."""
        return "\n    ".join(escape_controls(line) for line in super().format(record).split("\n"))


class _JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, message, and event_id/handler when known."""

    def format(self, record: logging.LogRecord) -> str:
        """The record as one JSON object on one line."""
        entry = {"time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + ".%03dZ" % record.msecs,
                 "level": record.levelname.lower(), "message": record.getMessage()}
        for key in ("event_id", "handler"):
            if hasattr(record, key):
                entry[key] = getattr(record, key)
        if record.exc_info:
            entry["traceback"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def setup_logging(config: Config, stream=None) -> logging.Logger:
    """Configure the wabhook logger from --log-format and --log-level; return it."""
    log = logging.getLogger("wabhook")
    for old in list(log.handlers):
        log.removeHandler(old)
    handler = logging.StreamHandler(stream or sys.stderr)
    if config.log_format == "json":
        formatter: logging.Formatter = _JsonFormatter()
    else:
        formatter = _TextFormatter("%(asctime)s %(levelname)s %(message)s")
    formatter.converter = time.gmtime
    handler.setFormatter(formatter)
    log.addHandler(handler)
    log.setLevel(config.log_level.upper())
    log.propagate = False
    return log


def _help_for(option: Option) -> str:
    default = option.default
    shown = "off" if default is False or default is None else default
    return "%s (env %s; default: %s)" % (option.help, env_name(option.name), shown)


def _positive(text: str) -> int:
    if not re.fullmatch(r"[0-9]{1,9}", text) or int(text) < 1:
        raise argparse.ArgumentTypeError("expected a whole number of at least 1, such as 50")
    return int(text)


def _event_id(text: str) -> int:
    if not re.fullmatch(r"[0-9]{1,18}", text):
        raise argparse.ArgumentTypeError("expected an inbox id such as 42 (see `events`)")
    return int(text)


def _program_name() -> str:
    """How the user ran us, for usage and examples: `wabhook` once installed, else `python3
    wabhook.py`."""
    name = os.path.basename(sys.argv[0] or "")
    return "wabhook" if name == "wabhook" else "python3 wabhook.py"


def _option_parser(names: Tuple[str, ...]) -> argparse.ArgumentParser:
    """The settings flags of one command, built from OPTIONS (default None: unset)."""
    parser = argparse.ArgumentParser(add_help=False)
    if not names:
        return parser
    group = parser.add_argument_group("settings (each also read from WABHOOK_<NAME>; a flag wins)")
    for option in OPTIONS:
        if option.name not in names:
            continue
        if option.kind == "bool":
            group.add_argument(flag_name(option.name), dest=option.name, action="store_true",
                               default=None,
                               help=_help_for(option))
        else:
            metavar = "{%s}" % ",".join(option.kind) if isinstance(option.kind,
                                                                   tuple) else option.name.upper()
            group.add_argument(flag_name(option.name), dest=option.name, metavar=metavar,
                               default=None,
                               help=_help_for(option))
    return parser


def build_parser(prog: str = "python3 wabhook.py") -> argparse.ArgumentParser:
    """The command line: one subcommand per row of COMMANDS, each with the settings it uses."""
    parser = argparse.ArgumentParser(
        prog=prog, description="Receive WhatsApp bridge webhooks and run your handlers "
                               "for each event.",
        epilog="Without a command, wabhook serves: %s --port 3000" % prog,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version="wabhook " + __version__)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, command in COMMANDS.items():
        sub = commands.add_parser(name, parents=[_option_parser(command.settings)],
                                  help=command.summary,
                                  description=command.summary,
                                  epilog="example:\n  " + command.example.replace("{prog}", prog),
                                  formatter_class=argparse.RawDescriptionHelpFormatter)
        if command.arguments:
            command.arguments(sub)
    return parser


def _open_existing_inbox(config: Config) -> Inbox:
    if not os.path.exists(config.db):
        raise InboxUnavailable("no inbox at %s: start the server first, or pass --db" % config.db)
    return Inbox(config.db)


def _output(data, as_json: bool, text_lines: Callable[[object], List[str]]) -> None:
    """The one way the inspecting commands print: JSON for scripts, text lines for people."""
    if as_json:
        print(json.dumps(data, indent=2))
    else:
        for line in text_lines(data):
            print(line)


def _utc(timestamp: Optional[float]) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(timestamp)) if timestamp else "-"


EVENTS_HEADER = "%-6s %-19s  %-8s %-24s %-9s %s" % ("ID", "RECEIVED (UTC)", "BRIDGE", "EVENT",
                                                    "STATUS",
                                                  "DELIVERIES (handler:status(attempts))")


def _event_rows(events: List[dict]) -> List[str]:
    lines = []
    for item in events:
        deliveries = " ".join("%s:%s(%d)" % (escape_controls(d["handler"]), d["status"],
                                             d["attempts"])
                              for d in item["deliveries"])
        lines.append("%-6d %s  %-8s %-24s %-9s %s" % (
            item["id"], _utc(item["received_at"]), escape_controls(item["bridge"] or "-"),
            escape_controls(item["event"]), item["status"], deliveries or "(no handler)"))
        for delivery in item["deliveries"]:
            if delivery["status"] in ("dead", "pending") and delivery["last_error"]:
                last = delivery["last_error"].strip().splitlines()[-1]
                lines.append("       %s: %s" % (escape_controls(delivery["handler"]),
                                                escape_controls(last[:200])))
    return lines


def _event_lines(events: List[dict]) -> List[str]:
    return [EVENTS_HEADER] + _event_rows(events) if events else ["no events"]


def _detail_lines(event: dict) -> List[str]:
    try:
        body = json.dumps(json.loads(event["body"]), indent=2, ensure_ascii=False)
    except ValueError:
        body = event["body"]
    lines = ["event %d: %s from bridge %s, received %s UTC, %s" % (
        event["id"], escape_controls(event["event"]), escape_controls(event["bridge"]
                                                                      or "(default)"),
        _utc(event["received_at"]), event["status"]), ""]
    lines += [escape_controls(line) for line in body.splitlines()]
    if not event["deliveries"]:
        lines += ["", "no handler took it"]
    for d in event["deliveries"]:
        lines += ["", "%s: %s after %d attempt%s" % (escape_controls(d["handler"]), d["status"],
                                                     d["attempts"],
                                                     "" if d["attempts"] == 1 else "s")]
        if d["started_at"]:
            lines.append("  last run: started %s UTC, %s" % (
                _utc(d["started_at"]), "ended %s UTC" % _utc(d["finished_at"]) if d["finished_at"]
                else "running"))
        if d["exit_status"] is not None:
            lines.append("  exit status: %d" % d["exit_status"])
        if d["status"] == "pending" and d["next_attempt_at"] and d["attempts"]:
            lines.append("  next try: %s UTC" % _utc(d["next_attempt_at"]))
        for label, text in (("last error", d["last_error"]), ("output", d["output"])):
            if text:
                lines.append("  %s:" % label)
                lines += ["    " + escape_controls(line) for line in text.rstrip("\n").splitlines()]
    return lines


def _stats_lines(stats: dict) -> List[str]:
    lines = ["events: %s" % ", ".join("%d %s" % (n, status)
                                      for status, n in stats["events"].items())]
    if stats["oldest_pending_age_seconds"]:
        lines.append("oldest pending: %.0fs ago" % stats["oldest_pending_age_seconds"])
    lines.append("by type: " + (", ".join("%s %d" % (escape_controls(event_type), n)
                                          for event_type, n in stats["by_type"].items()) or "none"))
    for handler, by_status in stats["deliveries_by_handler"].items():
        lines.append("handler %s: %s" % (escape_controls(handler),
                                         ", ".join("%d %s"
                                                   % (n, s) for s, n in sorted(by_status.items()))))
    return lines


def cmd_serve(config: Config, args, log: logging.Logger) -> int:
    """serve: run the receiver until SIGTERM or SIGINT."""
    return serve(config, log)


def cmd_send(config: Config, args, log: logging.Logger) -> int:
    """send: POST a sample event (with --set changes) to a running server."""
    payload = dict(SAMPLES[args.event])
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep or not key:
            print("error: --set takes KEY=VALUE, got %r" % item, file=sys.stderr)
            return 2
        try:
            payload[key] = json.loads(value)
        except ValueError:
            payload[key] = value
    if args.bridge is not None and not BRIDGE_LABEL.fullmatch(args.bridge):
        print("error: --bridge takes 1 to 128 of A-Z a-z 0-9 . _ : -", file=sys.stderr)
        return 2
    url = args.url
    if url and "://" not in url:
        url = "http://" + url  # host:port/hook
    if not url:
        host = "127.0.0.1" if config.host in ("0.0.0.0", "::", "") else config.host
        host = "[%s]" % host if ":" in host else host
        url = "%s://%s:%d%s" % ("https" if config.tls_cert else "http", host, config.port,
                                config.path)
    if args.bridge:
        url = url.rstrip("/") + "/" + args.bridge
    body = json.dumps(payload).encode("utf-8")
    headers = {"Content-Type": "application/json"}
    if config.token:
        headers["Authorization"] = "Bearer " + config.token
    if config.secret:
        headers.update(sign_body(signing_key(config.secret), body))
    import urllib.error
    import urllib.request
    request = urllib.request.Request(url, data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            print("%d %s" % (response.status, response.read().decode("utf-8", "replace")))
            return 0
    except urllib.error.HTTPError as exc:
        print("%d %s" % (exc.code, exc.read().decode("utf-8", "replace")))
        return 1
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        print("error: cannot reach %s: %s (is the server running? %s --port %d)"
              % (url, reason, _program_name(), config.port), file=sys.stderr)
        return 1


def cmd_samples(config: Config, args, log: logging.Logger) -> int:
    """samples: print the sample payload of one event type, or every sample, one per line."""
    if args.event:
        print(json.dumps(SAMPLES[args.event], indent=2))
    else:
        for event_type in EVENT_TYPES:  # one per line, as events.jsonl: `samples | while read ...`
            print(json.dumps(SAMPLES[event_type]))
    return 0


def cmd_check(config: Config, args, log: logging.Logger) -> int:
    """check: load every handler as the server would and print what is wrong."""
    good, problems = check_handlers(config.handlers, os.environ)  # ${VAR}s as the server reads them
    for name in good:
        print("ok       %s" % name)
        if handler_event(name) not in KNOWN_PREFIXES:
            print("note     %s: %r is not one of the documented events; it runs when "
                  "events of that type"
                  " arrive" % (name, handler_event(name)))
    for problem in problems:
        print("problem  %s: %s" % (problem.file, problem.message))
    print("%d handlers ok, %d problems in %s" % (len(good), len(problems), config.handlers))
    return 1 if problems else 0


FOLLOW_POLL_SECONDS = 0.5


def cmd_events(config: Config, args, log: logging.Logger) -> int:
    """events: list the inbox's latest events (--follow to keep watching)."""
    if args.follow and args.status not in (None, "pending"):
        # A new event is pending when it is printed, and is not looked at again.
        print("error: --follow prints events as they arrive, all pending; --status %s works"
              " without --follow" % args.status, file=sys.stderr)
        return 2
    inbox = _open_existing_inbox(config)
    filters = {"status": args.status, "event_type": args.type, "bridge": args.bridge}
    try:
        last = inbox.newest_id()  # first: an event stored meanwhile is printed by the loop below
        events = inbox.list_events(limit=args.limit, before=last + 1, **filters)
        if not args.follow:
            _output(events, args.json, _event_lines)
            return 0
        # Like `tail -f`: the last --limit events oldest first, then each new one once it is stored.
        # Ids grow in commit order, so "after the newest id seen" misses nothing and repeats
        # nothing.
        if not args.json:
            print(EVENTS_HEADER)
        while True:
            for item in reversed(events):
                print(json.dumps(item) if args.json else "\n".join(_event_rows([item])), flush=True)
            time.sleep(FOLLOW_POLL_SECONDS)
            newest = inbox.newest_id()
            events = inbox.list_events(limit=REPLAY_BATCH, after=last, before=newest + 1,
                                       **filters)[::-1]
            last = events[0]["id"] if len(events) == REPLAY_BATCH else newest
    except KeyboardInterrupt:
        return 0
    finally:
        inbox.close()


def cmd_show(config: Config, args, log: logging.Logger) -> int:
    """show: print one event with its body and deliveries."""
    inbox = _open_existing_inbox(config)
    try:
        event = inbox.event_detail(args.id)
    finally:
        inbox.close()
    if event is None:
        print("error: no event %d in %s (see `%s events`)" % (args.id, config.db, _program_name()),
              file=sys.stderr)
        return 1
    _output(event, args.json, _detail_lines)
    return 0


def cmd_stats(config: Config, args, log: logging.Logger) -> int:
    """stats: print counts of events and deliveries by status."""
    inbox = _open_existing_inbox(config)
    try:
        _output(inbox.stats(), args.json, _stats_lines)
    finally:
        inbox.close()
    return 0


def _ids_or_dead(config: Config, args, verb: Tuple[str, str],
                 act: Callable[[Inbox, List[int]], Tuple[List[int], List[str]]]) -> int:
    """`replay` and `discard`: act(inbox, ids) -> (ids acted on, errors) on the ids given, or
    on every dead event (--dead), REPLAY_BATCH at a time with progress.

    verb: the past and the progressive, ("replayed", "replaying").
    """
    if bool(args.ids) == bool(args.dead):
        print("error: give event ids or --dead (not both)", file=sys.stderr)
        return 2
    done_word, doing_word = verb
    args.ids = list(dict.fromkeys(args.ids))  # `discard 5 5` is discard 5
    inbox = _open_existing_inbox(config)
    try:
        if not args.dead:
            acted, errors = act(inbox, args.ids)
        else:
            total, after = 0, 0
            while True:
                batch = inbox.dead_event_ids(after, REPLAY_BATCH)
                if not batch:
                    break
                acted, _changed_meanwhile = act(inbox, batch)  # another process may be at it too
                total, after = total + len(acted), batch[-1]
                print("%s dead events: %d so far" % (doing_word, total), file=sys.stderr)
            print("%s %d dead events" % (done_word, total))
            return 0
    finally:
        inbox.close()
    print("%s %d events%s" % (done_word, len(acted),
                              (": " + " ".join(map(str, acted))) if acted else ""))
    for error in errors:
        print("error: " + error, file=sys.stderr)
    return 1 if errors else 0


def cmd_replay(config: Config, args, log: logging.Logger) -> int:
    """replay: queue events again, by id or every dead one (--dead)."""
    def replay(inbox: Inbox, ids: List[int]) -> Tuple[List[int], List[str]]:
        replayed = inbox.replay(ids)
        return replayed, ["no event %d in %s" % (event_id, config.db)
                          for event_id in sorted(set(ids) - set(replayed))]
    return _ids_or_dead(config, args, ("replayed", "replaying"), replay)


def cmd_discard(config: Config, args, log: logging.Logger) -> int:
    """discard: set dead events aside, by id or every one (--dead)."""
    def discard(inbox: Inbox, ids: List[int]) -> Tuple[List[int], List[str]]:
        before = inbox.discard(ids)
        errors = ["no event %d in %s" % (event_id, config.db) if event_id not in before else
                  "event %d is %s, not dead: only dead letters are discarded"
                  % (event_id, before[event_id])
                  for event_id in ids if before.get(event_id) != "dead"]
        return [event_id for event_id in ids if before.get(event_id) == "dead"], errors
    return _ids_or_dead(config, args, ("discarded", "discarding"), discard)


def _send_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("event", choices=EVENT_TYPES, metavar="EVENT", help="one of: "
                        + ", ".join(EVENT_TYPES))
    parser.add_argument("--url", help="where to post (default: this config's own "
                                      "address and --path)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="change a field; VALUE is read as JSON when it parses (42, true, "
                             "[\"a\"]), else text")
    parser.add_argument("--bridge", metavar="LABEL", help="post to <path>/LABEL")


def _samples_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("event", nargs="?", choices=EVENT_TYPES, metavar="EVENT",
                        help="print this one, indented (default: all 11, one per line)")


def _events_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--status", choices=EVENT_STATUSES,
                        help="only events with this status (skipped: a handler's file was "
                             "gone when it ran)")
    parser.add_argument("--type", metavar="EVENT", help="only events of this type")
    parser.add_argument("--bridge", metavar="LABEL", help="only events of this bridge (- for "
                                                          "the default one)")
    parser.add_argument("--limit", type=_positive, default=20, help="how many (default 20)")
    parser.add_argument("--follow", "-f", action="store_true",
                        help="then print each new event as it arrives, until Ctrl-C (like tail -f)")
    parser.add_argument("--json", action="store_true", help="print JSON for scripts (one "
                                                            "object a line with"
                                                            " --follow)")


def _show_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("id", type=_event_id, metavar="ID", help="an inbox id (see `events`)")
    parser.add_argument("--json", action="store_true", help="print JSON for scripts")


def _ids_or_dead_arguments(what: str) -> Callable[[argparse.ArgumentParser], None]:
    def arguments(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("ids", nargs="*", type=_event_id, metavar="ID", help="inbox ids "
                                                                                 "(see `events`)")
        parser.add_argument("--dead", action="store_true", help="every dead-lettered event: "
                            + what)
    return arguments


def _stats_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print JSON for scripts")


Command = namedtuple("Command", "function summary example settings arguments")
SERVER_ADDRESS = ("host", "port", "path", "token", "secret", "tls_cert", "tls_key")

# The one table of commands: the parser, `--help`, dispatch and the README reference come from it.
COMMANDS = {
    "serve": Command(cmd_serve, "receive events and run handlers (the default command)",
                     "{prog} serve --port 3000 --token s3cret",
                     tuple(option.name for option in OPTIONS), None),
    "send": Command(cmd_send, "post the documented sample of an event to a running server",
                    "{prog} send message --set body=hi --set from_me=false", SERVER_ADDRESS,
                    _send_arguments),
    "samples": Command(cmd_samples, "print the documented sample of each event (or of one), "
                                    "posting nothing",
                       "{prog} samples message", (), _samples_arguments),
    "check": Command(cmd_check, "load every handler and report problems (exit 1 if any)",
                     "{prog} check --handlers ./handlers", ("handlers",), None),
    "events": Command(cmd_events, "list the newest events in the inbox and their deliveries",
                      "{prog} events --status dead --type message --limit 50", ("db",),
                      _events_arguments),
    "show": Command(cmd_show, "one event: its body, and each handler's attempts, last "
                              "error and output",
                    "{prog} show 42", ("db",), _show_arguments),
    "replay": Command(cmd_replay, "queue events again: their dead deliveries, or "
                                  "every handler anew",
                      "{prog} replay 41 42   |   {prog} replay --dead", ("db",),
                      _ids_or_dead_arguments("queue them again")),
    "discard": Command(cmd_discard, "set dead letters aside: kept in the inbox, no longer "
                                    "counted as dead",
                       "{prog} discard 41 42   |   {prog} discard --dead", ("db",),
                       _ids_or_dead_arguments("set them all aside")),
    "stats": Command(cmd_stats, "counts of events by status and type, deliveries by handler",
                     "{prog} stats --json", ("db",), _stats_arguments),
}


def main(argv: Optional[List[str]] = None, environ: Optional[Dict[str, str]] = None) -> int:
    """The command line: `wabhook.py [COMMAND] [flags]`; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    environ = dict(os.environ if environ is None else environ)
    prog = _program_name()
    if argv and not argv[0].startswith("-") and argv[0] not in COMMANDS:
        close = difflib.get_close_matches(argv[0], COMMANDS, n=1)
        print("error: %r is not a command%s; the commands are %s (see %s --help)" % (
            argv[0], " (did you mean %s?)" % close[0] if close else "", ", ".join(COMMANDS), prog),
              file=sys.stderr)
        return 2
    if not argv or argv[0] not in COMMANDS and argv[0] not in ("-h", "--help", "--version"):
        argv = ["serve"] + argv
    args = build_parser(prog).parse_args(argv)
    for warning in unknown_settings(environ):
        print("warning: %s" % warning, file=sys.stderr)
    try:
        config = build_config(vars(args), environ)
    except ConfigError as exc:
        print("error: %s" % exc, file=sys.stderr)
        return 2
    log = setup_logging(config)
    try:
        return COMMANDS[args.command].function(config, args, log)
    except (InboxUnavailable, ServerError, ConfigError) as exc:
        print("error: %s" % exc, file=sys.stderr)
        return 1


if __name__ == "__main__":
    # Handlers `from wabhook import MessageEvent`: make that this very module,
    # not a second copy with its own classes.
    sys.modules.setdefault("wabhook", sys.modules[__name__])
    sys.exit(main())
