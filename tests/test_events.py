"""Events (SPEC §3, §4): the typed dataclass of each documented sample, the base fields, unknown types,
lenient parsing of malformed payloads, identity keys for dedup, ordering lanes, and handlers importing
the very classes a `python wabhook.py` server uses.
"""

import copy
import dataclasses
import json
import signal
import typing

from tests.support import TYPED_RECORD_HANDLER, WabhookTestCase, load_samples, wait_until

import wabhook

# The sender's documentation, as README's "Event fields" table restates it: class and field -> Python type.
DOCUMENTED = {
    "message": ("MessageEvent", dict(
        message_id=str, contact_id=str, phone=str, chat_id=str, name=str, body=str, type=str, media_type=str,
        is_group=bool, from_me=bool, timestamp=int)),
    "connected": ("ConnectedEvent", dict(phone=str)),
    "disconnected": ("DisconnectedEvent", dict()),
    "typing": ("TypingEvent", dict(contact_id=str, chat_id=str, state=str, mode=str)),
    "poll_vote": ("PollVoteEvent", dict(
        contact_id=str, phone=str, chat_id=str, poll_id=str, message_id=str, name=str, from_me=bool,
        timestamp=int, selected_options=list)),
    "event_response": ("EventResponseEvent", dict(
        contact_id=str, phone=str, chat_id=str, event_id=str, message_id=str, name=str, response=str,
        from_me=bool, timestamp=int, extra_guest_count=int)),
    "call_incoming": ("CallIncomingEvent", dict(call_id=str, contact_id=str, platform=str, timestamp=int)),
    "call_terminated": ("CallTerminatedEvent", dict(call_id=str, contact_id=str, reason=str, timestamp=int)),
    "offline_sync_preview": ("OfflineSyncPreviewEvent", dict(
        total=int, messages=int, notifications=int, receipts=int, app_data_changes=int)),
    "offline_sync_completed": ("OfflineSyncCompletedEvent", dict(count=int)),
    "profile_picture_updated": ("ProfilePictureUpdatedEvent", dict(remove=bool, picture_id=str, timestamp=int)),
}
BASE_FIELDS = ("event", "bridge", "id", "received_at", "raw")
EMPTY = {str: "", int: 0, bool: False, list: []}
UNCOERCIBLE = {"x": 1}

# (value as sent, value the field must hold) for each Python type: README's "Parsing is lenient".
COERCIONS = {
    str: [(123, "123"), (15550001234, "15550001234"), (1.5, "1.5"), ("text", "text")],
    int: [("123", 123), ("-5", -5), (7, 7), (1777180605.0, 1777180605)],
    bool: [("true", True), ("false", False), (1, True), (0, False), (True, True), (False, False)],
    list: [(["Red", "Blue"], ["Red", "Blue"]), ([], [])],
}
KEPT_RAW = {
    str: [UNCOERCIBLE, ["a"]],
    int: [UNCOERCIBLE, "abc", "12.5", [1]],
    bool: [UNCOERCIBLE, "maybe", [True]],
    list: [UNCOERCIBLE],
}


def samples_by_type():
    return {sample["event"]: sample for sample in load_samples()}


def payload_fields(cls):
    """{field name: Python type} of a dataclass, without the base fields every event has."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls) if f.name not in BASE_FIELDS}


class EventClassesTest(WabhookTestCase):
    def test_samples_file_has_the_eleven_documented_types_with_their_documented_fields(self):
        samples = samples_by_type()
        self.assertEqual(len(load_samples()), 11)
        self.assertEqual(set(samples), set(DOCUMENTED))
        for event_type, sample in samples.items():
            self.assertEqual(set(sample) - {"event"}, set(DOCUMENTED[event_type][1]), event_type)

    def test_each_documented_type_has_its_class_with_exactly_the_documented_fields_and_types(self):
        self.assertEqual(set(wabhook.EVENT_CLASSES), set(DOCUMENTED))
        for event_type, (class_name, fields) in DOCUMENTED.items():
            with self.subTest(event=event_type):
                cls = wabhook.EVENT_CLASSES[event_type]
                self.assertTrue(dataclasses.is_dataclass(cls))
                self.assertEqual(cls.__name__, class_name)
                self.assertIs(getattr(wabhook, class_name), cls)  # importable by name: from wabhook import ...
                self.assertTrue(issubclass(cls, wabhook.Event))
                self.assertEqual(payload_fields(cls), fields)

    def test_every_event_class_has_the_base_fields(self):
        for cls in list(wabhook.EVENT_CLASSES.values()) + [wabhook.UnknownEvent]:
            with self.subTest(cls=cls.__name__):
                hints = typing.get_type_hints(cls)
                self.assertEqual({name: hints[name] for name in BASE_FIELDS},
                                 {"event": str, "bridge": typing.Optional[str], "id": typing.Optional[int],
                                  "received_at": float, "raw": dict})
                event = cls()
                self.assertEqual((event.event, event.bridge, event.id, event.raw), ("", None, None, {}))

    def test_each_sample_parses_into_its_class_with_the_sample_values(self):
        for event_type, sample in samples_by_type().items():
            with self.subTest(event=event_type):
                original = copy.deepcopy(sample)
                event = wabhook.parse_event(sample, "bridge-1", 42, 1777000000.5)
                class_name, fields = DOCUMENTED[event_type]
                self.assertIs(type(event), getattr(wabhook, class_name))
                for name, kind in fields.items():
                    value = getattr(event, name)
                    self.assertIs(type(value), kind, name)
                    self.assertEqual(value, sample[name], name)
                self.assertEqual((event.event, event.bridge, event.id, event.received_at),
                                 (event_type, "bridge-1", 42, 1777000000.5))
                self.assertEqual(event.raw, original)
                self.assertEqual(sample, original)  # parsing leaves the sender's dict alone

    def test_bridge_is_none_on_the_bare_path(self):
        event = wabhook.parse_event(samples_by_type()["connected"], None, 1, 1.0)
        self.assertIsNone(event.bridge)
        self.assertEqual(event.phone, "15550001234")

    def test_unknown_event_type_becomes_unknown_event_with_raw_intact(self):
        raw = {"event": "reaction", "message_id": "ACE1", "emoji": "\U0001f44d", "nested": {"a": [1, None, "x"]}}
        original = copy.deepcopy(raw)
        event = wabhook.parse_event(raw, "b", 9, 2.0)
        self.assertIs(type(event), wabhook.UnknownEvent)
        self.assertIsInstance(event, wabhook.Event)
        self.assertEqual((event.event, event.bridge, event.id, event.received_at), ("reaction", "b", 9, 2.0))
        self.assertEqual(event.raw, original)
        for hostile in ("all", "__class__", "__init__", "get", "Message", "message "):
            with self.subTest(event=hostile):
                event = wabhook.parse_event({"event": hostile, "x": 1})
                self.assertIs(type(event), wabhook.UnknownEvent)
                self.assertEqual(event.event, hostile)
                self.assertEqual(event.raw, {"event": hostile, "x": 1})

    def test_payload_members_named_like_base_fields_do_not_override_them(self):
        raw = dict(samples_by_type()["message"], id="evil", bridge="other", received_at="never", raw=None)
        event = wabhook.parse_event(raw, "real-bridge", 5, 3.0)
        self.assertEqual((event.id, event.bridge, event.received_at), (5, "real-bridge", 3.0))
        self.assertEqual(event.raw["id"], "evil")
        self.assertEqual(event.raw["bridge"], "other")
        self.assertIsNone(event.raw["raw"])
        self.assertEqual(event.body, "Hello!")


class LenientParsingTest(WabhookTestCase):
    def parse(self, raw):
        original = copy.deepcopy(raw)
        event = wabhook.parse_event(raw, "b", 1, 1.0)  # must not raise
        self.assertEqual(event.raw, original)          # nothing the sender sent is lost
        self.assertIs(type(event), wabhook.EVENT_CLASSES[raw["event"]])
        return event

    def test_a_missing_field_gets_the_empty_value_of_its_type(self):
        for event_type, sample in samples_by_type().items():
            for name, kind in DOCUMENTED[event_type][1].items():
                with self.subTest(event=event_type, field=name):
                    raw = {k: v for k, v in sample.items() if k != name}
                    value = getattr(self.parse(raw), name)
                    self.assertEqual(value, EMPTY[kind])
                    self.assertIs(type(value), kind)
            with self.subTest(event=event_type, field="(all)"):
                event = self.parse({"event": event_type})
                for name, kind in DOCUMENTED[event_type][1].items():
                    self.assertEqual(getattr(event, name), EMPTY[kind], name)

    def test_a_null_field_gets_the_empty_value_of_its_type(self):
        for event_type, sample in samples_by_type().items():
            for name, kind in DOCUMENTED[event_type][1].items():
                with self.subTest(event=event_type, field=name):
                    value = getattr(self.parse(dict(sample, **{name: None})), name)
                    self.assertEqual(value, EMPTY[kind])
                    self.assertIs(type(value), kind)

    def test_empty_list_values_are_not_shared_between_events(self):
        first = self.parse({"event": "poll_vote"})
        first.selected_options.append("Red")
        self.assertEqual(self.parse({"event": "poll_vote", "selected_options": None}).selected_options, [])

    def test_unambiguous_wrong_types_are_coerced(self):
        for event_type, sample in samples_by_type().items():
            for name, kind in DOCUMENTED[event_type][1].items():
                for sent, expected in COERCIONS[kind]:
                    with self.subTest(event=event_type, field=name, sent=sent):
                        value = getattr(self.parse(dict(sample, **{name: sent})), name)
                        self.assertEqual(value, expected)
                        self.assertIs(type(value), kind)

    def test_values_that_cannot_be_converted_are_kept_as_sent(self):
        for event_type, sample in samples_by_type().items():
            for name, kind in DOCUMENTED[event_type][1].items():
                for sent in KEPT_RAW[kind]:
                    with self.subTest(event=event_type, field=name, sent=sent):
                        value = getattr(self.parse(dict(sample, **{name: copy.deepcopy(sent)})), name)
                        self.assertEqual(value, sent)
                        self.assertIs(type(value), type(sent))

    def test_extra_fields_stay_in_raw(self):
        for event_type, sample in samples_by_type().items():
            with self.subTest(event=event_type):
                raw = dict(sample, added_later={"nested": [1, 2]}, reaction="\U0001f44d")
                event = self.parse(raw)
                self.assertEqual(event.raw["added_later"], {"nested": [1, 2]})
                self.assertEqual(event.raw["reaction"], "\U0001f44d")
                for name in DOCUMENTED[event_type][1]:
                    self.assertEqual(getattr(event, name), sample[name], name)

    def test_every_field_malformed_at_once_never_raises(self):
        garbage = [None, UNCOERCIBLE, [1, [2]], "", "not a number", -1, 10 ** 30, 1e300, True, "\udcff"]
        for event_type in DOCUMENTED:
            for value in garbage:
                with self.subTest(event=event_type, value=value):
                    raw = {name: copy.deepcopy(value) for name in DOCUMENTED[event_type][1]}
                    raw["event"] = event_type
                    event = self.parse(raw)
                    for name, kind in DOCUMENTED[event_type][1].items():  # each field typed, or as sent
                        held = getattr(event, name)
                        if value is None:
                            self.assertEqual((held, type(held)), (EMPTY[kind], kind), name)
                        elif type(held) is not kind:
                            self.assertEqual(held, value, name)

    def test_malformed_events_reach_handlers_typed_and_coerced(self):
        self.write_handler("all.py", '''
import json, os
def handle(event):
    row = {"id": event.id, "class": type(event).__name__, "timestamp": event.timestamp,
           "from_me": event.from_me, "phone": event.phone, "body": event.body, "raw": event.raw}
    with open(os.path.join(%r, "seen"), "a") as out:
        out.write(json.dumps(row) + "\\n")
''' % self.tmp)
        server = self.start_server()
        sent = {"event": "message", "message_id": "M1", "timestamp": "1777180605", "from_me": "true",
                "phone": 15550001234, "body": None, "is_group": {"x": 1}, "later": [1]}
        status, reply = self.post(server, sent)
        self.assertEqual(status, 200, reply)
        wait_until(lambda: self.read_lines("seen"), message="the handler to run")
        row = json.loads(self.read_lines("seen")[0])
        self.assertEqual(row, {"id": reply["id"], "class": "MessageEvent", "timestamp": 1777180605,
                               "from_me": True, "phone": "15550001234", "body": "", "raw": sent})


class IdentityKeyTest(WabhookTestCase):
    """SPEC §4: which events are deduplicated, and by what."""

    KEYED = {
        "message": ("chat_id", "message_id"),
        "poll_vote": ("chat_id", "message_id"),
        "event_response": ("chat_id", "message_id"),
        "call_incoming": ("call_id",),
        "call_terminated": ("call_id",),
        "profile_picture_updated": ("picture_id", "remove", "timestamp"),
    }
    KEYLESS = ("connected", "disconnected", "typing", "offline_sync_preview", "offline_sync_completed")

    @staticmethod
    def changed(value):
        if isinstance(value, bool):
            return not value
        if isinstance(value, int):
            return value + 1
        if isinstance(value, list):
            return value + ["other"]
        return value + "-other"

    def test_keyed_events_have_a_key_that_depends_on_exactly_their_identity_fields(self):
        for event_type, identity in self.KEYED.items():
            sample = samples_by_type()[event_type]
            key = wabhook.identity_key(sample, "b1")
            with self.subTest(event=event_type):
                self.assertIsNotNone(key)
                self.assertEqual(wabhook.identity_key(copy.deepcopy(sample), "b1"), key)  # stable
            for name in sample:
                if name == "event":
                    continue
                with self.subTest(event=event_type, field=name):
                    other = wabhook.identity_key(dict(sample, **{name: self.changed(sample[name])}), "b1")
                    if name in identity:
                        self.assertNotEqual(other, key, "%s is part of the identity" % name)
                    else:
                        self.assertEqual(other, key, "%s is not part of the identity" % name)
            with self.subTest(event=event_type, field="(extra member)"):
                self.assertEqual(wabhook.identity_key(dict(sample, added_later=1), "b1"), key)

    def test_a_different_bridge_gives_a_different_key(self):
        for event_type in self.KEYED:
            sample = samples_by_type()[event_type]
            with self.subTest(event=event_type):
                keys = {wabhook.identity_key(sample, bridge) for bridge in (None, "b1", "b2")}
                self.assertEqual(len(keys), 3)
                self.assertNotIn(None, keys)

    def test_the_event_type_is_part_of_the_key(self):
        samples = samples_by_type()
        message = samples["message"]
        as_vote = dict(samples["poll_vote"], chat_id=message["chat_id"], message_id=message["message_id"])
        self.assertNotEqual(wabhook.identity_key(message, None), wabhook.identity_key(as_vote, None))
        incoming = samples["call_incoming"]
        terminated = dict(samples["call_terminated"], call_id=incoming["call_id"])
        self.assertNotEqual(wabhook.identity_key(incoming, None), wabhook.identity_key(terminated, None))

    def test_identity_parts_cannot_run_into_each_other(self):
        base = samples_by_type()["message"]
        one = dict(base, chat_id="a|b", message_id="c")
        two = dict(base, chat_id="a", message_id="b|c")
        three = dict(base, chat_id="a,b", message_id="c")
        four = dict(base, chat_id="a", message_id="b,c")
        keys = {wabhook.identity_key(raw, None) for raw in (one, two, three, four)}
        self.assertEqual(len(keys), 4)
        self.assertNotEqual(wabhook.identity_key(base, "x|y"), wabhook.identity_key(base, "x"))

    def test_events_without_identity_have_no_key(self):
        samples = samples_by_type()
        for event_type in self.KEYLESS:
            with self.subTest(event=event_type):
                self.assertIsNone(wabhook.identity_key(samples[event_type], "b1"))
                self.assertIsNone(wabhook.identity_key(samples[event_type], None))
        with self.subTest(event="unknown"):
            self.assertIsNone(wabhook.identity_key({"event": "reaction", "message_id": "X", "chat_id": "c"}, None))
        with self.subTest(event="message without message_id"):
            no_id = {k: v for k, v in samples["message"].items() if k != "message_id"}
            self.assertIsNone(wabhook.identity_key(no_id, None))

    def test_a_picture_removal_without_picture_id_still_has_an_identity(self):
        removal = {"event": "profile_picture_updated", "remove": True, "timestamp": 1777180605}
        key = wabhook.identity_key(removal, None)
        self.assertIsNotNone(key)
        self.assertNotEqual(key, wabhook.identity_key(dict(removal, timestamp=1777180606), None))

    def test_identity_key_never_raises_on_malformed_events(self):
        for event_type in list(self.KEYED) + list(self.KEYLESS):
            for value in (None, UNCOERCIBLE, [1], 12, "\udcff", True):
                with self.subTest(event=event_type, value=value):
                    raw = {name: value for name in DOCUMENTED[event_type][1]}
                    raw["event"] = event_type
                    key = wabhook.identity_key(raw, "b")
                    if event_type in self.KEYLESS:
                        self.assertIsNone(key)
                    elif key is not None:  # a key the inbox can store, the same for the same event
                        self.assertIsInstance(key, str)
                        key.encode("utf-8")
                        self.assertEqual(wabhook.identity_key(copy.deepcopy(raw), "b"), key)
                        self.assertNotEqual(wabhook.identity_key(raw, "other"), key)


class LaneTest(WabhookTestCase):
    def test_events_of_one_chat_share_a_lane_and_other_chats_do_not(self):
        message = samples_by_type()["message"]
        lane = wabhook.lane_of(message, "b1")
        self.assertEqual(wabhook.lane_of(dict(message, message_id="other", body="x"), "b1"), lane)
        self.assertNotEqual(wabhook.lane_of(dict(message, chat_id="15550007777@s.whatsapp.net"), "b1"), lane)
        self.assertNotEqual(wabhook.lane_of(message, "b2"), lane)
        self.assertNotEqual(wabhook.lane_of(message, None), lane)
        for event_type in ("typing", "poll_vote"):  # same chat_id as the message sample
            self.assertEqual(wabhook.lane_of(samples_by_type()[event_type], "b1"), lane, event_type)

    def test_a_group_event_uses_the_chat_not_the_sender(self):
        samples = samples_by_type()
        response = samples["event_response"]  # chat_id is the group, contact_id the person
        self.assertEqual(wabhook.lane_of(response, None),
                         wabhook.lane_of(dict(samples["message"], chat_id=response["chat_id"]), None))
        self.assertNotEqual(wabhook.lane_of(response, None), wabhook.lane_of(samples["message"], None))

    def test_calls_use_the_callers_chat(self):
        samples = samples_by_type()
        message_lane = wabhook.lane_of(samples["message"], "b1")  # chat_id == the caller's contact_id
        self.assertEqual(wabhook.lane_of(samples["call_incoming"], "b1"), message_lane)
        self.assertEqual(wabhook.lane_of(samples["call_terminated"], "b1"), message_lane)

    def test_events_without_a_chat_share_their_bridges_own_lane(self):
        samples = samples_by_type()
        chatless = ("connected", "disconnected", "offline_sync_preview", "offline_sync_completed",
                    "profile_picture_updated")
        for bridge in (None, "b1"):
            lanes = {wabhook.lane_of(samples[t], bridge) for t in chatless}
            lanes.add(wabhook.lane_of({"event": "reaction"}, bridge))
            self.assertEqual(len(lanes), 1, bridge)
            self.assertNotEqual(lanes.pop(), wabhook.lane_of(samples["message"], bridge))
        self.assertNotEqual(wabhook.lane_of(samples["connected"], "b1"), wabhook.lane_of(samples["connected"], "b2"))

    def test_lane_is_plain_text_whatever_the_input(self):
        for chat in ("\udcff", "a\x00b", "\U0001f44d", 12, ["x"]):
            with self.subTest(chat=chat):
                lane = wabhook.lane_of({"event": "message", "chat_id": chat}, "b")
                self.assertIsInstance(lane, str)
                lane.encode("utf-8")  # storable as SQLite text


class HandlerImportTest(WabhookTestCase):
    def test_handlers_importing_wabhook_get_the_classes_of_a_server_run_as_a_script(self):
        record = '''
import json, os
import wabhook
from wabhook import Event, MessageEvent, UnknownEvent

def handle(event):
    row = {"name": %(name)r, "id": event.id, "class": type(event).__name__,
           "is_message": type(event) is MessageEvent, "isinstance_message": isinstance(event, MessageEvent),
           "is_unknown": type(event) is UnknownEvent, "isinstance_event": isinstance(event, Event),
           "same_table": wabhook.EVENT_CLASSES["message"] is MessageEvent}
    with open(os.path.join(%(tmp)r, "identity"), "a") as out:
        out.write(json.dumps(row) + "\\n")
'''
        self.write_handler("message.py", record % {"name": "message.py", "tmp": self.tmp})
        self.write_handler("all.py", record % {"name": "all.py", "tmp": self.tmp})
        process, port = self.start_process()
        message_id = self.post(port, load_samples()[0])[1]["id"]
        unknown_id = self.post(port, {"event": "reaction", "emoji": "x"})[1]["id"]
        wait_until(lambda: len(self.read_lines("identity")) == 3, message="3 handler runs")
        rows = {(row["name"], row["id"]): row for row in map(json.loads, self.read_lines("identity"))}
        for name in ("message.py", "all.py"):
            row = rows[(name, message_id)]
            self.assertEqual(row["class"], "MessageEvent")
            self.assertTrue(row["is_message"], "%s: type(event) is MessageEvent" % name)
            self.assertTrue(row["isinstance_message"], "%s: isinstance(event, MessageEvent)" % name)
            self.assertTrue(row["isinstance_event"])
            self.assertTrue(row["same_table"])
        unknown = rows[("all.py", unknown_id)]
        self.assertTrue(unknown["is_unknown"] and unknown["isinstance_event"], unknown)
        self.assertFalse(unknown["isinstance_message"])
        self.assertEqual(self.terminate(process, signal.SIGTERM), 0)



class SamplesEndToEndTest(WabhookTestCase):
    """Every documented sample through a real server into a handler, typed."""

    def test_every_sample_is_acked_stored_and_handled_as_its_type(self):
        self.write_handler("all.py", TYPED_RECORD_HANDLER % {"tmp": self.tmp})
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
