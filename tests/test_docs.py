"""README.md documents what the program does: every flag, env var, command, endpoint, status and metric.

Like sqlite-utils' tests/test_docs.py: the names come from the program
(`--help`, wabhook.OPTIONS, the HTTP error classes, a /metrics scrape), and each
must appear in the README's Reference (or where the SPEC puts it).
"""

import json
import os
import re
import shlex
import shutil
import subprocess
import sys

from tests.support import ROOT, SCRIPT, WabhookTestCase, wait_until

import wabhook

README = os.path.join(ROOT, "README.md")

# SPEC §2 "Status codes": 200 accepted or duplicate; 400 bad JSON / not an object / missing event;
# 401 bad or missing token; 404 unknown path or bad bridge label; 405 wrong method; 411 no length;
# 413 body over --max-body; 503 the inbox cannot commit.
SPEC_STATUS_CODES = (200, 400, 401, 404, 405, 411, 413, 503)
FLAG = re.compile(r"(?<![\w-])(--[a-z][a-z-]*[a-z])")


def read_readme():
    with open(README, encoding="utf-8") as handle:
        return handle.read()


def headings(text):
    """[(level, title, line index)] of the Markdown headings outside fenced code blocks."""
    found, fenced = [], False
    for index, line in enumerate(text.splitlines()):
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced:
            match = re.match(r"(#{1,6}) (.+)", line)
            if match:
                found.append((len(match.group(1)), match.group(2).strip(), index))
    return found


def section(text, title):
    """The text under the heading `title`, up to the next heading of the same or a higher level."""
    lines = text.splitlines()
    marks = headings(text)
    for position, (level, heading, index) in enumerate(marks):
        if heading == title:
            end = next((i for lvl, _t, i in marks[position + 1:] if lvl <= level), len(lines))
            return "\n".join(lines[index + 1:end])
    raise AssertionError("README.md has no section %r" % title)


def code_blocks(text):
    """The README's code blocks in order (fenced or indented by four spaces), as lists of lines."""
    blocks, current, fenced, previous_blank = [], None, False, True
    for line in text.splitlines():
        if fenced:
            if line.startswith("```"):
                blocks.append(current)
                current, fenced = None, False
            else:
                current.append(line)
            continue
        if line.startswith("```"):
            if current is not None:
                blocks.append(current)
            current, fenced = [], True
        elif line.startswith("    ") and (current is not None or previous_blank):
            current = (current or []) + [line[4:]]
        elif current is not None and not line.strip():
            current.append("")
        elif current is not None:
            blocks.append(current)
            current = None
        previous_blank = not line.strip()
    if current is not None:
        blocks.append(current)
    return [[line for line in block if line.strip()] for block in blocks if any(line.strip() for line in block)]


def table_rows(text):
    """Rows of the Markdown tables in `text`: lists of cell texts (header and separator rows included)."""
    rows = []
    for line in text.splitlines():
        if line.startswith("|") and line.rstrip().endswith("|"):
            cells = re.split(r"(?<!\\)\|", line.strip()[1:-1])
            rows.append([cell.strip() for cell in cells])
    return rows


def help_texts(commands):
    """`python wabhook.py COMMAND --help` for each command, run at once."""
    processes = [subprocess.Popen([sys.executable, SCRIPT, command, "--help"], stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True, cwd=ROOT) for command in commands]
    texts = {}
    for command, process in zip(commands, processes):
        stdout, stderr = process.communicate(timeout=60)
        assert process.returncode == 0, stderr
        texts[command] = stdout
    return texts


class ReadmeTest(WabhookTestCase):
    def setUp(self):
        super().setUp()
        self.readme = read_readme()
        self.reference = section(self.readme, "Reference")

    def test_readme_opens_with_the_run_and_test_commands(self):
        blocks = code_blocks(self.readme)
        self.assertEqual(blocks[:2], [["python3 wabhook.py --port 3000"], ["python3 -m unittest"]])
        first_code = self.readme.index("python3 wabhook.py --port 3000")
        self.assertLess(first_code, self.readme.index("## Writing handlers"))

    def test_sections_come_in_the_order_the_spec_gives(self):
        titles = [title for level, title, _index in headings(self.readme) if level == 2]
        order = [titles.index(title) for title in ("The two commands", "Writing handlers", "Deploying", "Reference")]
        self.assertEqual(order, sorted(order), titles)

    def test_every_flag_of_every_command_help_is_in_the_reference(self):
        texts = help_texts(wabhook.COMMANDS)
        serve_flags = set(FLAG.findall(texts["serve"]))
        self.assertIn("--retry-delay", serve_flags)  # the help was read, not an empty text
        for command, text in texts.items():
            for flag in sorted(set(FLAG.findall(text))):
                with self.subTest(command=command, flag=flag):
                    self.assertRegex(self.reference, r"`[^`]*%s\b" % re.escape(flag))
        self.assertIn("`--version`", self.reference)

    def test_every_option_has_a_reference_row_with_its_flag_environment_variable_and_default(self):
        rows = {}
        for cells in table_rows(section(self.readme, "Flags")):
            match = re.match(r"`(--[a-z-]+)", cells[0])
            if match:
                rows[match.group(1)] = cells
        self.assertEqual(sorted(rows), sorted(wabhook.flag_name(option.name) for option in wabhook.OPTIONS))
        for option in wabhook.OPTIONS:
            with self.subTest(option=option.name):
                cells = rows[wabhook.flag_name(option.name)]
                self.assertEqual(cells[1], "`%s`" % wabhook.env_name(option.name))
                if option.default is None:
                    expected = "(none)"
                elif option.default is False:
                    expected = "off"
                else:
                    expected = "`%s`" % option.default
                self.assertEqual(cells[2], expected)
                self.assertTrue(cells[3], "no meaning given")

    def test_every_command_and_endpoint_is_in_the_reference(self):
        commands = section(self.readme, "Commands")
        for command in wabhook.COMMANDS:
            with self.subTest(command=command):
                self.assertRegex(commands, r"\| `(python3 wabhook\.py \[flags\]`, `)?%s\b" % command)
        endpoints = section(self.readme, "Endpoints")
        for endpoint, method in (("/hook", "POST"), ("/hook/<bridge>", "POST"), ("/healthz", "GET, HEAD"),
                                 ("/metrics", "GET, HEAD")):
            with self.subTest(endpoint=endpoint):
                self.assertRegex(endpoints, r"\| `%s`[^|]*\| %s \|" % (re.escape(endpoint), method))

    def test_every_spec_status_code_and_error_code_is_documented_with_its_status(self):
        rows = {cells[0]: cells for cells in table_rows(section(self.readme, "Status codes"))}
        for status in SPEC_STATUS_CODES:
            with self.subTest(status=status):
                self.assertIn(str(status), rows)
        with open(SCRIPT, encoding="utf-8") as handle:
            source = handle.read()
        raised = set()
        for class_name, code in re.findall(r"\b([A-Z][A-Za-z]+)\(\s*\"([a-z_]+)\"", source):
            error_class = getattr(wabhook, class_name, None)
            if isinstance(error_class, type) and issubclass(error_class, wabhook.HTTPError) \
                    and error_class is not wabhook.HTTPError:
                raised.add((error_class.status, code))
        self.assertIn((400, "bad_json"), raised)
        for status, code in sorted(raised):
            with self.subTest(code=code):
                self.assertIn(str(status), rows)
                self.assertIn("`%s`" % code, rows[str(status)][1])

    def test_every_metric_family_is_documented(self):
        metrics = wabhook.Metrics()
        metrics.event_received("message", False)
        metrics.event_received("message", True)
        metrics.rejected(400)
        metrics.handler_run("message.py", "ok", 0.01)
        metrics.ack(0.001)
        families = re.findall(r"^# TYPE (\S+) (\S+)$", metrics.render({"pending": 0, "dead": 0}), re.M)
        self.assertGreaterEqual(len(families), 8)
        operating = section(self.readme, "Health and metrics")
        for name, kind in families:
            with self.subTest(metric=name):
                self.assertIn(name, operating)
                row = [cells for cells in table_rows(operating) if name in cells[0]]
                if name != "wabhook_info":
                    self.assertTrue(row, "no table row for %s" % name)
                    self.assertEqual(row[0][1], kind)

    def test_healthz_fields_are_the_documented_ones(self):
        server = self.start_server()
        status, _headers, data = self.request(server, "GET", "/healthz")
        self.assertEqual(status, 200)
        fields = set(json.loads(data))
        [row] = [cells for cells in table_rows(section(self.readme, "Endpoints")) if cells[0] == "`/healthz`"]
        documented = set(re.findall(r'"(\w+)"', row[3])) - {"ok"}
        self.assertEqual(fields, documented)


TIME = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d(,\d{3})?")


def masked_log(lines):
    """Log lines with what differs between runs (time, port, the handlers folder) masked, sorted:
    handlers of different chats may print in either order."""
    masks = ((TIME, "<time>"), (re.compile(r"127\.0\.0\.1:\d+"), "127.0.0.1:<port>"),
             (re.compile(r"\(handlers: [^,]+,"), "(handlers: <folder>,"))
    out = []
    for line in lines:
        for pattern, replacement in masks:
            line = pattern.sub(replacement, line)
        out.append(line)
    return sorted(out)


def command_runs(block):
    """[(command, expected output lines)] of a `$ command` / output code block."""
    runs = []
    for line in block:
        if line.startswith("$ "):
            runs.append((line[2:], []))
        else:
            runs[-1][1].append(line)
    return runs


class ReadmeWalkThroughTest(WabhookTestCase):
    """The README's walk-through, run as a reader runs it: every output and log line it shows."""

    def run_readme_command(self, command, port):
        words = shlex.split(command)
        self.assertEqual(words[:2], ["python3", "wabhook.py"], command)
        result = subprocess.run([sys.executable, SCRIPT] + words[2:], capture_output=True, text=True, timeout=60,
                                cwd=self.tmp, env=dict(os.environ, WABHOOK_PORT=str(port)))
        self.assertEqual(result.returncode, 0, command + "\n" + result.stderr)
        return [TIME.sub("<time>", line) for line in result.stdout.splitlines() if line.strip()]

    def test_the_commands_print_and_the_server_logs_what_the_readme_shows(self):
        readme = read_readme()
        sends, log_block = code_blocks(section(readme, "Trying it with `send`"))
        [inspect] = code_blocks(section(readme, "Inspecting and replaying"))
        shipped = os.path.join(ROOT, "handlers")
        for name in os.listdir(shipped):
            if os.path.isfile(os.path.join(shipped, name)):
                shutil.copy2(os.path.join(shipped, name), self.handlers)  # the exec bit too
        # `python3 wabhook.py --port 3000` in the folder holding handlers/, on a free port.
        process, port = self.start_readme_server()
        try:
            for command, expected in command_runs(sends):
                with self.subTest(command=command):
                    self.assertEqual(self.run_readme_command(command, port), expected)
            expected_log = masked_log(log_block)
            wait_until(lambda: len(self.process_log(process).splitlines()) >= len(expected_log),
                       message="the log lines the README shows")
            wait_until(lambda: self.query("SELECT COUNT(*) FROM events WHERE status = 'done'")[0][0] == 4,
                       message="the four events delivered")
            self.assertEqual(masked_log(self.process_log(process).splitlines()), expected_log)
            for command, expected in command_runs(inspect):
                with self.subTest(command=command):
                    self.assertEqual(self.run_readme_command(command, port),
                                     [TIME.sub("<time>", line) for line in expected])
        finally:
            self.assertEqual(self.terminate(process), 0)

    def start_readme_server(self):
        log_path = os.path.join(self.tmp, "readme-server.log")
        with open(log_path, "wb") as log_file:
            process = subprocess.Popen([sys.executable, SCRIPT, "--port", "0"], stdout=log_file,
                                       stderr=subprocess.STDOUT, cwd=self.tmp)
        process.log_path = log_path
        self.processes.append(process)
        match = wait_until(lambda: re.search(r"listening on http://127\.0\.0\.1:(\d+)", self.process_log(process))
                           or process.poll() is not None and "exited", message="the server to listen")
        self.assertNotEqual(match, "exited", self.process_log(process))
        return process, int(match.group(1))
