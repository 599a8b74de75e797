"""Handlers (SPEC §5): which files are handlers, Python handlers (typed events, attributed prints, `import
_common`), executable handlers in any language (stdin, environment, working directory, exit status, a
timeout that kills the whole process group, capped output), hot reload without restart (edits, editor
saves during a burst, new and deleted files, changed helpers), import failures that drain once fixed,
`check`, and the example handlers that ship in handlers/.
"""

import json
import os
import re
import sys
import threading
import time
import unittest.mock

from tests.support import ROOT, WabhookTestCase, load_samples, wait_until

import wabhook
from wabhook import handler_event

SAMPLE = load_samples()[0]  # the documented `message` sample: Alice says "Hello!"
SHIPPED_HANDLERS = os.path.join(ROOT, "handlers")

# A Python handler that appends [its name, event id, event type, class name] to <tmp>/seen.
RECORD = '''
import json, os
def handle(event):
    with open(os.path.join(%(tmp)r, "seen"), "a") as out:
        out.write(json.dumps([%(name)r, event.id, event.event, type(event).__name__]) + "\\n")
'''

# The same as an executable script: appends [its name, WABHOOK_ID] to <tmp>/seen.
RECORD_SCRIPT = '''#!/bin/sh
cat > /dev/null
echo "[\\"%(name)s\\", $WABHOOK_ID]" >> %(tmp)s/seen
'''

# The body of a Python handler that appends "<label> <event id>" to <tmp>/<out>; everything sits inside
# handle(), so no prefix of the file is a module that compiles and defines handle().
VERSIONED = '''def handle(event):
    import os
    with open(os.path.join(%(tmp)r, %(out)r), "a") as out:
        out.write("%(label)s %%d\\n" %% event.id)
'''


def message(n, **fields):
    """The `message` sample with its own message_id (so it is no duplicate) and any field changed."""
    return dict(SAMPLE, message_id="handlers-%s" % n, **fields)


def process_state(pid):
    """The one-letter state of a process from /proc (Z for a zombie), or None once it is gone."""
    try:
        with open("/proc/%d/stat" % pid) as handle:
            return handle.read().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return None


def process_parent(pid):
    try:
        with open("/proc/%d/stat" % pid) as handle:
            return int(handle.read().rsplit(")", 1)[1].split()[1])
    except (FileNotFoundError, ProcessLookupError):
        return None


class HandlersTestCase(WabhookTestCase):
    def seen(self):
        return [json.loads(line) for line in self.read_lines("seen")]

    def handled_by(self):
        """{event id: sorted handler names that ran it}, from <tmp>/seen."""
        result = {}
        for row in self.seen():
            result.setdefault(row[1], []).append(row[0])
        return {event_id: sorted(names) for event_id, names in result.items()}

    def deliveries(self, event_id):
        """{handler: (status, attempts, last_error)} of one event."""
        return {handler: (status, attempts, error) for handler, status, attempts, error in self.query(
            "SELECT handler, status, attempts, last_error FROM deliveries WHERE event_id = ?", (event_id,))}

    def post_ok(self, server, body, path="/hook"):
        status, reply = self.post(server, body, path=path)
        self.assertEqual(status, 200, reply)
        self.assertFalse(reply["duplicate"])
        return reply["id"]

    def handler_records(self, name):
        """Log records attributed to handler `name` whose message is one of its output lines."""
        return [record for record in list(self.log.records)
                if getattr(record, "handler", None) == name and record.getMessage().startswith(name + " | ")]

    def age(self, *paths):
        """Date files back a minute: a save long done, so nothing waits for it to settle."""
        past = time.time() - 60
        for path in paths:
            os.utime(path, (past, past))


class DiscoveryTest(HandlersTestCase):
    def test_file_names_decide_which_events_each_handler_gets(self):
        for name in ("message.py", "message.alerts.py", "all.py", "all.audit.py", "_common.py", ".hidden.py"):
            self.write_handler(name, RECORD % {"tmp": self.tmp, "name": name})
        for name in ("_helper.sh", ".hidden.sh"):  # executable, but helpers and hidden files are not handlers
            self.write_handler(name, RECORD_SCRIPT % {"tmp": self.tmp, "name": name})
        server = self.start_server()
        message_id = self.post_ok(server, SAMPLE)
        connected_id = self.post_ok(server, load_samples()[1])
        unknown_id = self.post_ok(server, {"event": "brand_new_thing", "chat_id": "x"})
        for event_id in (message_id, connected_id, unknown_id):
            self.wait_status(event_id, "done")
        self.assertEqual(self.handled_by(), {
            message_id: ["all.audit.py", "all.py", "message.alerts.py", "message.py"],
            connected_id: ["all.audit.py", "all.py"],
            unknown_id: ["all.audit.py", "all.py"],
        })
        self.assertEqual(sorted(self.deliveries(unknown_id)), ["all.audit.py", "all.py"])
        classes = {(row[0], row[1]): row[3] for row in self.seen()}
        self.assertEqual(classes[("all.py", unknown_id)], "UnknownEvent")
        self.assertEqual(classes[("all.py", connected_id)], "ConnectedEvent")

    def test_python_handler_gets_the_typed_event(self):
        self.write_handler("message.py", '''
import json, os
import wabhook
from wabhook import MessageEvent
def handle(event):
    info = dict(same_class=type(event) is MessageEvent, is_event=isinstance(event, wabhook.Event),
                fields=[event.event, event.bridge, event.id, event.name, event.body, event.from_me,
                        event.is_group, event.timestamp, event.chat_id],
                received_at=event.received_at, raw=event.raw)
    with open(os.path.join(%r, "typed"), "w") as out:
        json.dump(info, out)
''' % self.tmp)
        server = self.start_server()
        sent = message(1, later_field={"kept": True})
        event_id = self.post_ok(server, sent, path="/hook/shop-1")
        self.wait_status(event_id, "done")
        with open(self.out_path("typed")) as handle:
            info = json.load(handle)
        self.assertTrue(info["same_class"])
        self.assertTrue(info["is_event"])
        self.assertEqual(info["fields"], ["message", "shop-1", event_id, "Alice", "Hello!", False, False,
                                          1777180605, SAMPLE["chat_id"]])
        self.assertGreater(info["received_at"], 0)
        self.assertEqual(info["raw"], sent)  # a field the sender adds later is kept


class HelperModuleTest(HandlersTestCase):
    def setUp(self):
        super().setUp()
        # Other tests in this process may have imported a `_common` from their own folder.
        self.addCleanup(sys.modules.pop, "_common", None)
        sys.modules.pop("_common", None)
        # As for users (PYTHONDONTWRITEBYTECODE unset): `import _common` caches bytecode in __pycache__.
        self.addCleanup(setattr, sys, "dont_write_bytecode", sys.dont_write_bytecode)
        sys.dont_write_bytecode = False

    def test_handlers_import_common_and_see_its_new_code_after_it_changes(self):
        common_saved = os.stat(self.write_handler("_common.py", 'GREETING = "v1"\n\ndef greet(name):\n'
                                                                '    return GREETING + " " + name\n')).st_mtime_ns
        self.write_handler("message.py", '''
import os
import _common
def handle(event):
    with open(os.path.join(%r, "greetings"), "a") as out:
        out.write("%%d %%s\\n" %% (event.id, _common.greet(event.name)))
''' % self.tmp)
        server = self.start_server()
        first = self.post_ok(server, message(1))
        self.wait_status(first, "done")
        self.assertEqual(self.read_lines("greetings"), ["%d v1 Alice" % first])
        helper = self.write_handler("_common.py", 'GREETING = "v2"\n\ndef greet(name):\n'
                                                  '    return GREETING + " " + name\n')
        # A quick fix saved within the second of the first save (its mtime 1 microsecond later): the new
        # code must be the one imported, even though its size is the same.
        quick_save = common_saved + 1000
        self.assertLessEqual(quick_save, os.stat(helper).st_mtime_ns)
        os.utime(helper, ns=(quick_save, quick_save))
        second = self.post_ok(server, message(2))
        self.wait_status(second, "done")
        self.assertEqual(self.read_lines("greetings"), ["%d v1 Alice" % first, "%d v2 Alice" % second])


class ScriptHandlerTest(HandlersTestCase):
    SH_PROBE = '''#!/bin/sh
cat > "%(tmp)s/sh-stdin-$WABHOOK_ID"
printf '%%s\\n' "$WABHOOK_EVENT" "$WABHOOK_ID" "$WABHOOK_BRIDGE" "$(pwd -P)" "$#" > "%(tmp)s/sh-env-$WABHOOK_ID"
'''
    PY_PROBE = '''#!/usr/bin/env python3
import json, os, sys
data = sys.stdin.buffer.read()
with open(os.path.join(%(tmp)r, "py-" + os.environ["WABHOOK_ID"]), "w") as out:
    json.dump({"stdin": data.decode("utf-8"), "env": dict(os.environ), "argv": sys.argv,
               "cwd": os.getcwd()}, out)
'''

    def test_scripts_in_any_language_get_raw_json_on_stdin_and_ids_in_the_environment(self):
        self.write_handler("message.sh", self.SH_PROBE % {"tmp": self.tmp})
        self.write_handler("message.probe", self.PY_PROBE % {"tmp": self.tmp})  # no .py: run as a script
        server = self.start_server()
        # Odd spacing, escapes, non-ASCII and key order: the script must see these exact bytes.
        body = ('{ "event" : "message",\n  "message_id": "RAW-MARKER-1", "chat_id": "c1@s.whatsapp.net",'
                ' "body": "caf\\u00e9 \u00e9\u00e8 \\"quoted\\" \u2603", "zz": [1, 2.50, null] }\n')
        bridged = self.post_ok(server, body.encode("utf-8"), path="/hook/shop-1")
        bare = self.post_ok(server, message(2))
        for event_id in (bridged, bare):
            self.wait_status(event_id, "done")
        handlers = os.path.realpath(self.handlers)

        with open(self.out_path("sh-stdin-%d" % bridged), "rb") as handle:
            self.assertEqual(handle.read(), body.encode("utf-8"))
        self.assertEqual(self.read_lines("sh-env-%d" % bridged), ["message", str(bridged), "shop-1", handlers, "0"])
        self.assertEqual(self.read_lines("sh-env-%d" % bare), ["message", str(bare), "", handlers, "0"])

        with open(self.out_path("py-%d" % bridged)) as handle:
            probe = json.load(handle)
        self.assertEqual(probe["stdin"], body)
        self.assertEqual([probe["env"][name] for name in ("WABHOOK_EVENT", "WABHOOK_ID", "WABHOOK_BRIDGE")],
                         ["message", str(bridged), "shop-1"])
        self.assertEqual(os.path.realpath(probe["cwd"]), handlers)
        self.assertEqual(probe["argv"], [os.path.join(self.handlers, "message.probe")])
        # The payload travels on stdin only: not in the arguments, not in the environment.
        for text in probe["argv"] + list(probe["env"].values()):
            self.assertNotIn("RAW-MARKER-1", text)
            self.assertNotIn("caf", text)

    def test_a_300_kb_event_reaches_a_script_intact_on_stdin(self):
        self.write_handler("message.sh", self.SH_PROBE % {"tmp": self.tmp})
        server = self.start_server()
        body = json.dumps(message(1, body="".join("%06d|" % n for n in range(300 * 1024 // 7)))).encode("utf-8")
        self.assertGreater(len(body), 300 * 1024)
        event_id = self.post_ok(server, body)
        self.wait_status(event_id, "done")
        with open(self.out_path("sh-stdin-%d" % event_id), "rb") as handle:
            self.assertEqual(handle.read(), body)

    def test_exit_zero_is_success_and_nonzero_fails_with_status_and_last_line(self):
        self.write_handler("message.ok.sh", "#!/bin/sh\necho 'all good'\n")
        self.write_handler("message.sh", "#!/bin/sh\necho 'starting'\necho 'could not reach the CRM' >&2\nexit 3\n")
        server = self.start_server(retries=1)
        event_id = self.post_ok(server, SAMPLE)
        self.wait_status(event_id, "dead")
        rows = self.deliveries(event_id)
        self.assertEqual(rows["message.ok.sh"][:2], ("done", 1))
        self.assertEqual(rows["message.sh"][:2], ("dead", 1))
        self.assertIn("exit status 3", rows["message.sh"][2])
        self.assertIn("could not reach the CRM", rows["message.sh"][2])
        self.assertEqual([r.getMessage() for r in self.handler_records("message.sh")],
                         ["message.sh | starting", "message.sh | could not reach the CRM"])
        self.assertEqual([r.event_id for r in self.handler_records("message.sh")], [event_id, event_id])

    def test_a_script_still_being_written_is_waited_for_not_failed(self):
        server = self.start_server()
        path = os.path.join(self.handlers, "message.sh")
        writer = open(path, "w")  # an editor or `git pull` still holding the file: exec() says ETXTBSY
        self.addCleanup(writer.close)
        writer.write("#!/bin/sh\necho ran > %s\n" % self.out_path("ran"))
        writer.flush()
        os.chmod(path, 0o755)
        event_id = self.post_ok(server, SAMPLE)
        # The writer finishes a moment later, as a save does.
        closer = threading.Timer(0.3, writer.close)
        closer.start()
        self.addCleanup(closer.cancel)
        self.wait_status(event_id, "done")
        self.assertEqual(self.deliveries(event_id)["message.sh"][:2], ("done", 1))  # no failed attempt
        self.assertEqual(self.read_lines("ran"), ["ran"])

    def test_timeout_kills_the_scripts_whole_process_group(self):
        self.write_handler("message.sh", '''#!/bin/sh
sleep 300 &
echo $! > "%(tmp)s/child.pid.tmp" && mv "%(tmp)s/child.pid.tmp" "%(tmp)s/child.pid"
echo $$ > "%(tmp)s/script.pid.tmp" && mv "%(tmp)s/script.pid.tmp" "%(tmp)s/script.pid"
sleep 300
''' % {"tmp": self.tmp})
        server = self.start_server(script_timeout=1, retries=1)
        event_id = self.post_ok(server, SAMPLE)
        wait_until(lambda: self.read_lines("child.pid") and self.read_lines("script.pid"),
                   message="the script to start its background child")
        child, script = int(self.read_lines("child.pid")[0]), int(self.read_lines("script.pid")[0])
        self.assertNotIn(process_state(child), (None, "Z"), "the child runs while the script does")
        self.wait_status(event_id, "dead")
        status, attempts, error = self.deliveries(event_id)["message.sh"]
        self.assertEqual((status, attempts), ("dead", 1))
        self.assertIn("timed out", error)
        # The script is reaped by wabhook (no zombie of ours); its child was killed with the group
        # (gone, or an orphan zombie waiting for init, which reaps orphans, not wabhook).
        wait_until(lambda: process_state(script) is None, message="the script process to be reaped")
        wait_until(lambda: process_state(child) is None or
                   (process_state(child) == "Z" and process_parent(child) != os.getpid()),
                   message="the script's background child to be killed")

    def test_a_script_printing_5_mb_is_handled_and_its_logged_output_is_capped(self):
        self.write_handler("message.big", '''#!/usr/bin/env python3
import sys
sys.stdin.read()
for n in range(50000):
    sys.stdout.write("%05d" % n + "y" * 94 + "\\n")
''')
        server = self.start_server()
        event_id = self.post_ok(server, SAMPLE)
        self.wait_status(event_id, "done")
        lines = [record.getMessage()[len("message.big | "):] for record in self.handler_records("message.big")]
        self.assertEqual(lines[0], "00000" + "y" * 94)
        logged = sum(len(line) + 1 for line in lines)
        self.assertLessEqual(logged, 64 * 1024 + 1)
        self.assertGreater(logged, 32 * 1024)
        notes = [record.getMessage() for record in list(self.log.records)
                 if getattr(record, "handler", None) == "message.big" and " | " not in record.getMessage()]
        dropped = [int(number) for note in notes for number in re.findall(r"\d+", note)]
        self.assertTrue(any(5000000 - 64 * 1024 <= number <= 5000000 - logged + 100 for number in dropped),
                        "a note of the bytes not logged, got %r" % notes)


class PythonOutputTest(HandlersTestCase):
    def test_python_handler_prints_are_logged_attributed_to_handler_and_event(self):
        self.write_handler("message.py", '''
import sys
def handle(event):
    for n in range(20):
        print("event", event.id, "line", n)
    print("something odd", file=sys.stderr)
    sys.stdout.write("no newline at the end")
''')
        server = self.start_server(workers=4)
        ids = [self.post_ok(server, message(n, chat_id="chat-%d@s.whatsapp.net" % n)) for n in range(6)]
        for event_id in ids:
            self.wait_status(event_id, "done")
        records = self.handler_records("message.py")
        for event_id in ids:
            own = [record for record in records if record.event_id == event_id]
            self.assertEqual([r.getMessage() for r in own if r.levelname == "INFO"],
                             ["message.py | event %d line %d" % (event_id, n) for n in range(20)] +
                             ["message.py | no newline at the end"])
            self.assertEqual([r.getMessage() for r in own if r.levelname == "WARNING"],
                             ["message.py | something odd"])
        self.assertEqual(len(records), 6 * 22)  # no line lost or attributed to no event


class HotReloadTest(HandlersTestCase):
    def versioned(self, label, out="ran"):
        return VERSIONED % {"tmp": self.tmp, "out": out, "label": label}

    def test_edited_handler_runs_its_new_code_on_the_next_event(self):
        self.write_handler("message.py", self.versioned("old"))
        server = self.start_server()
        first = self.post_ok(server, message(1))
        self.wait_status(first, "done")
        self.write_handler("message.py", self.versioned("edited"))
        second = self.post_ok(server, message(2))
        self.wait_status(second, "done")
        self.assertEqual(self.read_lines("ran"), ["old %d" % first, "edited %d" % second])

    def saves_during_a_burst(self, save):
        """Post 30 events while `save(path, source)` saves message.py over and over; check none was missed."""
        path = self.write_handler("message.py", self.versioned("A"))
        server = self.start_server(workers=4)
        self.wait_status(self.post_ok(server, message("warm-up")), "done")  # the server has seen the file
        os.remove(self.out_path("ran"))
        stop, saves = threading.Event(), [0]

        def saver():
            while not stop.is_set():
                save(path, self.versioned("AB"[saves[0] % 2]))
                saves[0] += 1
                time.sleep(0.002)

        thread = threading.Thread(target=saver, daemon=True)
        thread.start()
        self.addCleanup(thread.join, 10)
        self.addCleanup(stop.set)
        wait_until(lambda: saves[0] >= 3, message="the saves to start")
        ids = [self.post_ok(server, message(n, chat_id="chat-%d@s.whatsapp.net" % (n % 3))) for n in range(30)]
        for event_id in ids:
            self.wait_status(event_id, "done")
        stop.set()
        thread.join(10)
        self.assertGreater(saves[0], 3)
        ran = [line.split() for line in self.read_lines("ran")]
        self.assertEqual(sorted(int(event_id) for _label, event_id in ran), ids)  # each once, none skipped
        self.assertEqual({label for label, _id in ran} - {"A", "B"}, set())
        for event_id in ids:
            self.assertEqual(self.deliveries(event_id), {"message.py": ("done", 1, None)})
        failures = [m for m in self.log.messages() if "failed" in m or "skipped" in m or "removed" in m]
        self.assertEqual(failures, [])

    def test_write_and_rename_saves_never_skip_an_event_or_show_an_empty_handler(self):
        def save(path, source):
            temp = os.path.join(self.handlers, ".message.py.swp")
            with open(temp, "w") as handle:
                handle.write(source)
            os.replace(temp, path)
        self.saves_during_a_burst(save)

    def test_truncate_then_write_saves_never_skip_an_event_or_show_an_empty_handler(self):
        def save(path, source):
            with open(path, "w") as handle:  # truncated here: for a moment the file is empty
                handle.flush()
                time.sleep(0.002)  # an editor taking its time to write
                handle.write(source)
        self.saves_during_a_burst(save)

    def test_git_pull_style_replacement_never_skips_an_event(self):
        def save(path, source):
            os.remove(path)  # git checks a changed file out by unlinking it and creating it anew
            time.sleep(0.002)
            with open(path, "x") as handle:
                handle.write(source)
        self.saves_during_a_burst(save)

    def test_handler_briefly_missing_during_a_git_pull_still_gets_the_event(self):
        self.shorten(SETTLE_SECONDS=0.5)  # the file must be back within it
        path = self.write_handler("message.py", self.versioned("old"))
        server = self.start_server()
        first = self.post_ok(server, message(1))
        self.wait_status(first, "done")
        time.sleep(1.2 * wabhook.SETTLE_SECONDS)  # the scenario: the server idle longer than that
        os.remove(path)  # git replaces a changed file by unlinking it and creating it anew
        second = self.post_ok(server, message(2))
        wait_until(lambda: self.query("SELECT dispatched FROM events WHERE id = ?", (second,)) == [(1,)],
                   message="the event to be fanned out while the file is missing")
        self.write_handler("message.py", self.versioned("pulled"))
        self.wait_status(second, "done")
        self.assertEqual(self.read_lines("ran"), ["old %d" % first, "pulled %d" % second])
        self.assertEqual(self.deliveries(second), {"message.py": ("done", 1, None)})

    def test_handler_added_while_running_gets_the_next_event(self):
        self.write_handler("message.py", RECORD % {"tmp": self.tmp, "name": "message.py"})
        server = self.start_server()
        first = self.post_ok(server, message(1))
        self.wait_status(first, "done")
        self.write_handler("message.new.py", RECORD % {"tmp": self.tmp, "name": "message.new.py"})
        self.write_handler("message.new.sh", RECORD_SCRIPT % {"tmp": self.tmp, "name": "message.new.sh"})
        second = self.post_ok(server, message(2))
        self.wait_status(second, "done")
        self.assertEqual(self.handled_by(), {first: ["message.py"],
                                             second: ["message.new.py", "message.new.sh", "message.py"]})

    def test_deleted_handler_gets_no_later_events(self):
        self.shorten(SETTLE_SECONDS=0.2)  # how long a deleted file stays gone to count as removed
        self.write_handler("message.py", RECORD % {"tmp": self.tmp, "name": "message.py"})
        gone = self.write_handler("message.gone.py", RECORD % {"tmp": self.tmp, "name": "message.gone.py"})
        server = self.start_server()
        first = self.post_ok(server, message(1))
        self.wait_status(first, "done")
        self.assertEqual(self.handled_by()[first], ["message.gone.py", "message.py"])
        os.remove(gone)
        right_after = self.post_ok(server, message(2))
        self.wait_status(right_after, "done")
        wait_until(lambda: json.loads(self.request(server, "GET", "/healthz")[2])["handlers"] == 1,
                   message="the removed handler to count as gone")
        later = self.post_ok(server, message(3))
        self.wait_status(later, "done")
        self.assertEqual(self.handled_by(), {first: ["message.gone.py", "message.py"], right_after: ["message.py"],
                                             later: ["message.py"]})
        self.assertEqual(sorted(self.deliveries(later)), ["message.py"])


class SharedCheckTest(HandlersTestCase):
    """Registry.get: a run gets code at least as new as its handler's file was when its event was claimed,
    from a stat of its own or another run's made since (one stat a claim of several events, not one a run)."""

    def setUp(self):
        super().setUp()
        self.write_handler("message.py", "LABEL = 'old'\ndef handle(event):\n    pass\n")
        self.age(os.path.join(self.handlers, "message.py"))
        self.registry = wabhook.Registry(self.handlers)

    def save_new_code(self):
        self.write_handler("message.py", "LABEL = 'new code'\ndef handle(event):\n    pass\n")
        self.age(os.path.join(self.handlers, "message.py"))

    def test_a_run_claimed_after_a_save_gets_the_new_code_however_soon_after_another_runs_check(self):
        self.assertEqual(self.registry.get("message.py", time.monotonic()).module.LABEL, "old")
        self.save_new_code()
        self.assertEqual(self.registry.get("message.py", time.monotonic()).module.LABEL, "new code")

    def test_runs_claimed_before_a_check_share_it_and_runs_claimed_after_it_stat_again(self):
        claimed = time.monotonic()
        self.registry.get("message.py", claimed)  # loads it
        stats = []
        real_signature = wabhook._signature

        def counted(path):
            stats.append(path)
            return real_signature(path)
        with unittest.mock.patch.object(wabhook, "_signature", counted), \
                unittest.mock.patch.object(wabhook, "SHARED_CHECK_SECONDS", 3600):
            self.registry.get("message.py", time.monotonic())  # claimed after the load: a stat
            self.assertEqual(len(stats), 1)
            for _ in range(7):  # claimed before that stat
                self.registry.get("message.py", claimed)
            self.assertEqual(len(stats), 1)
            self.registry.get("message.py", time.monotonic())
            self.assertEqual(len(stats), 2)
        with unittest.mock.patch.object(wabhook, "_signature", counted), \
                unittest.mock.patch.object(wabhook, "SHARED_CHECK_SECONDS", 0):
            self.registry.get("message.py", claimed)  # that check is too old to share
            self.assertEqual(len(stats), 3)


class ImportFailureTest(HandlersTestCase):
    def test_handler_that_fails_to_import_is_retried_and_fixing_it_drains_the_backlog(self):
        broken = self.write_handler("message.py", "def handle(event)\n    pass\n")
        self.age(broken)
        server = self.start_server(retries=50, retry_delay=0.05)
        ids = [self.post_ok(server, message(n, chat_id="chat-%d@s.whatsapp.net" % n)) for n in range(3)]
        wait_until(lambda: all(self.deliveries(i).get("message.py", (None, 0))[1] >= 2 for i in ids),
                   message="every event to have failed at least twice")
        tracebacks = [m for m in self.log.messages() if "Traceback" in m and "SyntaxError" in m]
        self.assertTrue(tracebacks)
        self.assertIn("message.py", tracebacks[0])
        for event_id in ids:
            self.assertEqual(self.event_status(event_id), "pending")
            self.assertIn("SyntaxError", self.deliveries(event_id)["message.py"][2])
        self.write_handler("message.py", RECORD % {"tmp": self.tmp, "name": "message.py"})
        for event_id in ids:
            self.wait_status(event_id, "done")
        self.assertEqual(sorted(row[1] for row in self.seen()), ids)


class CheckTest(HandlersTestCase):
    def test_check_passes_a_clean_folder_and_lists_its_handlers(self):
        self.write_handler("message.py", "def handle(event):\n    pass\n")
        self.write_handler("message.alerts.py", "import _common\ndef handle(event):\n    _common.note(event)\n")
        self.write_handler("all.audit.py", "def handle(event):\n    pass\n")
        self.write_handler("_common.py", "def note(event):\n    pass\n")  # a helper: no handle() needed
        self.write_handler("call_incoming.sh", "#!/bin/sh\ncat\n")
        self.write_handler("README.md", "# my handlers\n", executable=False)
        self.write_handler(".notes.py", "this is not python\n")
        self.addCleanup(sys.modules.pop, "_common", None)
        sys.modules.pop("_common", None)
        expected = ["all.audit.py", "call_incoming.sh", "message.alerts.py", "message.py"]

        result = self.run_cli("check", "--handlers", self.handlers)
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr)
        ok = sorted(re.findall(r"^ok\s+(\S+)$", result.stdout, re.M))
        self.assertEqual(ok, expected)
        self.assertNotIn("problem", result.stdout.replace("0 problems", ""))
        for ignored in ("README.md", "_common.py", ".notes.py"):
            self.assertNotIn(ignored, result.stdout)

        good, problems = wabhook.check_handlers(self.handlers)
        self.assertEqual((sorted(good), problems), (expected, []))

    def test_check_reports_every_problem_and_exits_1(self):
        self.write_handler("message.py", "def handle(event):\n    pass\n")
        files = [
            self.write_handler("connected.py", "def handle(event)\n    pass\n"),
            self.write_handler("disconnected.py", "def on_event(event):\n    pass\n"),
            self.write_handler("typing.sh", "#!/bin/sh\ncat\n", executable=False),
            self.write_handler("mesage.py", "def handle(event):\n    pass\n"),
            self.write_handler("README.md", "# notes\n", executable=False),
        ]
        self.age(*files)
        expected = {
            "connected.py": "SyntaxError",
            "disconnected.py": "handle",
            "typing.sh": "chmod +x",
            "mesage.py": "message?",
        }

        result = self.run_cli("check", "--handlers", self.handlers)
        self.assertEqual(result.returncode, 1, result.stdout + result.stderr)
        report = result.stdout + result.stderr
        self.assertEqual(re.findall(r"^ok\s+(\S+)$", result.stdout, re.M), ["message.py"])
        # One block per problem: "problem  <file>: <message, maybe a traceback over several lines>".
        blocks = dict(re.findall(r"^problem\s+(\S+): (.*?)(?=^problem|^\d+ handlers)", result.stdout, re.M | re.S))
        self.assertEqual(sorted(blocks), sorted(expected))
        for name, words in expected.items():
            self.assertIn(words, blocks[name], name)
        self.assertIn("did you mean message?", blocks["mesage.py"])
        self.assertNotIn("README.md", report)

        good, problems = wabhook.check_handlers(self.handlers)
        self.assertEqual(good, ["message.py"])
        by_file = {problem.file: problem.message for problem in problems}
        self.assertEqual(sorted(by_file), sorted(expected))
        for name, words in expected.items():
            self.assertIn(words, by_file[name], name)
        self.assertIn("message", by_file["mesage.py"].split("did you mean", 1)[1])


class ShippedHandlersTest(HandlersTestCase):
    def test_shipped_example_handlers_pass_check_and_print_the_sample_message(self):
        result = self.run_cli("check", "--handlers", SHIPPED_HANDLERS)
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr)
        self.assertEqual(sorted(re.findall(r"^ok\s+(\S+)$", result.stdout, re.M)),
                         sorted(name for name in os.listdir(SHIPPED_HANDLERS) if name[0] not in "_."
                                and os.path.isfile(os.path.join(SHIPPED_HANDLERS, name))))

        process, port = self.start_process("--handlers", SHIPPED_HANDLERS)
        mine = self.post_ok(port, SAMPLE)
        self.wait_status(mine, "done")
        from_me = self.post_ok(port, dict(SAMPLE, message_id="ACE-FROM-ME", from_me=True))
        self.wait_status(from_me, "done")
        self.assertEqual(self.terminate(process), 0)
        log = self.process_log(process)
        self.assertEqual(re.findall(r"message\.py \| .*", log), ["message.py | Alice: Hello!"])


class ScriptEnvironmentTest(WabhookTestCase):
    ENV_DUMP = '''#!%s
import json, os
with open(os.path.join(%r, "env-" + os.environ["WABHOOK_ID"]), "w") as out:
    json.dump(dict(os.environ), out)
'''

    def test_scripts_get_a_clean_environment_never_the_token_or_secret(self):
        # The interpreter by its own path: `env python3` may go through a shim that adds variables.
        self.write_handler("message.sh", self.ENV_DUMP % (sys.executable, self.tmp))
        secrets_and_more = {"WABHOOK_TOKEN": "tok-leak", "WABHOOK_SECRET": "whsec_bGVhaw==",
                            "UNRELATED": "x", "NATS_URL": "nats://127.0.0.1:4222", "TZ": "UTC"}
        with unittest.mock.patch.dict(os.environ, secrets_and_more):
            server = self.start_server(script_env=("NATS_URL",))
        status, reply = self.post(server, load_samples()[0])
        self.assertEqual(status, 200, reply)
        env = wait_until(lambda: self.read_json("env-%d" % reply["id"]), message="the script's environment")
        self.assertEqual(env["WABHOOK_EVENT"], "message")
        self.assertEqual(env["NATS_URL"], "nats://127.0.0.1:4222")
        self.assertEqual(env["TZ"], "UTC")
        self.assertIn("PATH", env)
        allowed = {"PATH", "HOME", "LANG", "TZ", "NATS_URL", "WABHOOK_EVENT", "WABHOOK_ID", "WABHOOK_BRIDGE",
                   "LC_CTYPE"}  # Python sets LC_CTYPE itself in a C locale (PEP 538)
        self.assertEqual(set(env) - allowed, set(), env)

    def read_json(self, name):
        try:
            with open(self.out_path(name), encoding="utf-8") as handle:
                return json.load(handle)
        except (FileNotFoundError, ValueError):
            return None


BROKEN_HANDLERS = [
    # (file name, source, executable, what `check` and the server both say)
    ("call_incoming.sh", "#!/bin/sh\ncat\n", False, "is not executable: run chmod +x call_incoming.sh"),
    ("call_terminated.sh", "cat\n", True, "has no interpreter line"),
    ("connected.py", "def handle(event)\n    pass\n", False, "SyntaxError"),
    ("disconnected.py", "def on_event(event):\n    pass\n", False, "defines no handle(event) function"),
    ("typing.py", "handle = 3\n", False, "its handle is not a function"),
    ("poll_vote.py", "def handle():\n    pass\n", False, "must take one argument, the event"),
    ("event_response.py", "def handle(event, extra):\n    pass\n", False, "must take one argument, the event"),
]


class OneDefinitionTest(HandlersTestCase):
    """`check` and the server agree on every broken handler, and say the same sentence."""

    def test_check_and_the_server_agree_on_each_broken_handler(self):
        for name, source, executable, _sentence in BROKEN_HANDLERS:
            self.age(self.write_handler(name, source, executable=executable))
        result = self.run_cli("check", "--handlers", self.handlers)
        self.assertEqual(result.returncode, 1, result.stdout)
        blocks = dict(re.findall(r"^problem\s+(\S+): (.*?)(?=^problem|^\d+ handlers)", result.stdout, re.M | re.S))
        server = self.start_server(retries=3, retry_delay=0.05)
        samples = {sample["event"]: sample for sample in load_samples()}
        posted = {name: self.post_ok(server, samples[handler_event(name)])  # failing side by side
                  for name, *_rest in BROKEN_HANDLERS}
        for name, _source, _executable, sentence in BROKEN_HANDLERS:
            with self.subTest(handler=name):
                self.assertIn(sentence, blocks.get(name, ""), result.stdout)
                event_id = posted[name]
                self.wait_status(event_id, "dead")  # retried like any failure, never done
                status, attempts, error = self.deliveries(event_id)[name]
                self.assertEqual((status, attempts), ("dead", 3))
                self.assertIn(sentence, error)
                warnings = [m for m in self.log.messages() if m.startswith("broken handler %s:" % name)]
                self.assertEqual(len(warnings), 1, warnings)  # once, not once an attempt
                self.assertIn(sentence, warnings[0])

    def test_fixing_a_broken_script_warns_no_more_and_drains_its_events(self):
        script = self.write_handler("call_incoming.sh", "#!/bin/sh\necho ran >> %s\n" % self.out_path("ran"),
                                    executable=False)
        server = self.start_server(retries=100, retry_delay=0.05)
        event_id = self.post_ok(server, load_samples()[6])
        wait_until(lambda: self.deliveries(event_id).get("call_incoming.sh", (None, 0))[1] >= 2,
                   message="two failed attempts")
        os.chmod(script, 0o755)
        self.wait_status(event_id, "done")
        self.assertEqual(self.read_lines("ran"), ["ran"])

    def test_async_handle_is_awaited_to_completion(self):
        self.write_handler("message.py", "import asyncio\nasync def handle(event):\n    await asyncio.sleep(0.01)\n"
                           "    open(%r, 'a').write('%%d\\n' %% event.id)\n" % self.out_path("async"))
        result = self.run_cli("check", "--handlers", self.handlers)
        self.assertEqual(result.returncode, 0, result.stdout)
        server = self.start_server()
        event_id = self.post_ok(server, message(1))
        self.wait_status(event_id, "done")
        self.assertEqual(self.read_lines("async"), [str(event_id)])

    def test_async_handle_past_the_script_timeout_fails(self):
        self.write_handler("message.py", "import asyncio\nasync def handle(event):\n    await asyncio.sleep(30)\n")
        server = self.start_server(script_timeout=0.2, retries=1)
        event_id = self.post_ok(server, message(1))
        self.wait_status(event_id, "dead")
        self.assertIn("TimeoutError", self.deliveries(event_id)["message.py"][2])

    def test_event_types_without_a_handler_are_named_up_to_a_limit_then_one_warning(self):
        self.shorten(UNHANDLED_TYPES_NAMED=3)
        server = self.start_server()
        for n in range(6):
            self.wait_status(self.post_ok(server, {"event": "made_up_%d" % n}), "done")
        named = [m for m in self.log.messages() if "no handler takes it" in m]
        self.assertEqual(len(named), 3, named)
        too_many = [m for m in self.log.messages() if "more than 3 event types arrived with no handler" in m]
        self.assertEqual(len(too_many), 1, self.log.messages())
        self.assertEqual(len(server.registry._said_unhandled), 3)

    def test_a_handler_for_an_undocumented_type_runs_and_check_notes_it_and_a_near_miss_is_a_problem(self):
        self.write_handler("group_update.py", "def handle(event):\n    open(%r, 'w').write(event.event)\n"
                           % self.out_path("group"))
        result = self.run_cli("check", "--handlers", self.handlers)
        self.assertEqual(result.returncode, 0, result.stdout)
        self.assertIn("note     group_update.py: 'group_update' is not one of the documented events", result.stdout)
        server = self.start_server()
        self.wait_status(self.post_ok(server, {"event": "group_update"}), "done")
        self.assertEqual(self.read_lines("group"), ["group_update"])
        self.write_handler("mesage.py", "def handle(event):\n    pass\n")
        result = self.run_cli("check", "--handlers", self.handlers)
        self.assertEqual(result.returncode, 1, result.stdout)
        self.assertIn("did you mean message? (name it message.py)", result.stdout)

    def test_the_server_says_once_per_type_that_events_arrive_with_no_handler_and_when_it_loads_one(self):
        server = self.start_server()
        for n in range(3):
            self.wait_status(self.post_ok(server, {"event": "typing", "chat_id": "c%d" % n}), "done")
        said = [m for m in self.log.messages() if "no handler takes it: add handlers/typing.py" in m]
        self.assertEqual(len(said), 1, said)
        self.write_handler("typing.py", "def handle(event):\n    pass\n")
        self.wait_status(self.post_ok(server, {"event": "typing", "chat_id": "c9"}), "done")
        self.assertIn("loaded handler typing.py", self.log.messages())
        path = self.write_handler("typing.py", "def handle(event):\n    return None\n")
        self.wait_status(self.post_ok(server, {"event": "typing", "chat_id": "c10"}), "done")
        self.assertIn("reloaded handler typing.py", self.log.messages())
        os.remove(path)
        wait_until(lambda: any(m.startswith("dropped handler typing.py") for m in self.log.messages()),
                   message="the drop logged")


class BodyParameterTest(HandlersTestCase):
    def test_handle_with_a_body_parameter_gets_the_json_exactly_as_received(self):
        self.write_handler("typing.py", "def handle(event, body=None):\n    open(%r, 'w').write(body)\n"
                           % self.out_path("body"))
        server = self.start_server()
        sent = '{"event":"typing",  "chat_id": "c1", "note": "caf\\u00e9"}'
        self.wait_status(self.post_ok(server, sent), "done")
        with open(self.out_path("body"), encoding="utf-8") as handle:
            self.assertEqual(handle.read(), sent)
