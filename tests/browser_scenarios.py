"""Drives wabhook's inbox page in headless Chromium (Selenium); run by tests/test_browser.py.

Not a unittest module: it runs under a Python that has selenium (BROWSER_TEST_PYTHON), against a
server the test started and filled, and prints one JSON object on stdout:

    {"scenarios": [{"name": ..., "ok": true|false, "detail": "...", "seconds": 0.4}, ...],
     "screenshots": [paths], "console": [SEVERE browser log entries after the token was given]}

    python tests/browser_scenarios.py --check        # exit 0 when selenium, chromium and chromedriver are here
    python tests/browser_scenarios.py URL TOKEN --done-id 1 --dead-ids 2,3 --xss-id 4 \
        --post-body '{"event": "connected", ...}' [--screenshots DIR]

Every wait has a deadline; nothing sleeps a fixed time except between polls of a condition.
"""

import argparse
import json
import os
import shutil
import sys
import time
import traceback
import urllib.request

try:
    from selenium import webdriver
    from selenium.common.exceptions import NoAlertPresentException, WebDriverException
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select
except ImportError as exc:  # reported by --check; the test skips
    webdriver = None
    IMPORT_ERROR = str(exc)

BROWSERS = ("chromium", "chromium-browser", "google-chrome")
XSS = "<img src=x onerror=alert(1)>"


class ScenarioFailed(AssertionError):
    pass


def tools():
    """(chromium path, chromedriver path, why not) for this machine."""
    if webdriver is None:
        return None, None, "selenium is not importable by %s (%s)" % (sys.executable, IMPORT_ERROR)
    browser = next((shutil.which(name) for name in BROWSERS if shutil.which(name)), None)
    if not browser:
        return None, None, "no chromium on PATH (apt-get install chromium)"
    driver = shutil.which("chromedriver")
    if not driver:
        return None, None, "no chromedriver on PATH (apt-get install chromium-driver)"
    return browser, driver, ""


def start_browser(browser, driver_path):
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    # As root in a container: no sandbox, and /dev/shm is often tiny.
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                     "--window-size=1280,900", "--force-device-scale-factor=1", "--no-first-run",
                     "--disable-extensions", "--lang=en-US"):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    # Leave an alert open instead of auto-dismissing it, so the XSS check can see it.
    options.set_capability("unhandledPromptBehavior", "ignore")
    driver = webdriver.Chrome(options=options, service=Service(driver_path))
    driver.set_page_load_timeout(10)
    driver.set_script_timeout(5)
    return driver


def wait_for(predicate, timeout, what):
    """Poll `predicate` (exceptions count as not yet) until truthy; ScenarioFailed after `timeout`."""
    deadline = time.monotonic() + timeout
    last_error = None
    while True:
        try:
            value = predicate()
            if value:
                return value
        except WebDriverException as exc:  # e.g. a row redrawn between find and read
            last_error = exc
        if time.monotonic() > deadline:
            raise ScenarioFailed("timed out after %.1f s waiting for %s%s" % (
                timeout, what, " (last error: %s)" % str(last_error).splitlines()[0] if last_error else ""))
        time.sleep(0.05)


class Run:
    def __init__(self, args, driver):
        self.args, self.driver = args, driver
        self.results, self.screenshots, self.console = [], [], []

    # -- helpers ----------------------------------------------------------------

    def css(self, selector):
        return self.driver.find_elements(By.CSS_SELECTOR, selector)

    def shown(self, selector):
        found = self.css(selector)
        return found[0] if found and found[0].is_displayed() else None

    def text(self, selector):
        """The innerText of the first match, or None, read in one step (the poll may redraw it any time)."""
        return self.driver.execute_script(
            "const node = document.querySelector(arguments[0]); return node ? node.innerText : null", selector)

    def row(self, event_id):
        found = self.css('#events tbody tr[data-id="%d"]' % event_id)
        return found[0] if found else None

    def row_status(self, event_id):
        return self.driver.execute_script(
            "const row = document.querySelector('#events tbody tr[data-id=\"' + arguments[0] + '\"]');"
            " return row ? row.dataset.status : null", event_id)

    def listed_ids(self):
        return self.driver.execute_script(
            "return Array.from(document.querySelectorAll('#events tbody tr'), (row) => row.dataset.id)")

    def click(self, selector, timeout=5):
        """Click the element once it is shown; a row redrawn by the poll in between is found again."""
        def find_and_click():
            element = self.shown(selector)
            if element:
                element.click()
                return True
        wait_for(find_and_click, timeout, "%s to click" % selector)

    def severe(self):
        """SEVERE browser log entries since the last call (Chrome hands each entry out once); kept in console."""
        entries = [entry["message"] for entry in self.driver.get_log("browser") if entry["level"] == "SEVERE"]
        self.console.extend(entries)
        return entries

    def screenshot(self, name, element=None):
        if not self.args.screenshots:
            return
        path = os.path.join(self.args.screenshots, name)
        if element is not None:
            element.screenshot(path)
        else:
            self.driver.save_screenshot(path)
        self.screenshots.append(path)

    def set_status_filter(self, status):
        Select(self.driver.find_element(By.ID, "filter-status")).select_by_value(status)

    def post(self, body):
        request = urllib.request.Request(self.args.url.rstrip("/") + "/hook", data=body.encode("utf-8"),
                                         headers={"Content-Type": "application/json",
                                                  "Authorization": "Bearer " + self.args.token})
        with urllib.request.urlopen(request, timeout=5) as response:
            return json.loads(response.read().decode("utf-8"))["id"]

    def scenario(self, name, function):
        started = time.monotonic()
        try:
            detail = function() or ""
            ok = True
        except Exception as exc:  # one failed scenario is reported; the others still run
            ok, detail = False, "%s: %s" % (type(exc).__name__, str(exc).split("Stacktrace:")[0].strip())
            if not isinstance(exc, ScenarioFailed):
                detail += "\n" + traceback.format_exc(limit=3)
        self.results.append({"name": name, "ok": ok, "detail": detail,
                             "seconds": round(time.monotonic() - started, 2)})
        return ok

    # -- the scenarios, in the order they run ------------------------------------

    def refuses_without_token(self):
        self.driver.get(self.args.url)
        try:
            wait_for(lambda: self.shown("#token-form"), 5, "the token form")
        except ScenarioFailed as exc:
            page = self.driver.execute_script("return document.title + ' | ' + document.body.innerText.slice(0, 300)")
            raise ScenarioFailed("%s; GET %s shows %r; console: %r" % (exc, self.args.url, page,
                                                                       self.driver.get_log("browser")))
        if self.shown("#app"):
            raise ScenarioFailed("the inbox is shown next to the token form")
        message = self.driver.find_element(By.ID, "token-message").text
        entries = [entry["message"] for entry in self.driver.get_log("browser") if entry["level"] == "SEVERE"]
        refused = [entry for entry in entries if "/api/" in entry and "401" in entry]
        others = [entry for entry in entries if entry not in refused]
        if not refused:
            raise ScenarioFailed("no 401 from /api/ in the browser log: %r" % entries)
        if others:
            raise ScenarioFailed("console errors besides the 401: %r" % others)
        return "form shown (%r); browser saw %s" % (message, refused[0])

    def token_opens_inbox(self):
        field = self.driver.find_element(By.ID, "token-input")
        field.send_keys(self.args.token)
        self.driver.find_element(By.CSS_SELECTOR, "#token-form button[type=submit]").click()
        wait_for(lambda: self.row(self.args.done_id), 5, "event %d in the list" % self.args.done_id)
        stored = self.driver.execute_script("return sessionStorage.getItem('wabhook-token')")
        if stored != self.args.token:
            raise ScenarioFailed("sessionStorage['wabhook-token'] is %r" % stored)
        cookies = self.driver.get_cookies()
        if cookies:
            raise ScenarioFailed("the page set cookies: %r" % cookies)
        return "the token opened the inbox and is kept in sessionStorage only"

    def loads_without_console_errors(self):
        self.driver.get_log("browser")  # drops the tokenless load's 401s: from here on, SEVERE is a failure
        self.driver.refresh()
        wait_for(lambda: self.shown("#app") and self.row(self.args.done_id), 5, "the inbox after a reload")
        if self.shown("#token-form"):
            raise ScenarioFailed("the token form is shown again after a reload")
        # Two poll rounds after the load, so errors of the polling itself show too.
        first = self.driver.find_element(By.ID, "status").text
        wait_for(lambda: self.driver.find_element(By.ID, "status").text != first, 3, "a poll round")
        errors = self.severe()
        if errors:
            raise ScenarioFailed("SEVERE console entries: %r" % errors)
        return "reloaded with the stored token; no SEVERE console entries"

    def counters(self):
        def read():
            text = self.text("#count-received") or ""
            return text if text.isdigit() and int(text) >= self.args.min_received else None
        received = wait_for(read, 3, "count-received >= %d" % self.args.min_received)
        handler_row = self.text('#handlers tbody tr[data-handler="message.py"]')
        if handler_row is None:
            raise ScenarioFailed("no per-handler row for message.py")
        dead = self.text("#count-dead")
        self.driver.execute_script("window.scrollTo(0, 0)")
        self.screenshot("inbox.png")
        return "received %s, dead %s, message.py: %s" % (received, dead, " ".join(handler_row.split()))

    def posted_event_shows_within_2s(self):
        event_id = self.post(self.args.post_body)
        posted = time.monotonic()
        wait_for(lambda: self.row(event_id), 2.0, "posted event %d in the list" % event_id)
        return "event %d listed %.2f s after its 200" % (event_id, time.monotonic() - posted)

    def shows_body(self):
        event_id = self.args.done_id
        self.click('#events button[data-action="open"][data-id="%d"]' % event_id)
        wait_for(lambda: self.shown('#detail[data-id="%d"]' % event_id), 5, "the detail of event %d" % event_id)
        text = wait_for(lambda: self.text("#detail-body"), 3, "the body")
        if self.args.body_text not in text:
            raise ScenarioFailed("%r is not in the body shown: %r" % (self.args.body_text, text))
        if '\n  "event": "message"' not in text:
            raise ScenarioFailed("the body is not pretty-printed: %r" % text)
        delivery = self.text('#deliveries tbody tr[data-handler="message.py"]')
        if delivery is None:
            raise ScenarioFailed("no delivery row for message.py")
        self.screenshot("event.png", self.driver.find_element(By.ID, "detail"))
        return "body shown, delivery: %s" % " ".join(delivery.split())

    def dead_letters_show_buttons(self):
        self.click("#detail-close")
        self.set_status_filter("dead")
        for event_id in self.args.dead_ids:
            for action in ("replay", "discard"):
                wait_for(lambda: self.shown('#events tr[data-id="%d"] button[data-action="%s"]' % (event_id, action)),
                         3, "a %s button on dead event %d" % (action, event_id))
        listed = self.listed_ids()
        self.driver.execute_script("window.scrollTo(0, 0)")
        self.screenshot("dead-letters.png")
        return "dead letters listed: %s" % ", ".join(listed)

    def discard_sets_discarded(self):
        event_id = self.args.dead_ids[1]
        self.click('#events tr[data-id="%d"] button[data-action="discard"]' % event_id)
        wait_for(lambda: self.row(event_id) is None, 3, "event %d to leave the dead letters" % event_id)
        self.set_status_filter("")
        wait_for(lambda: self.row_status(event_id) == "discarded", 3, "event %d listed as discarded" % event_id)
        return "event %d is discarded" % event_id

    def replay_runs_handler_again(self):
        event_id = self.args.dead_ids[0]
        self.set_status_filter("dead")
        self.click('#events tr[data-id="%d"] button[data-action="replay"]' % event_id)
        self.set_status_filter("")
        wait_for(lambda: self.row_status(event_id) == "done", 10, "event %d listed as done" % event_id)
        self.click('#events button[data-action="open"][data-id="%d"]' % event_id)
        row = wait_for(lambda: self.text('#detail[data-id="%d"] #deliveries tr[data-handler="message.py"]'
                                         '[data-status="done"]' % event_id), 3, "message.py done in the detail")
        return "event %d done after replay: %s" % (event_id, " ".join(row.split()))

    def xss_body_stays_text(self):
        event_id = self.args.xss_id
        self.click('#events button[data-action="open"][data-id="%d"]' % event_id)
        wait_for(lambda: self.shown('#detail[data-id="%d"]' % event_id), 5, "the XSS event's detail")
        try:
            wait_for(lambda: XSS in (self.text("#detail-body") or ""), 3, "the payload as text")
        except ScenarioFailed as exc:
            images = self.driver.execute_script("return Array.from(document.images, (image) => image.outerHTML)")
            raise ScenarioFailed("%s: the body shows %r; <img> elements: %r" % (exc, self.text("#detail-body"), images))
        preview = self.text('#events tbody tr[data-id="%d"] td.preview' % event_id) or ""
        if XSS not in preview:
            raise ScenarioFailed("the list's body column does not show the payload as text: %r" % preview)
        try:
            alert = self.driver.switch_to.alert
            raise ScenarioFailed("an alert opened: %r" % alert.text)
        except NoAlertPresentException:
            pass
        images = self.driver.execute_script("return Array.from(document.images, (image) => image.outerHTML)")
        if images:
            raise ScenarioFailed("the page has <img> elements: %r" % images)
        return "payload shown as text in the detail and the list; no alert, no <img>"

    def no_console_errors(self):
        self.severe()
        if self.console:
            raise ScenarioFailed("SEVERE console entries: %r" % self.console)
        return "no SEVERE console entries since the token was given"

    def run(self):
        if not self.scenario("refuses_without_token", self.refuses_without_token):
            return
        if not self.scenario("token_opens_inbox", self.token_opens_inbox):
            return
        if not self.scenario("loads_without_console_errors", self.loads_without_console_errors):
            return
        self.scenario("posted_event_shows_within_2s", self.posted_event_shows_within_2s)
        self.scenario("counters", self.counters)
        self.scenario("shows_body", self.shows_body)
        if self.scenario("dead_letters_show_buttons", self.dead_letters_show_buttons):
            self.scenario("discard_sets_discarded", self.discard_sets_discarded)
            self.scenario("replay_runs_handler_again", self.replay_runs_handler_again)
        self.scenario("xss_body_stays_text", self.xss_body_stays_text)
        self.scenario("no_console_errors", self.no_console_errors)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only report whether selenium and chromium are here")
    parser.add_argument("url", nargs="?")
    parser.add_argument("token", nargs="?")
    parser.add_argument("--done-id", type=int, help="a handled message event (its body is checked)")
    parser.add_argument("--body-text", default="Hello!", help="text that event's body shows")
    parser.add_argument("--dead-ids", type=lambda text: [int(part) for part in text.split(",")],
                        help="two dead events: the first is replayed, the second discarded")
    parser.add_argument("--xss-id", type=int, help="an event whose body holds " + XSS)
    parser.add_argument("--post-body", help="an event to post while the page is open")
    parser.add_argument("--min-received", type=int, default=1)
    parser.add_argument("--screenshots", help="folder for PNG screenshots")
    args = parser.parse_args(argv)
    browser, driver_path, why_not = tools()
    if args.check:
        print(json.dumps({"ok": not why_not, "reason": why_not, "browser": browser, "driver": driver_path}))
        return 0 if not why_not else 3
    if why_not:
        print(json.dumps({"error": why_not}))
        return 3
    if not (args.url and args.token and args.done_id and args.dead_ids and len(args.dead_ids) == 2
            and args.xss_id and args.post_body):
        parser.error("URL, TOKEN, --done-id, --dead-ids A,B, --xss-id and --post-body are required")
    driver = start_browser(browser, driver_path)
    run = Run(args, driver)
    try:
        run.run()
    finally:
        try:
            driver.quit()
        finally:
            print(json.dumps({"scenarios": run.results, "screenshots": run.screenshots, "console": run.console}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
