"""Run the suite's test classes in worker processes, and report every test in this one.

`python -m unittest` discovers tests/ through load_tests() in tests/__init__.py,
which hands the tests to ParallelSuite. Most of a test's time is spent waiting
(for a handler, a subprocess, a timeout), so a few workers finish sooner than
one process. Each worker (`python -m tests.parallel`) runs whole classes, in
file order, and sends back each test's outcomes; this process replays them into
the runner's result, so the dots, the FAIL/ERROR reports and the summary line
are unittest's own. A failure's report is the worker's traceback, as text.

UNITTEST_WORKERS=1 runs the suite in this process, as plain unittest does.
"""

import collections
import itertools
import json
import os
import queue
import subprocess
import sys
import threading
import time
import unittest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def worker_count():
    """UNITTEST_WORKERS if set, else one more than the cores, at least three: the tests mostly
    wait (on servers, subprocesses, timeouts), so a core serves more than one worker."""
    return int(os.environ.get("UNITTEST_WORKERS") or max(3, (os.cpu_count() or 1) + 1))


class WorkerError(Exception):
    """An error as the worker printed it: its traceback, as text."""


class WorkerFailure(AssertionError):
    """A failure as the worker printed it: its traceback, as text."""


class Remote:
    """What the runner needs of a subtest, or of a class or module fixture, reported by a worker."""

    failureException = WorkerFailure

    def __init__(self, description):
        self.description = description

    def id(self):
        return self.description

    def shortDescription(self):
        return None

    def __str__(self):
        return self.description


def _tests(suite):
    for item in suite:
        if isinstance(item, unittest.TestSuite):
            yield from _tests(item)
        else:
            yield item


class ParallelSuite(unittest.TestSuite):
    """The discovered tests, run class by class in `workers` processes."""

    def __init__(self, tests, workers):
        super().__init__(tests)
        self.workers = workers

    def run(self, result, debug=False):
        local, classes = [], collections.OrderedDict()
        for test in _tests(self):
            if type(test).__module__.startswith("unittest."):  # a module that failed to import
                local.append(test)
            else:
                classes.setdefault(test.id().rpartition(".")[0], []).append(test)
        for test in local:
            test(result)
        by_id = {test.id(): test for group in classes.values() for test in group}
        todo = collections.deque(classes.values())
        events, numbers, workers = queue.Queue(), itertools.count(), {}
        try:
            for number in itertools.islice(numbers, min(self.workers, len(todo))):
                workers[number] = _Worker(number, events, result)
            while workers:
                number, message = events.get()
                worker = workers[number]
                if message is None:  # the worker's process ended
                    worker.died(result)
                    del workers[number]
                    if todo and not result.shouldStop:
                        number = next(numbers)
                        workers[number] = _Worker(number, events, result)
                elif message["op"] == "test":
                    test = by_id.get(message["id"]) or Remote(message["id"])
                    worker.replay(result, test, message)
                elif message["op"] == "fixture":  # its --buffer output is in the text already
                    buffer, result.buffer = result.buffer, False
                    try:
                        _apply(result, Remote(message["description"]), message["outcome"])
                    finally:
                        result.buffer = buffer
                elif message["op"] == "ready":
                    worker.send(todo.popleft() if todo and not result.shouldStop else None)
        finally:
            for worker in workers.values():
                worker.kill()
        return result


class _Worker:
    """One `python -m tests.parallel` process, and the thread that reads what it reports."""

    def __init__(self, number, events, result):
        from_parent, to_worker = os.pipe()
        from_worker, to_parent = os.pipe()
        options = json.dumps({"buffer": bool(result.buffer),
                              "tb_locals": bool(getattr(result, "tb_locals", False))})
        self.process = subprocess.Popen(
            [sys.executable, "-m", "tests.parallel", str(from_parent), str(to_parent), options],
            cwd=ROOT, pass_fds=(from_parent, to_parent))
        os.close(from_parent)
        os.close(to_parent)
        self.commands = os.fdopen(to_worker, "w", buffering=1)
        self.group, self.reported = [], set()
        reports = os.fdopen(from_worker, "r")

        def read():
            with reports:
                for line in reports:
                    events.put((number, json.loads(line)))
            events.put((number, None))
        threading.Thread(target=read, daemon=True).start()

    def send(self, group):
        self.group, self.reported = group or [], set()
        try:
            self.commands.write(json.dumps([test.id() for test in group] if group else None) + "\n")
        except OSError:
            pass  # it died: its reader says so next

    def replay(self, result, test, message):
        self.reported.add(test.id())
        result.startTest(test)
        for outcome in message["outcomes"]:
            if outcome.get("subtest"):
                _apply(result, Remote(outcome["subtest"]), outcome, parent=test)
            else:
                _apply(result, test, outcome)
        if hasattr(result, "addDuration"):  # Python 3.12+: --durations
            result.addDuration(test, message["seconds"])
        result.stopTest(test)

    def died(self, result):
        code = self.process.wait()
        for test in self.group:
            if test.id() not in self.reported:
                result.startTest(test)
                why = "the worker running this class exited (status %s) before reporting this test"
                _apply(result, test, {"kind": "error", "text": why % code})
                result.stopTest(test)
        self.commands.close()

    def kill(self):
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()
        self.commands.close()


def _apply(result, test, outcome, parent=None):
    kind, text = outcome["kind"], outcome.get("text")
    err = None
    if text is not None:
        exception = WorkerFailure if kind == "failure" else WorkerError
        err = (exception, exception(text.rstrip("\n")), None)
    if parent is not None:
        result.addSubTest(parent, test, err)
    elif kind == "success":
        result.addSuccess(test)
    elif kind == "failure":
        result.addFailure(test, err)
    elif kind == "error":
        result.addError(test, err)
    elif kind == "skip":
        result.addSkip(test, outcome["reason"])
    elif kind == "expected_failure":
        result.addExpectedFailure(test, err)
    elif kind == "unexpected_success":
        result.addUnexpectedSuccess(test)


# -- the worker ---------------------------------------------------------------

class _Reporter(unittest.TestResult):
    """Sends each test's outcomes to the parent when the test ends."""

    def __init__(self, out, buffer, tb_locals):
        super().__init__()
        self.out, self.buffer, self.tb_locals = out, buffer, tb_locals
        self.current, self.outcomes, self.started = None, [], 0.0

    def startTest(self, test):
        super().startTest(test)
        self.current, self.outcomes, self.started = test, [], time.monotonic()

    def stopTest(self, test):
        seconds = time.monotonic() - self.started
        super().stopTest(test)  # the captured output (--buffer) is in the texts already
        self._send(op="test", id=test.id(), outcomes=self.outcomes, seconds=seconds)
        self.current = None

    def _outcome(self, test, kind, err=None, **fields):
        if err is not None:
            fields["text"] = self._exc_info_to_string(err, test)
        fields["kind"] = kind
        if test is self.current:
            self.outcomes.append(fields)
        else:  # setUpClass, tearDownModule and such
            self._send(op="fixture", description=str(test), outcome=fields)

    def _send(self, **message):
        self.out.write(json.dumps(message) + "\n")

    def addSuccess(self, test):
        self._outcome(test, "success")

    def addFailure(self, test, err):
        self._outcome(test, "failure", err)

    def addError(self, test, err):
        self._outcome(test, "error", err)

    def addSkip(self, test, reason):
        self._outcome(test, "skip", reason=reason)

    def addExpectedFailure(self, test, err):
        self._outcome(test, "expected_failure", err)

    def addUnexpectedSuccess(self, test):
        self._outcome(test, "unexpected_success")

    def addSubTest(self, test, subtest, err):
        if err is not None:
            failed = issubclass(err[0], test.failureException)
            self.outcomes.append({"subtest": str(subtest), "kind": "failure" if failed else "error",
                                  "text": self._exc_info_to_string(err, subtest)})


def work(from_parent, to_parent, options):
    """Run the classes the parent sends (lists of test ids) until it sends null."""
    for fd in (from_parent, to_parent):
        os.set_inheritable(fd, False)  # a test's subprocesses must not hold the pipes open
    options = json.loads(options)
    loader = unittest.TestLoader()
    with os.fdopen(from_parent, "r") as commands, os.fdopen(to_parent, "w", buffering=1) as out:
        reporter = _Reporter(out, options["buffer"], options["tb_locals"])
        reporter._send(op="ready")
        for line in commands:
            ids = json.loads(line)
            if ids is None:
                return
            loader.loadTestsFromNames(ids).run(reporter)
            reporter._send(op="ready")


if __name__ == "__main__":
    work(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])
