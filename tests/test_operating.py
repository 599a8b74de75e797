"""Operating wabhook (SPEC §8): /healthz, /metrics in the Prometheus text format, and the logs.

/metrics is read with a small strict parser of the text format written here, so
a label that is not escaped, a family without HELP/TYPE or a histogram whose
buckets are not cumulative fails the test. The logging promises are checked on
a real `python wabhook.py serve` process and its stderr.
"""

import http.client
import json
import math
import os
import re
import socket
import sqlite3
import time

from tests.support import WabhookTestCase, load_samples, wait_until

import wabhook

MESSAGE = load_samples()[0]

METRIC_NAME = r"[a-zA-Z_:][a-zA-Z0-9_:]*"
LABEL_PAIR = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\\n]|\\.)*)"')
SAMPLE_LINE = re.compile(r"(%s)(?:\{(.*)\})? (\S+)(?: (-?\d+))?" % METRIC_NAME)
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")

# A handler that says it started, then waits (bounded) for a file before returning, so its event
# stays pending meanwhile.
BLOCKING_HANDLER = '''
import os, time
def handle(event):
    open(%(started)r, "w").close()
    started = time.time()
    while not os.path.exists(%(release)r) and time.time() - started < 30:
        time.sleep(0.01)
    time.sleep(max(0.0, %(least)r - (time.time() - started)))
'''
FAILING_HANDLER = "def handle(event):\n    raise RuntimeError('handler broke on %d' % event.id)\n"
PRINTING_HANDLER = "def handle(event):\n    print('hello from the handler, event %d' % event.id)\n"


def unescape_label(text):
    """A label value of the text format: only \\\\, \\" and \\n are valid escapes."""
    out, index = [], 0
    while index < len(text):
        char = text[index]
        if char == "\\":
            escaped = text[index + 1:index + 2]
            if escaped not in ("\\", '"', "n"):
                raise ValueError("bad escape \\%s in label value %r" % (escaped, text))
            out.append("\n" if escaped == "n" else escaped)
            index += 2
        else:
            out.append(char)
            index += 1
    return "".join(out)


def parse_labels(text):
    labels, position = {}, 0
    while position < len(text):
        match = LABEL_PAIR.match(text, position)
        if not match:
            raise ValueError("bad label set {%s}" % text)
        name, value = match.group(1), unescape_label(match.group(2))
        if name in labels:
            raise ValueError("label %s repeated in {%s}" % (name, text))
        labels[name] = value
        position = match.end()
        if position < len(text):
            if text[position] != ",":
                raise ValueError("labels not separated by a comma: {%s}" % text)
            position += 1
    return labels


def parse_value(text):
    if text in ("+Inf", "-Inf", "NaN"):
        return float(text)
    if not re.fullmatch(r"[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?", text):
        raise ValueError("bad sample value %r" % text)
    return float(text)


def parse_prometheus(text):
    """Families {name: {"type", "help", "samples": [(sample name, labels dict, value)]}}; ValueError if malformed.

    Strict: every line is a comment or `name{labels} value`; each family has one
    HELP and one TYPE before its first sample and its samples are not split up;
    counters end in _total; histogram buckets are cumulative and end with
    le="+Inf" equal to _count.
    """
    if not text.endswith("\n"):
        raise ValueError("the exposition does not end with a newline")
    families, finished, current = {}, set(), None
    for number, line in enumerate(text[:-1].split("\n"), 1):
        where = "line %d %r" % (number, line)
        if not line.strip():
            raise ValueError("%s: empty line" % where)
        if line.startswith("#"):
            parts = line.split(" ", 3)
            if len(parts) >= 3 and parts[1] in ("HELP", "TYPE"):
                if not re.fullmatch(METRIC_NAME, parts[2]) or len(parts) != 4:
                    raise ValueError("%s: malformed %s" % (where, parts[1]))
                family = families.setdefault(parts[2], {"type": None, "help": None, "samples": []})
                key = parts[1].lower()
                if family[key] is not None or family["samples"]:
                    raise ValueError("%s: %s repeated or after the family's samples" % (where, parts[1]))
                if key == "type" and parts[3] not in ("counter", "gauge", "histogram", "summary", "untyped"):
                    raise ValueError("%s: unknown type" % where)
                family[key] = parts[3]
            continue
        match = SAMPLE_LINE.fullmatch(line)
        if not match:
            raise ValueError("%s: not `name{labels} value`" % where)
        name, labels, value = match.group(1), parse_labels(match.group(2) or ""), parse_value(match.group(3))
        family_name = name
        if name not in families:
            for suffix in HISTOGRAM_SUFFIXES:
                if name.endswith(suffix) and families.get(name[:-len(suffix)], {}).get("type") == "histogram":
                    family_name = name[:-len(suffix)]
        family = families.get(family_name)
        if family is None or family["type"] is None or family["help"] is None:
            raise ValueError("%s: sample before its family's # HELP and # TYPE" % where)
        if family_name != current:
            if family_name in finished:
                raise ValueError("%s: the samples of %s are split up" % (where, family_name))
            if current is not None:
                finished.add(current)
            current = family_name
        if family["type"] == "histogram" and name == family_name:
            raise ValueError("%s: a histogram sample needs _bucket, _sum or _count" % where)
        if (name, labels) in [(n, ls) for n, ls, _v in family["samples"]]:
            raise ValueError("%s: duplicate sample" % where)
        family["samples"].append((name, labels, value))
    for family_name, family in families.items():
        if family["type"] == "counter":
            if not family_name.endswith("_total"):
                raise ValueError("counter %s does not end with _total" % family_name)
            if any(value < 0 for _n, _l, value in family["samples"]):
                raise ValueError("counter %s is negative" % family_name)
        if family["type"] == "histogram":
            check_histogram(family_name, family["samples"])
    return families


def check_histogram(name, samples):
    series = {}
    for sample_name, labels, value in samples:
        key = tuple(sorted((k, v) for k, v in labels.items() if k != "le"))
        entry = series.setdefault(key, {"buckets": [], "sum": None, "count": None})
        if sample_name == name + "_bucket":
            if "le" not in labels:
                raise ValueError("%s bucket without le" % name)
            entry["buckets"].append((parse_value(labels["le"]), value))
        elif "le" in labels:
            raise ValueError("%s: le on a _sum or _count sample" % name)
        else:
            entry[sample_name[len(name) + 1:]] = value
    for key, entry in series.items():
        bounds = [bound for bound, _count in entry["buckets"]]
        counts = [count for _bound, count in entry["buckets"]]
        if not bounds or bounds[-1] != math.inf:
            raise ValueError("%s%s: no le=\"+Inf\" bucket last" % (name, key))
        if bounds != sorted(set(bounds)):
            raise ValueError("%s%s: bucket bounds not increasing: %s" % (name, key, bounds))
        if counts != sorted(counts):
            raise ValueError("%s%s: buckets not cumulative: %s" % (name, key, counts))
        if entry["count"] is None or entry["sum"] is None:
            raise ValueError("%s%s: missing _sum or _count" % (name, key))
        if counts[-1] != entry["count"]:
            raise ValueError("%s%s: +Inf bucket %s != _count %s" % (name, key, counts[-1], entry["count"]))


def value_of(families, name, **labels):
    """The value of one sample (0 if absent), looked up by family or sample name and labels."""
    for family in families.values():
        for sample_name, sample_labels, value in family["samples"]:
            if sample_name == name and sample_labels == labels:
                return value
    return 0


def histogram_of(families, name, **labels):
    """{"buckets": [(le, count)], "sum", "count"} of one histogram series."""
    out = {"buckets": [], "sum": None, "count": None}
    for sample_name, sample_labels, value in families[name]["samples"]:
        rest = dict(sample_labels)
        le = rest.pop("le", None)
        if rest != labels:
            continue
        if sample_name == name + "_bucket":
            out["buckets"].append((parse_value(le), value))
        else:
            out[sample_name[len(name) + 1:]] = value
    return out


class PrometheusParserTest(WabhookTestCase):
    """The parser itself must reject what a Prometheus scrape would reject, or the tests below prove nothing."""

    GOOD = ('# HELP a_total A.\n# TYPE a_total counter\na_total{x="q\\"b\\\\s\\nl"} 1\n'
            '# HELP h H.\n# TYPE h histogram\nh_bucket{le="1.0"} 1\nh_bucket{le="+Inf"} 2\nh_sum 3.5\nh_count 2\n')

    def test_parser_accepts_a_good_exposition_and_unescapes_labels(self):
        families = parse_prometheus(self.GOOD)
        self.assertEqual(families["a_total"]["samples"], [("a_total", {"x": 'q"b\\s\nl'}, 1.0)])
        self.assertEqual(histogram_of(families, "h"), {"buckets": [(1.0, 1.0), (math.inf, 2.0)], "sum": 3.5,
                                                       "count": 2.0})

    def test_parser_rejects_malformed_expositions(self):
        bad = {
            "no type": "# HELP a_total A.\na_total 1\n",
            "no help": "# TYPE a_total counter\na_total 1\n",
            "raw quote": '# HELP a_total A.\n# TYPE a_total counter\na_total{x="q"b"} 1\n',
            "raw newline": '# HELP a_total A.\n# TYPE a_total counter\na_total{x="q\nb"} 1\n',
            "bad escape": '# HELP a_total A.\n# TYPE a_total counter\na_total{x="q\\b"} 1\n',
            "counter name": "# HELP a A.\n# TYPE a counter\na 1\n",
            "not cumulative": self.GOOD.replace('h_bucket{le="+Inf"} 2', 'h_bucket{le="+Inf"} 0'),
            "inf != count": self.GOOD.replace("h_count 2", "h_count 3"),
            "no +Inf": self.GOOD.replace('h_bucket{le="+Inf"} 2\n', ""),
            "no final newline": self.GOOD[:-1],
            "bad value": "# HELP g G.\n# TYPE g gauge\ng one\n",
        }
        for case, text in bad.items():
            with self.subTest(case=case):
                with self.assertRaises(ValueError):
                    parse_prometheus(text)


class HealthzTest(WabhookTestCase):
    def test_healthz_needs_no_token_and_reports_version_uptime_pending_and_dead(self):
        release = self.out_path("release")
        started = self.out_path("started")
        self.write_handler("typing.py", BLOCKING_HANDLER % dict(release=release, started=started,
                                                                least=0.0))
        self.write_handler("connected.py", FAILING_HANDLER)
        before_start = time.time()
        server = self.start_server(token="s3cret", retries=1)
        auth = {"Authorization": "Bearer s3cret"}
        dead_id = self.post(server, {"event": "connected", "phone": "1"}, headers=auth)[1]["id"]
        pending_id = self.post(server, load_samples()[3], headers=auth)[1]["id"]
        self.wait_status(dead_id, "dead")
        wait_until(lambda: self.query("SELECT status FROM deliveries WHERE event_id = ?", (pending_id,))
                   == [("running",)], message="the typing handler to be running")
        # Claimed is not yet running: the worker counts a run from when it takes the claim.
        wait_until(lambda: os.path.exists(started), message="the typing handler to start")

        status, headers, data = self.request(server, "GET", "/healthz")
        self.assertEqual(status, 200, data)
        self.assertEqual(headers["content-type"], "application/json")
        health = json.loads(data)
        self.assertEqual(health["status"], "ok")
        self.assertEqual(health["version"], wabhook.__version__)
        self.assertIsInstance(health["uptime_seconds"], (int, float))
        self.assertGreaterEqual(health["uptime_seconds"], 0)
        self.assertLessEqual(health["uptime_seconds"], time.time() - before_start + 0.01)
        self.assertEqual((health["pending"], health["dead"]), (1, 1))
        self.assertEqual(health["handlers"], 2)
        self.assertEqual(health["running"], 1)

        open(release, "w").close()
        self.wait_status(pending_id, "done")
        health = json.loads(self.request(server, "GET", "/healthz")[2])
        self.assertEqual((health["pending"], health["dead"], health["running"]), (0, 1, 0))

    def test_healthz_answers_503_while_the_inbox_is_locked_and_200_after(self):
        self.shorten(BUSY_TIMEOUT_SECONDS=0.2)  # the lock below is held past it
        server = self.start_server()
        self.assertEqual(self.request(server, "GET", "/healthz")[0], 200)
        blocker = sqlite3.connect(self.db, timeout=5, isolation_level=None)
        try:
            blocker.execute("BEGIN IMMEDIATE")
            status, headers, data = self.request(server, "GET", "/healthz")
            self.assertEqual(status, 503, data)
            self.assertEqual(headers["content-type"], "application/json")
            self.assertEqual(json.loads(data)["status"], "unavailable")
            self.assertEqual(json.loads(data)["version"], wabhook.__version__)
        finally:
            blocker.execute("ROLLBACK")
            blocker.close()
        status, _headers, data = self.request(server, "GET", "/healthz")
        self.assertEqual(status, 200, data)
        self.assertEqual(json.loads(data)["status"], "ok")


class MetricsTest(WabhookTestCase):
    def metrics(self, server, headers=None):
        status, response_headers, data = self.request(server, "GET", "/metrics", headers=headers)
        self.assertEqual(status, 200, data)
        self.assertTrue(response_headers["content-type"].startswith("text/plain"), response_headers)
        return parse_prometheus(data.decode("utf-8"))

    def metrics_when(self, server, name, expected, message, **labels):
        """The parsed /metrics once sample `name{labels}` equals `expected` (counted just after replies)."""
        def scrape():
            families = self.metrics(server)
            return families if value_of(families, name, **labels) == expected else None
        return wait_until(scrape, message=message)

    def test_metrics_count_events_duplicates_rejections_runs_durations_and_inbox_gauges(self):
        release = self.out_path("release")
        self.write_handler("message.py", "def handle(event):\n    pass\n")
        self.write_handler("message.bad.py", FAILING_HANDLER)
        self.write_handler("typing.py", BLOCKING_HANDLER % dict(release=release,
                                                                started=self.out_path("started"),
                                                                least=0.3))
        server = self.start_server(retries=2)
        first = self.post(server, dict(MESSAGE, message_id="M1"))[1]
        second = self.post(server, dict(MESSAGE, message_id="M2"))[1]
        duplicate = self.post(server, dict(MESSAGE, message_id="M1"))[1]
        self.assertTrue(duplicate["duplicate"])
        connected = self.post(server, load_samples()[1])[1]
        unknown = self.post(server, {"event": "reaction", "emoji": "+1"})[1]
        typing = self.post(server, dict(load_samples()[3], chat_id="another-chat@s.whatsapp.net"))[1]
        self.assertEqual(self.request(server, "POST", "/hook", b"{not json")[0], 400)
        self.assertEqual(self.request(server, "POST", "/nowhere", b'{"event": "x"}')[0], 404)
        self.assertEqual(self.request(server, "POST", "/hook", b"[]")[0], 400)
        for event_id in (first["id"], second["id"]):
            self.wait_status(event_id, "dead")
        for event_id in (connected["id"], unknown["id"]):
            self.wait_status(event_id, "done")

        # An ack is counted just after its reply is written: wait for the sixth 200.
        families = self.metrics_when(server, "wabhook_ack_duration_seconds_count", 6, "six acks in /metrics")
        self.assertEqual(families["wabhook_events_received_total"]["type"], "counter")
        self.assertEqual(value_of(families, "wabhook_events_received_total", event="message"), 2)
        self.assertEqual(value_of(families, "wabhook_events_received_total", event="connected"), 1)
        self.assertEqual(value_of(families, "wabhook_events_received_total", event="typing"), 1)
        self.assertEqual(value_of(families, "wabhook_events_received_total", event="unknown"), 1)
        self.assertEqual(value_of(families, "wabhook_duplicates_total", event="message"), 1)
        self.assertEqual(value_of(families, "wabhook_requests_rejected_total", status="400"), 2)
        self.assertEqual(value_of(families, "wabhook_requests_rejected_total", status="404"), 1)
        self.assertEqual(value_of(families, "wabhook_handler_runs_total", handler="message.py", outcome="ok"), 2)
        self.assertEqual(value_of(families, "wabhook_handler_runs_total", handler="message.bad.py",
                                  outcome="failed"), 4)
        self.assertEqual(value_of(families, "wabhook_handler_runs_total", handler="message.bad.py", outcome="ok"), 0)
        self.assertEqual(families["wabhook_handler_duration_seconds"]["type"], "histogram")
        self.assertEqual(histogram_of(families, "wabhook_handler_duration_seconds", handler="message.py")["count"], 2)
        self.assertEqual(histogram_of(families, "wabhook_handler_duration_seconds",
                                      handler="message.bad.py")["count"], 4)
        self.assertEqual(families["wabhook_events_pending"]["type"], "gauge")
        self.assertEqual(value_of(families, "wabhook_events_pending"), 1)  # typing.py still holds its event
        self.assertEqual(value_of(families, "wabhook_events_dead"), 2)
        ack = histogram_of(families, "wabhook_ack_duration_seconds")
        self.assertEqual((ack["count"], ack["buckets"][-1]), (6, (math.inf, 6)))
        self.assertGreater(len(ack["buckets"]), 1)
        self.assertEqual(value_of(families, "wabhook_info", version=wabhook.__version__), 1)

        open(release, "w").close()
        self.wait_status(typing["id"], "done")
        families = self.metrics_when(server, "wabhook_handler_runs_total", 1, "the typing.py run in /metrics",
                                     handler="typing.py", outcome="ok")
        self.assertEqual(value_of(families, "wabhook_events_pending"), 0)
        # The run took at least 0.3 s: observed in seconds, it lands above every bucket under 0.3.
        durations = histogram_of(families, "wabhook_handler_duration_seconds", handler="typing.py")
        self.assertEqual(durations["count"], 1)
        self.assertGreaterEqual(durations["sum"], 0.3)
        self.assertEqual([count for bound, count in durations["buckets"] if bound < 0.3], [0] * len(
            [bound for bound, _count in durations["buckets"] if bound < 0.3]))

    def test_weird_event_and_handler_names_are_escaped_and_keep_the_format_valid(self):
        weird_handler = 'all.q"b\\s\nl.py'
        self.write_handler(weird_handler, "def handle(event):\n    pass\n")
        server = self.start_server()
        weird_type = 'we"ird\\type\nline2 } 1\n# TYPE x counter'
        event_id = self.post(server, {"event": weird_type})[1]["id"]
        self.wait_status(event_id, "done")
        families = self.metrics_when(server, "wabhook_handler_runs_total", 1, "the weird handler's run in /metrics",
                                     handler=weird_handler, outcome="ok")
        self.assertEqual(value_of(families, "wabhook_events_received_total", event="unknown"), 1)
        labels = [labels for family in families.values() for _name, labels, _value in family["samples"]]
        self.assertNotIn(weird_type, [value for label_set in labels for value in label_set.values()])
        self.assertEqual(histogram_of(families, "wabhook_handler_duration_seconds", handler=weird_handler)["count"], 1)

    def test_metrics_need_the_token_when_one_is_set(self):
        server = self.start_server(token="s3cret")
        status, _headers, data = self.request(server, "GET", "/metrics")
        self.assertEqual(status, 401, data)
        self.assertEqual(json.loads(data)["error"], "unauthorized")
        self.assertIn("wabhook_events_received_total", self.metrics(server, {"Authorization": "Bearer s3cret"}))
        status, _headers, data = self.request(server, "GET", "/metrics?token=s3cret")
        self.assertEqual(status, 200)
        self.assertEqual(self.request(server, "GET", "/healthz")[0], 200)


class LoggingTest(WabhookTestCase):
    def log_lines(self, process):
        return [line for line in self.process_log(process).splitlines() if line.strip()]

    def json_log(self, process):
        """Every line of the process's log as a JSON object (fails on a line that is not one)."""
        entries = []
        for line in self.log_lines(process):
            try:
                entry = json.loads(line)
            except ValueError:
                self.fail("a log line is not JSON: %r" % line)
            self.assertIsInstance(entry, dict, line)
            entries.append(entry)
        return entries

    def test_json_log_format_gives_one_object_per_line_with_event_id_and_handler(self):
        self.write_handler("message.bad.py", FAILING_HANDLER)
        self.write_handler("message.py", PRINTING_HANDLER)
        process, port = self.start_process("--log-format", "json", "--retries", "2", "--log-level", "debug")
        event_id = self.post(port, MESSAGE)[1]["id"]
        self.wait_status(event_id, "dead")
        self.assertEqual(self.terminate(process), 0)
        entries = self.json_log(process)
        for entry in entries:
            self.assertIn(entry.get("level"), ("debug", "info", "warning", "error", "critical"), entry)
            self.assertIsInstance(entry.get("message"), str, entry)
            self.assertRegex(entry.get("time", ""), r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")
        self.assertTrue(any("listening on" in entry["message"] for entry in entries))
        failures = [entry for entry in entries if entry.get("handler") == "message.bad.py"]
        self.assertEqual(len(failures), 2, entries)  # one line per failed attempt
        for entry in failures:
            self.assertEqual(entry["event_id"], event_id)
            self.assertIn(entry["level"], ("warning", "error"))
            self.assertIn("handler broke on %d" % event_id, entry["message"])
        printed = [entry for entry in entries if entry.get("handler") == "message.py" and " | " in entry["message"]]
        self.assertEqual([(e["level"], e["event_id"]) for e in printed], [("info", event_id)])
        self.assertIn("hello from the handler, event %d" % event_id, printed[0]["message"])
        # --log-level debug shows each successful run.
        self.assertTrue(any(e["level"] == "debug" and e.get("handler") == "message.py" and e.get("event_id") == event_id
                            for e in entries), entries)

    def test_json_log_keeps_what_a_handler_prints_while_loading_as_attributed_json_lines(self):
        self.write_handler("message.py", "import sys\nprint('loading the message handler')\n"
                           "print('loading, on stderr', file=sys.stderr)\n" + PRINTING_HANDLER)
        process, port = self.start_process("--log-format", "json")
        event_id = self.post(port, MESSAGE)[1]["id"]
        self.wait_status(event_id, "done")
        self.assertEqual(self.terminate(process), 0)
        entries = self.json_log(process)  # a raw line from the import fails here
        loading = sorted((e["level"], e.get("handler"), e.get("event_id"), e["message"])
                         for e in entries if "loading" in e["message"])
        self.assertEqual(loading, [("info", "message.py", event_id, "message.py | loading the message handler"),
                                   ("warning", "message.py", event_id, "message.py | loading, on stderr")])

    def requests_for_access_log(self, port):
        """Five requests, two of them on one keep-alive connection; their (method, path, status)."""
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        try:
            for body in (dict(MESSAGE, message_id="A1"), dict(MESSAGE, message_id="A2")):
                connection.request("POST", "/hook", body=json.dumps(body))
                response = connection.getresponse()
                response.read()
                self.assertEqual(response.status, 200)
        finally:
            connection.close()
        self.assertEqual(self.request(port, "GET", "/healthz")[0], 200)
        self.assertEqual(self.request(port, "POST", "/nowhere", b'{"event": "x"}')[0], 404)
        self.assertEqual(self.request(port, "GET", "/metrics")[0], 200)
        return [("POST", "/hook", 200), ("POST", "/hook", 200), ("GET", "/healthz", 200),
                ("POST", "/nowhere", 404), ("GET", "/metrics", 200)]

    def access_lines(self, entries):
        pattern = re.compile(r'127\.0\.0\.1 "([A-Z]+) (\S+)" (\d{3})\b')
        found = []
        for entry in entries:
            match = pattern.search(entry["message"])
            if match:
                found.append((match.group(1), match.group(2), int(match.group(3))))
        return found

    def test_access_log_writes_one_line_per_request(self):
        process, port = self.start_process("--log-format", "json", "--access-log")
        expected = self.requests_for_access_log(port)
        self.assertEqual(self.terminate(process), 0)
        # A line is written once its reply is sent, so lines of separate connections may come in any order.
        self.assertEqual(sorted(self.access_lines(self.json_log(process))), sorted(expected))

    def test_access_log_has_a_line_for_a_request_refused_before_routing(self):
        process, port = self.start_process("--log-format", "json", "--access-log")
        status = self.request(port, "PURGE", "/hook")[0]
        self.assertGreaterEqual(status, 400)
        self.assertEqual(self.request(port, "GET", "/healthz")[0], 200)
        self.assertEqual(self.terminate(process), 0)
        lines = self.access_lines(self.json_log(process))
        self.assertEqual(sorted((method, path) for method, path, _status in lines),
                         [("GET", "/healthz"), ("PURGE", "/hook")])
        self.assertIn(("PURGE", "/hook", status), lines)

    def test_no_access_log_line_without_the_flag(self):
        process, port = self.start_process("--log-format", "json")
        self.requests_for_access_log(port)
        self.assertEqual(self.terminate(process), 0)
        entries = self.json_log(process)
        self.assertTrue(entries)
        self.assertEqual(self.access_lines(entries), [])
        self.assertEqual([e for e in entries if "/healthz" in e["message"] or "/metrics" in e["message"]], [])

    def test_log_level_warning_hides_info_lines(self):
        self.write_handler("message.bad.py", FAILING_HANDLER)
        self.write_handler("message.py", PRINTING_HANDLER)
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        process, _ = self.start_process("--log-format", "json", "--log-level", "warning", "--retries", "1",
                                        "--port", str(port), wait_listening=False)

        def healthy():
            try:
                return self.request(port, "GET", "/healthz", timeout=2)[0] == 200
            except OSError:
                self.assertIsNone(process.poll(), "the server exited:\n" + self.process_log(process))
                return False

        wait_until(healthy, message="the server to answer /healthz")
        event_id = self.post(port, MESSAGE)[1]["id"]
        self.wait_status(event_id, "dead")  # message.py runs after message.bad.py: its print is done too
        self.assertEqual(self.terminate(process), 0)
        entries = self.json_log(process)
        self.assertEqual([e for e in entries if e["level"] in ("debug", "info")], [])
        self.assertTrue(any(e.get("handler") == "message.bad.py" and e["level"] == "error" for e in entries), entries)
        self.assertFalse(any("hello from the handler" in e["message"] for e in entries))


class NoInjectionTest(WabhookTestCase):
    """Logs and CLI tables: no secret, no control character, no forged line (hostile traffic, items 6 and 8)."""

    def test_the_token_is_never_logged_whatever_the_request(self):
        process, port = self.start_process("--token", "S3CRET", "--access-log", "--log-level", "debug")
        requests = [
            b"POST /hook?token=S3CRET&note=a b HTTP/1.1\r\nHost: x\r\n\r\n",        # a request line refused
            b"POST /hook?token=S3CRET HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 70000 + b"\r\n\r\n",  # 431
            b"POST /hook?token=S3CRET HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}",  # 400 after auth
            b"GET /metrics?token=S3CRET HTTP/1.1\r\nHost: x\r\n\r\n",
            b"POST /hook HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer S3CRET\r\nContent-Length: 5\r\n\r\n[1,2]",
        ]
        for data in requests:
            sock = socket.create_connection(("127.0.0.1", port), timeout=10)
            try:
                sock.sendall(data)
                self.assertTrue(sock.recv(65536).startswith(b"HTTP/1.1 "))
            finally:
                sock.close()
        wait_until(lambda: self.process_log(process).count('"') >= 2 * len(requests),
                   message="an access-log line per request")
        self.assertEqual(self.terminate(process), 0)
        self.assertNotIn("S3CRET", self.process_log(process))

    def test_text_logs_and_cli_tables_escape_control_characters(self):
        self.write_handler("all.sh", "#!/bin/sh\nprintf 'out\\033[2J\\r2099-01-01 00:00:00,000 INFO forged\\n'\n")
        process, port = self.start_process()
        status, reply = self.post(port, {"event": "x\x1b[31m\r\n7 2099-01-01 00:00:00  -  message done",
                                         "chat_id": "c\x1bd"})
        self.assertEqual(status, 200, reply)
        self.wait_status(reply["id"], "done")
        self.assertEqual(self.terminate(process), 0)
        log = self.process_log(process)
        self.assertIn("all.sh | out\\x1b[2J", log)
        for line in log.splitlines():
            self.assertNotRegex(line, r"[\x00-\x08\x0b-\x1f\x7f]", line)
            self.assertFalse(line.startswith("2099"), line)
        for command in (["events"], ["stats"]):
            result = self.run_cli(*command, "--db", self.db)
            self.assertEqual(result.returncode, 0, result.stderr)
            self.assertNotRegex(result.stdout, r"[\x00-\x08\x0b-\x1f\x7f]")
            self.assertNotRegex(result.stdout, r"(?m)^7 2099")


class StuckLaneTest(WabhookTestCase):
    def test_healthz_is_503_while_a_delivery_runs_past_the_script_timeout_and_its_lease(self):
        server = self.start_server(script_timeout=1.0)
        event_id = self.post(server, {"event": "typing", "chat_id": "c1"})[1]["id"]
        connection = sqlite3.connect(self.db, isolation_level=None, timeout=10)
        try:  # as a process whose outcome never reached the file leaves it
            connection.execute("INSERT INTO deliveries (event_id, handler, lane, status, attempts, lease_owner,"
                               " lease_until, updated_at) VALUES (?, 'typing.py', 'l', 'running', 1, 'elsewhere:1:x',"
                               " ?, ?)", (event_id, time.time() + 600, time.time() - 3600))
        finally:
            connection.close()
        status, _headers, data = self.request(server, "GET", "/healthz")
        self.assertEqual((status, json.loads(data)["status"], json.loads(data)["stuck"]), (503, "stuck", 1))
        self.query("SELECT 1")  # nothing else is broken: the inbox reads and writes
        self.assertEqual(self.post(server, {"event": "typing", "chat_id": "c2"})[0], 200)
