"""The operator console in a real browser (headless Chromium through selenium).

Run by scripts/verify/console.sh against a two-replica cluster with API_TOKEN set and
two lanes, default and otp (its DISPATCH_CONFIG); the page is loaded from the follower. --database-url is used once, to set a dispatch
pause in PostgreSQL as the leader does when the provider refuses our credentials. Every check waits for a final state with a
generous bound (WebDriverWait), never for a fixed time. Screenshots of each step go
to --screenshots.
"""

import argparse
import base64
import json
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request

from selenium import webdriver
from selenium.common.exceptions import StaleElementReferenceException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import Select, WebDriverWait

WAIT = 30  # seconds: generous; the page refreshes every ~2 s


class Api:
    """The public API of one replica, with the token."""

    def __init__(self, base, token):
        self.base, self.token = base, token

    def call(self, method, path, body=None):
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.base + path, data=data, method=method)
        request.add_header("Authorization", "Bearer " + self.token)
        if data is not None:
            request.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return response.status, json.loads(response.read() or b"null")
        except urllib.error.HTTPError as err:
            return err.code, json.loads(err.read() or b"null")


    def total(self, **query):
        """The number of messages GET /api/messages counts for a filter."""
        status, body = self.call("GET", "/api/messages?" + urllib.parse.urlencode({"limit": 1, **query}))
        assert status == 200, (status, body)
        return body["total"]

    def wait(self, what, condition, timeout=WAIT):
        """Polls condition() until it is truthy; fails naming `what`."""
        deadline = time.monotonic() + timeout
        while True:
            value = condition()
            if value:
                return value
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout}s waiting for: {what}")
            time.sleep(0.25)


def psql(database_url, sql):
    subprocess.run(["psql", "-X", "-q", "-v", "ON_ERROR_STOP=1", database_url, "-c", sql], check=True)


def browser(width, height):
    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                f"--window-size={width},{height}", "--hide-scrollbars", "--force-device-scale-factor=1"):
        options.add_argument(arg)
    return webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)


class Console:
    def __init__(self, driver, shots):
        self.d, self.shots, self.step = driver, shots, 0

    def wait(self, what, condition, timeout=WAIT):
        """Waits until condition(driver) is truthy; fails naming `what`."""
        def check(d):
            try:
                return condition(d)
            except StaleElementReferenceException:
                return False  # the page re-rendered under us; look again
        try:
            return WebDriverWait(self.d, timeout, poll_frequency=0.2).until(check)
        except Exception:
            self.shot("FAILED-" + what.replace(" ", "-")[:40])
            raise AssertionError(f"timed out after {timeout}s waiting for: {what}")

    def text(self, element_id):
        return self.d.find_element(By.ID, element_id).text

    def shot(self, name):
        """A screenshot of the whole page (beyond the window) at the window's width."""
        self.step += 1
        path = f"{self.shots}/{self.step:02d}-{name}.png"
        image = self.d.execute_cdp_cmd("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True})
        with open(path, "wb") as out:
            out.write(base64.b64decode(image["data"]))
        print(f"  screenshot {path}")

    def click(self, element_id):
        self.d.find_element(By.ID, element_id).click()

    def confirm(self):
        self.wait("the confirmation dialog", lambda d: d.find_element(By.ID, "confirm").get_attribute("open") is not None)
        self.click("confirm-yes")

    def shown(self, element_id):
        return self.d.find_element(By.ID, element_id).is_displayed()

    def search(self, text):
        """Types into the search box and submits the filter form."""
        box = self.d.find_element(By.ID, "filter-search")
        box.clear()
        box.send_keys(text + "\n")

    def filter_status(self, status):
        Select(self.d.find_element(By.ID, "filter-status")).select_by_value(status)

    def confirm_says(self, title):
        """Waits for the confirmation dialog, checks its title, and confirms."""
        self.wait("the confirmation dialog", lambda d: d.find_element(By.ID, "confirm").get_attribute("open") is not None)
        shown = self.text("confirm-title")
        assert shown == title, f"the confirmation says {shown!r}, not {title!r}"
        self.click("confirm-yes")

    def row(self, message_id):
        rows = self.d.find_elements(By.CSS_SELECTOR, f'#messages tbody tr[data-id="{message_id}"]')
        return rows[0] if rows else None

    def lane(self, name):
        """The lanes table's row of lane `name` (a <tr data-lane>), or None."""
        rows = self.d.find_elements(By.CSS_SELECTOR, f'#lanes tbody tr[data-lane="{name}"]')
        return rows[0] if rows else None

    def lane_cell(self, name, cell):
        return self.lane(name).find_element(By.CSS_SELECTOR, f"td.lane-{cell}").text

    def lane_state(self, name):
        """The state cell's badge (its first line; a lane with a spend cap says its
        day's spend below)."""
        return self.lane_cell(name, "state").split("\n")[0]

    def listed(self):
        """The message list on screen: [(id, lane), ...]."""
        return [(int(r.get_attribute("data-id")), r.get_attribute("data-lane"))
                for r in self.d.find_elements(By.CSS_SELECTOR, "#messages tbody tr[data-id]")]

    def shot_of(self, name, element_id):
        """A screenshot of one element (all of it, also beyond the window)."""
        self.step += 1
        path = f"{self.shots}/{self.step:02d}-{name}.png"
        x, y, width, height = self.d.execute_script(
            "const r = document.getElementById(arguments[0]).getBoundingClientRect();"
            "return [r.left + window.scrollX, r.top + window.scrollY, r.width, r.height];", element_id)
        image = self.d.execute_cdp_cmd("Page.captureScreenshot", {
            "format": "png", "captureBeyondViewport": True,
            "clip": {"x": x, "y": y, "width": width, "height": height, "scale": 1}})
        with open(path, "wb") as out:
            out.write(base64.b64decode(image["data"]))
        print(f"  screenshot {path}")

    def fits(self, element_id):
        """How far the element's content overflows its box sideways (<= 0: it fits)."""
        return self.d.execute_script(
            "const e = document.getElementById(arguments[0]); return e.scrollWidth - e.parentElement.clientWidth;",
            element_id)


def check(name):
    print(f"PASS: {name}")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--leader", required=True)
    parser.add_argument("--follower", required=True)
    parser.add_argument("--token", required=True)
    parser.add_argument("--screenshots", required=True)
    parser.add_argument("--database-url", required=True, help="to set a dispatch pause as the leader would")
    args = parser.parse_args()
    leader, follower = Api(args.leader, args.token), Api(args.follower, args.token)
    started = time.monotonic()

    driver = browser(1400, 1000)
    page = Console(driver, args.screenshots)
    try:
        # 1. API_TOKEN is set: the page says so, refuses a wrong token, takes the right one.
        driver.get(args.follower + "/")
        page.wait("the redirect to /console/", lambda d: d.current_url.endswith("/console/"))
        page.wait("the token panel", lambda d: d.find_element(By.ID, "token-panel").is_displayed())
        assert not driver.find_element(By.ID, "main").is_displayed(), "data shown without a token"
        assert "API_TOKEN" in page.text("token-panel"), page.text("token-panel")
        page.shot("token-required")
        driver.find_element(By.ID, "token-input").send_keys("wrong-token\n")
        page.wait("the wrong token to be refused",
                  lambda d: "refused" in d.find_element(By.ID, "token-reason").text
                  and d.find_element(By.ID, "token-panel").is_displayed())
        driver.find_element(By.ID, "token-input").send_keys(args.token + "\n")
        page.wait("the page to work with the token", lambda d: d.find_element(By.ID, "main").is_displayed()
                  and "live" in d.find_element(By.ID, "live").text)
        stored = driver.execute_script("return sessionStorage.getItem('message-dispatcher.api-token')")
        assert stored == args.token, "the token is kept in sessionStorage"
        check("with API_TOKEN the page asks for the token, refuses a wrong one, then works")

        # 2. From the follower: the leader's id and both replicas.
        page.wait("the leader's id", lambda d: d.find_element(By.ID, "leader").text == "replica-1")
        page.wait("both replicas listed", lambda d: {
            r.get_attribute("data-replica") for r in d.find_elements(By.CSS_SELECTOR, "#replicas tbody tr")
        } == {"replica-1", "replica-2"})
        roles = {r.get_attribute("data-replica"): r.text for r in driver.find_elements(By.CSS_SELECTOR, "#replicas tbody tr")}
        assert "leader" in roles["replica-1"] and "serves this page" in roles["replica-2"], roles
        assert "replica-2" in page.text("served-by")
        page.wait("the desired state", lambda d: d.find_element(By.ID, "running").text == "running")
        page.wait("a countdown to the next batch", lambda d: d.find_element(By.ID, "countdown").text.startswith("("))
        check("the page from the follower shows leader replica-1 and both replicas")

        # 3. A message created through the API after the page loaded appears by itself.
        status, created = leader.call("POST", "/api/messages",
                                      {"phone_number": "+905551230000", "content": "created after the page loaded"})
        assert status == 201, (status, created)
        page.wait("the new message in the table", lambda d: page.row(created["id"]) is not None, timeout=WAIT)
        assert "created after the page loaded" in page.row(created["id"]).text
        page.wait("the chart's history", lambda d: " 0 sent" not in d.find_element(By.ID, "chart-summary").text
                  and d.find_element(By.ID, "chart-summary").text != "")
        page.wait("the chart drawn", lambda d: d.find_elements(By.CSS_SELECTOR, "#chart canvas"))
        page.wait("delivery statuses", lambda d: d.find_elements(
            By.CSS_SELECTOR, '#messages tbody tr[data-status="sent"] td.delivery[data-delivery="delivered"]'))
        page.shot("cluster-1400px")
        check(f"message {created['id']}, created after load, appeared without a reload")

        # 3b. The lanes (console.sh's DISPATCH_CONFIG: default, and otp counting segments):
        #     one row each, with a leader each, as the API says.
        def lanes_api():
            status, body = leader.call("GET", "/api/lanes")
            assert status == 200, (status, body)
            return {lane["name"]: lane for lane in body["lanes"]}
        page.wait("a row per lane", lambda d: [r.get_attribute("data-lane") for r in d.find_elements(
            By.CSS_SELECTOR, "#lanes tbody tr[data-lane]")] == ["default", "otp"])
        page.wait("a leader for each lane", lambda d: all(
            page.lane(name).get_attribute("data-leader") and "epoch" in page.lane_cell(name, "leader")
            for name in ("default", "otp")))
        lanes = leader.wait("both lanes led, as the page shows", lambda: (lambda lanes: lanes if all(
            lanes[name]["leader"] and lanes[name]["leader"]["replica_id"] == page.lane(name).get_attribute("data-leader")
            for name in ("default", "otp")) else None)(lanes_api()))
        leaders = {name: lanes[name]["leader"]["replica_id"] for name in ("default", "otp")}
        assert leaders["default"] == "replica-1", leaders
        for name in ("default", "otp"):
            assert f"epoch {lanes[name]['leader']['epoch']}" in page.lane_cell(name, "leader"), page.lane_cell(name, "leader")
            assert page.lane_state(name) == "running", page.lane_cell(name, "state")
            assert "mock closed" in page.lane_cell(name, "providers"), page.lane_cell(name, "providers")
            assert "pending" in page.lane_cell(name, "queue"), page.lane_cell(name, "queue")
        assert page.lane_cell("default", "rate").startswith("3.0 / "), page.lane_cell("default", "rate")
        assert page.lane_cell("otp", "rate").startswith("4.0 segments / "), page.lane_cell("otp", "rate")
        assert page.fits("lanes") <= 0, "the lanes table scrolls sideways at 1400 px"
        page.shot_of("lanes-1400px", "lanes-panel")
        check(f"the lanes table shows default (leader {leaders['default']}) and otp (leader {leaders['otp']}), "
              "both running, with rate, queue and providers")

        # 3c. Stop otp from its row: otp stops, default goes on (also through the API).
        page.lane("otp").find_element(By.CSS_SELECTOR, "button.lane-stop").click()
        page.confirm_says("Stop lane otp?")
        page.wait("otp shown stopped", lambda d: page.lane("otp").get_attribute("data-running") == "false"
                  and page.lane_state("otp") == "stopped"
                  and "Lane otp stopped" in page.text("lanes-result"))
        assert page.lane_state("default") == "running", page.lane_cell("default", "state")
        lanes = lanes_api()
        assert lanes["otp"]["running"] is False and lanes["default"]["running"] is True, lanes
        assert leader.call("GET", "/api/messaging/status")[1]["running"] is True, "the default lane (the cluster's) runs"
        assert not page.lane("otp").find_element(By.CSS_SELECTOR, "button.lane-stop").is_enabled()
        # Sent while otp is stopped: default's message goes, otp's wait.
        otp_ids = []
        for n in (1, 2):
            status, body = leader.call("POST", "/api/messages", {
                "phone_number": f"+90555123900{n}", "content": f"otp while stopped {n}", "lane": "otp"})
            assert status == 201 and body["lane"] == "otp", body
            otp_ids.append(body["id"])
        status, sent_default = leader.call("POST", "/api/messages", {
            "phone_number": "+905551239000", "content": "default while otp is stopped"})
        assert status == 201 and sent_default["lane"] == "default", sent_default
        leader.wait("default's message sent", lambda: leader.call(
            "GET", f"/api/messages/{sent_default['id']}")[1]["status"] in ("sent", "failed"), timeout=60)
        for message_id in otp_ids:
            assert leader.call("GET", f"/api/messages/{message_id}")[1]["status"] == "pending", \
                f"otp message {message_id} left pending while otp was stopped"
        page.wait("otp's queue shows them", lambda d: page.lane_cell("otp", "queue").startswith("2 pending"))
        page.shot_of("lane-otp-stopped", "lanes-panel")
        check(f"Stop on otp's row stopped otp only: default sent message {sent_default['id']}, "
              f"otp's {otp_ids} stay pending (the API says otp running=false, default running=true)")

        # 3d. The lane filter: the list narrows to otp's messages, and a bulk action takes
        #     the lane. A default message scheduled for later stays pending beside them.
        status, later = leader.call("POST", "/api/messages", {
            "phone_number": "+905551239003", "content": "default, scheduled for later",
            "send_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + 3600))})
        assert status == 201 and later["lane"] == "default", later
        Select(driver.find_element(By.ID, "filter-lane")).select_by_value("otp")
        page.wait("the list narrowed to otp", lambda d: sorted(page.listed()) == sorted((i, "otp") for i in otp_ids)
                  and d.find_element(By.ID, "page-info").text == "page 1 · 2 matching")
        assert leader.total(lane="otp") == 2
        assert all(r.find_element(By.CSS_SELECTOR, "td.lane").text == "otp"
                   for r in driver.find_elements(By.CSS_SELECTOR, "#messages tbody tr[data-id]"))
        page.shot("lane-filter-otp")
        page.filter_status("pending")
        page.wait("the offer to cancel otp's 2", lambda d: page.shown("bulk-action")
                  and d.find_element(By.ID, "bulk-action").text == "Cancel all 2 pending in lane otp")
        page.click("bulk-action")
        page.confirm_says("Cancel 2 pending messages in lane otp?")
        page.wait("the count cancelled", lambda d: d.find_element(By.ID, "bulk-result").text.startswith(
            "Cancelled 2 pending messages in lane otp"))
        assert leader.total(status="pending", lane="otp") == 0
        assert leader.total(status="cancelled", lane="otp") == 2
        assert leader.call("GET", f"/api/messages/{later['id']}")[1]["status"] == "pending", "default's message was cancelled"
        assert leader.call("POST", f"/api/messages/{later['id']}/cancel")[0] == 200  # step 9 drains the queue
        page.filter_status("")
        Select(driver.find_element(By.ID, "filter-lane")).select_by_value("")
        page.wait("every lane listed again", lambda d: {lane for _, lane in page.listed()} >= {"default", "otp"})
        check("the lane filter narrowed the list to otp's 2 messages; cancel all pending in lane otp took only those")

        # 3e. Start otp again from its row: its next message is sent.
        status, resumed = leader.call("POST", "/api/messages", {
            "phone_number": "+905551239004", "content": "otp after its start", "lane": "otp"})
        assert status == 201, resumed
        page.lane("otp").find_element(By.CSS_SELECTOR, "button.lane-start").click()
        page.confirm_says("Start lane otp?")
        page.wait("otp shown running", lambda d: page.lane("otp").get_attribute("data-running") == "true"
                  and page.lane_state("otp") == "running"
                  and "Lane otp started" in page.text("lanes-result"))
        lanes = lanes_api()
        assert lanes["otp"]["running"] is True and lanes["default"]["running"] is True, lanes
        leader.wait("otp's message sent", lambda: leader.call(
            "GET", f"/api/messages/{resumed['id']}")[1]["status"] in ("sent", "failed"), timeout=60)
        check(f"Start on otp's row started otp again: message {resumed['id']} left pending")

        # 3b'. otp's spend cap (console.sh's file prices the mock at 0.01 a segment and
        # caps otp at 100): the day's spend against it, then a cap of 0 set through the
        # API pauses the lane, as its row says, and clearing it resumes the lane.
        page.wait("otp's spend shown against its cap",
                  lambda d: "of 100.00 today (UTC)" in page.lane_cell("otp", "state"))
        status, body = leader.call("PUT", "/api/lanes/otp/config", {"daily_spend_cap": 0})
        assert status == 200 and body["daily_spend_cap"] == 0, (status, body)
        page.wait("otp paused for its spend cap", lambda d: page.lane("otp").get_attribute("data-paused") == "spend_cap"
                  and "paused: daily spend cap" in page.lane_cell("otp", "state")
                  and "of 0.00 today (UTC)" in page.lane_cell("otp", "state"))
        page.shot_of("lane-otp-spend-cap", "lanes-panel")
        status, body = leader.call("PUT", "/api/lanes/otp/config", {"daily_spend_cap": None})
        assert status == 200 and body["daily_spend_cap"] == 100, (status, body)
        page.wait("otp running again", lambda d: page.lane("otp").get_attribute("data-paused") == ""
                  and "of 100.00 today (UTC)" in page.lane_cell("otp", "state"))
        check("otp's row shows its day's spend against its cap, pauses at a cap of 0 set through the API "
              "and resumes when it is cleared")

        # 3c. A status webhook given up on (written here: the stack posts none): the panel
        # appears with it, and Replay makes it due again, which takes it off the list.
        assert not page.shown("webhooks-panel"), "the dead-letter panel shows with none"
        psql(args.database_url, """
            INSERT INTO webhook_events (webhook_id, message_id, type, url, payload, status, attempts, last_error)
            VALUES ('msg_consoletest', 1, 'message.sent', 'http://127.0.0.1:9/hooks',
                    '{"type": "message.sent", "data": {"id": 1}}', 'failed', 7, 'http://127.0.0.1:9/hooks: HTTP 500')""")
        page.wait("the dead letter listed", lambda d: page.shown("webhooks-panel")
                  and "msg_consoletest" in page.text("webhooks"))
        page.shot_of("webhook-dead-letter", "webhooks-panel")
        driver.find_element(By.CSS_SELECTOR, "#webhooks tbody button").click()
        page.confirm_says("Replay message.sent?")
        page.wait("the replayed event off the list", lambda d: "posted again" in page.text("webhooks-result")
                  and "msg_consoletest" not in page.text("webhooks"))
        status, failed = leader.call("GET", "/api/webhooks/failed")
        assert status == 200 and failed["events"] == [], failed
        check("a dead-letter status webhook is listed and Replay takes it off the list")

        # 4. A bad config value: the server's 422 is shown next to the field.
        size = driver.find_element(By.ID, "config-batch-size")
        size.clear()
        size.send_keys("0")
        page.click("config-save")
        page.wait("the batch size error", lambda d: "batch_size" in d.find_element(By.ID, "config-batch-size-error").text)
        assert size.get_attribute("aria-invalid") == "true"
        page.shot("config-error")
        interval = driver.find_element(By.ID, "config-interval")
        size.clear()
        size.send_keys("4")
        interval.clear()
        interval.send_keys("soon")
        page.click("config-save")
        page.wait("the interval error", lambda d: "processing_interval" in d.find_element(By.ID, "config-interval-error").text)
        status, body = leader.call("GET", "/api/messaging/status")
        assert body["batch_size"] == 3, "a refused change changed nothing"
        interval.clear()
        interval.send_keys("2s")
        page.click("config-save")
        page.wait("the change applied", lambda d: "Applied" in d.find_element(By.ID, "config-result").text)
        status, body = leader.call("GET", "/api/messaging/status")
        assert (body["batch_size"], body["processing_interval"]) == (4, "2s"), body
        check("a bad config value shows the server's error inline; a good one applies cluster-wide")

        # 4b. An override shadows the environment's value: marked with who and when where
        #     the value in force is shown, and cleared from there.
        def mark(d, which):
            return d.find_element(By.ID, f"{which}-override").text if d.find_element(By.ID, f"{which}-override").is_displayed() else ""
        page.wait("the page's own change marked", lambda d: "override by api@replica-2 at" in mark(d, "batch-size")
                  and "configured 3" in mark(d, "batch-size") and "configured 1s" in mark(d, "interval"))
        status, body = leader.call("PUT", "/api/messaging/config", {"batch_size": 5})
        assert status == 200 and body["overrides"]["batch_size_set"]["by"] == "api@replica-1", body
        set_at = body["overrides"]["batch_size_set"]["at"][:19].replace("T", " ") + " UTC"
        expected = f"(override by api@replica-1 at {set_at}, configured 3)"
        page.wait("the API's override marked with who and when", lambda d: d.find_element(By.ID, "batch-size").text == "5"
                  and mark(d, "batch-size").startswith(expected))
        page.shot("override-marked")
        page.click("batch-size-clear")
        page.wait("the batch size override cleared", lambda d: d.find_element(By.ID, "batch-size").text == "3"
                  and mark(d, "batch-size") == "" and "back to the configured 3" in d.find_element(By.ID, "config-result").text)
        status, body = leader.call("GET", "/api/messaging/status")
        overrides = body["config"]["overrides"]
        assert (body["batch_size"], overrides["batch_size"], overrides["batch_size_set"]) == (3, None, None), body
        assert overrides["processing_interval"] == "2s", "clearing one override left the other"
        assert "override by api@replica-2" in mark(driver, "interval")
        page.click("interval-clear")
        page.wait("the interval override cleared", lambda d: d.find_element(By.ID, "interval").text == "1s"
                  and mark(d, "interval") == "")
        status, body = leader.call("GET", "/api/messaging/status")
        assert (body["processing_interval"], body["config"]["overrides"]["processing_interval"]) == ("1s", None), body
        check("overrides are marked with who, when and the configured value, and cleared from the page")

        # 5. Stop on the page (served by replica-2) stops the cluster, seen through replica-1.
        page.click("stop")
        page.confirm()
        page.wait("the page to show stopped", lambda d: d.find_element(By.ID, "running").text == "stopped")
        status, body = leader.call("GET", "/api/messaging/status")
        assert status == 200 and body["running"] is False, body
        page.wait("the stop answer", lambda d: "stopped" in d.find_element(By.ID, "control-result").text)
        page.shot("stopped")
        check("Stop on the follower's page stopped the cluster (replica-1's API says running=false)")

        # 6. A failed message retried from the page goes back to pending (the cluster is
        #    stopped, so it stays there to be seen).
        status, failed = leader.call("GET", "/api/messages?status=failed&limit=1")
        target = failed["messages"][0]
        Select(driver.find_element(By.ID, "filter-status")).select_by_value("failed")
        page.wait("the failed filter", lambda d: page.row(target["id"]) is not None
                  and all(r.get_attribute("data-status") == "failed"
                          for r in d.find_elements(By.CSS_SELECTOR, "#messages tbody tr[data-id]")))
        page.row(target["id"]).find_element(By.TAG_NAME, "button").click()
        page.wait("the detail view", lambda d: d.find_element(By.ID, "detail").is_displayed()
                  and d.find_element(By.ID, "detail").get_attribute("data-status") == "failed")
        detail = page.text("detail-fields")
        assert "invalid destination" in detail and "Attempts" in detail, detail
        page.shot("failed-detail")
        page.click("detail-retry")
        page.wait("the message pending again", lambda d: d.find_element(By.ID, "detail").get_attribute("data-status") == "pending")
        status, body = follower.call("GET", f"/api/messages/{target['id']}")
        assert body["status"] == "pending", body
        check(f"failed message {target['id']} retried from the page is pending again")

        # 7. Cancel a pending message (with confirmation), then search by id and by phone.
        page.click("detail-cancel")
        page.confirm()
        page.wait("the message cancelled", lambda d: d.find_element(By.ID, "detail").get_attribute("data-status") == "cancelled")
        assert follower.call("GET", f"/api/messages/{target['id']}")[1]["status"] == "cancelled"
        check(f"pending message {target['id']} cancelled from the page")
        Select(driver.find_element(By.ID, "filter-status")).select_by_value("")
        search = driver.find_element(By.ID, "filter-search")
        search.clear()
        search.send_keys(f"{created['id']}\n")
        page.wait("the search by id", lambda d: [r.get_attribute("data-id") for r in d.find_elements(
            By.CSS_SELECTOR, "#messages tbody tr[data-id]")] == [str(created["id"])])
        search.clear()
        search.send_keys("+905551230000\n")
        page.wait("the search by phone", lambda d: page.row(created["id"]) is not None and all(
            "+905551230000" in r.text for r in d.find_elements(By.CSS_SELECTOR, "#messages tbody tr[data-id]")))
        search.clear()
        search.send_keys("12ab34567890\n")
        page.wait("the server's error for a bad number", lambda d: d.find_element(By.ID, "filter-error").text != "")
        page.click("filter-clear")
        page.wait("the full list back", lambda d: d.find_element(By.ID, "filter-error").text == ""
                  and len(d.find_elements(By.CSS_SELECTOR, "#messages tbody tr[data-id]")) == 25)
        page.click("page-older")
        page.wait("the second page", lambda d: d.find_element(By.ID, "page-info").text.startswith("page 2"))
        page.click("page-first")
        page.wait("the first page again", lambda d: d.find_element(By.ID, "page-info").text.startswith("page 1"))
        check("search by id and by phone, the server's error for a bad number, keyset paging")

        # 7b. Retry all failed for the filter on screen (status failed, one phone number).
        #     The cluster is stopped: what the actions change stays as they left it.
        bulk_phone = "+905551110000"  # 4 failed fixtures (scripts/verify/console.sh)
        assert leader.total(status="failed", phone_number=bulk_phone) == 4
        other_failed = leader.total(status="failed") - 4
        page.filter_status("failed")
        page.search(bulk_phone)
        page.wait("the offer to retry the 4", lambda d: page.shown("bulk-action")
                  and d.find_element(By.ID, "bulk-action").text == f"Retry all 4 failed to {bulk_phone}")
        page.click("bulk-action")
        page.wait("the confirmation", lambda d: d.find_element(By.ID, "confirm").get_attribute("open") is not None)
        page.shot("bulk-retry-confirm")
        page.confirm_says(f"Retry 4 failed messages to {bulk_phone}?")
        page.wait("the count retried", lambda d: d.find_element(By.ID, "bulk-result").text.startswith(
            f"Retried 4 failed messages to {bulk_phone}"))
        page.wait("the list refreshed", lambda d: not page.shown("bulk-action")
                  and not d.find_elements(By.CSS_SELECTOR, "#messages tbody tr[data-id]"))
        assert leader.total(status="pending", phone_number=bulk_phone) == 4
        assert leader.total(status="failed", phone_number=bulk_phone) == 0
        assert leader.total(status="failed") == other_failed, "failed messages to other numbers stay failed"
        check(f"retry all 4 failed to {bulk_phone}, confirmed by count and filter: pending again, the others untouched")

        # 7c. Cancel all pending for that number; pending messages to another number stay.
        #     Two priorities waiting: the queue shows each one's oldest age.
        for priority in (3, 0):
            status, body = leader.call("POST", "/api/messages", {
                "phone_number": "+905551112222", "content": f"stays pending (priority {priority})", "priority": priority})
            assert status == 201, body
        page.wait("the oldest pending age per priority", lambda d: page.shown("oldest-by-priority")
                  and "priority 3:" in page.text("oldest-by-priority") and "priority 0:" in page.text("oldest-by-priority"))
        other_pending = leader.total(status="pending") - 4
        page.filter_status("pending")
        page.wait("the offer to cancel the 4", lambda d: page.shown("bulk-action")
                  and d.find_element(By.ID, "bulk-action").text == f"Cancel all 4 pending to {bulk_phone}")
        assert page.text("bulk-result") == "", "a new filter clears the last answer"
        page.click("bulk-action")
        page.confirm_says(f"Cancel 4 pending messages to {bulk_phone}?")
        page.wait("the count cancelled", lambda d: d.find_element(By.ID, "bulk-result").text.startswith(
            f"Cancelled 4 pending messages to {bulk_phone}"))
        page.wait("the list refreshed", lambda d: not page.shown("bulk-action"))
        assert leader.total(status="cancelled", phone_number=bulk_phone) == 4
        assert leader.total(status="pending", phone_number=bulk_phone) == 0
        assert leader.total(status="pending") == other_pending, "pending messages to other numbers stay pending"
        page.shot("bulk-cancelled")
        check(f"cancel all 4 pending to {bulk_phone}, confirmed: cancelled, the other {other_pending} pending untouched")

        # 7d. A search by id is one message, not a filter: no bulk action. Without a phone
        #     number the action takes every failed message.
        page.search(str(created["id"]))
        page.wait("the search by id", lambda d: d.find_element(By.ID, "page-info").text == f"message {created['id']}")
        assert not page.shown("bulk-action"), "a bulk action offered for a search by id"
        page.search("")
        page.filter_status("failed")
        failed_now = leader.total(status="failed")
        assert failed_now >= 2, failed_now  # the fixtures that step 6 did not touch
        page.wait("the offer to retry every failed message", lambda d: page.shown("bulk-action")
                  and d.find_element(By.ID, "bulk-action").text == f"Retry all {failed_now:,} failed")
        page.click("bulk-action")
        page.confirm_says(f"Retry {failed_now:,} failed messages?")
        page.wait("the count retried", lambda d: d.find_element(By.ID, "bulk-result").text.startswith(f"Retried {failed_now:,} failed messages:"))
        assert leader.total(status="failed") == 0
        page.filter_status("")
        check(f"retry all {failed_now} failed (no phone filter); no bulk action for a search by id")

        # 8. Start again (keyboard only: focus the button and press Enter), and 800 px.
        driver.find_element(By.ID, "start").send_keys("\n")
        page.wait("the dialog", lambda d: d.find_element(By.ID, "confirm").get_attribute("open") is not None)
        driver.find_element(By.ID, "confirm-yes").send_keys("\n")
        page.wait("the page to show running", lambda d: d.find_element(By.ID, "running").text == "running")
        assert leader.call("GET", "/api/messaging/status")[1]["running"] is True
        check("Start from the keyboard, with its confirmation")

        # 9. Dispatch paused because the provider refuses our credentials. The mock takes
        #    any token here, so the pause is set in PostgreSQL as the leader sets it. With
        #    nothing due the leader has nothing to probe with, so it stays until lifted.
        leader.wait("the queue to drain", lambda: (lambda s: s["by_status"]["pending"] == 0
                    and s["by_status"]["sending"] == 0)(leader.call("GET", "/api/messages/stats")[1]), timeout=120)
        psql(args.database_url, "UPDATE dispatcher_control SET paused_reason = 'provider_auth', paused_at = now(), "
             "paused_detail = 'HTTP 401: invalid token' WHERE id = 1")
        page.wait("the pause notice", lambda d: page.shown("pause-notice")
                  and "HTTP 401: invalid token" in page.text("pause-notice"))
        notice = page.text("pause-notice")
        for words in ("refuses our credentials", "401/403", "since 20", "no attempt is spent",
                      "SMS_API_TOKEN", "SMS_API_AUTH_HEADER", "resumes by itself", "probe"):
            assert words in notice, f"the pause notice lacks {words!r}: {notice}"
        assert driver.find_element(By.ID, "pause-notice").get_attribute("role") == "alert"
        page.wait("the badge", lambda d: d.find_element(By.ID, "running").text == "running — paused: provider credentials"
                  and "while paused" in d.find_element(By.ID, "next-batch").text)
        status, body = follower.call("GET", "/api/messaging/status")
        assert body["paused_reason"] == "provider_auth" and body["paused"]["detail"] == "HTTP 401: invalid token", body
        page.shot("paused")
        # Start (POST /api/messaging/start) lifts a pause: the page offers it while running.
        page.wait("the offer to resume", lambda d: d.find_element(By.ID, "start").is_enabled()
                  and d.find_element(By.ID, "start").text == "Resume dispatch")
        page.click("start")
        page.confirm_says("Resume dispatch?")
        page.wait("the pause notice gone", lambda d: not page.shown("pause-notice")
                  and d.find_element(By.ID, "running").text == "running"
                  and "Pause lifted" in d.find_element(By.ID, "control-result").text)
        assert leader.call("GET", "/api/messaging/status")[1]["paused"] is None
        assert not driver.find_element(By.ID, "start").is_enabled() and page.text("start") == "Start cluster"
        check("a provider_auth pause shows a notice with the provider's answer and a badge; Resume lifts it")
        page.click("detail-close")
        page.wait("the detail closed", lambda d: not d.find_element(By.ID, "detail").is_displayed())
        page.shot("overview-1400px")
        driver.set_window_size(800, 1000)
        page.wait("the chart resized", lambda d: d.find_element(By.CSS_SELECTOR, "#chart canvas").size["width"] <= 800)
        overflow = driver.execute_script("return document.documentElement.scrollWidth - document.documentElement.clientWidth")
        assert overflow <= 0, f"the page scrolls sideways by {overflow}px at 800 px"
        page.shot("cluster-800px")
        assert page.fits("lanes") <= 0, "the lanes table scrolls sideways at 800 px"
        page.shot_of("lanes-800px", "lanes-panel")
        check("usable at 800 px: no sideways scrolling, the lanes table included")

        # The API's 4xx answers above are logged by Chromium as "network" entries.
        logs = [e for e in driver.get_log("browser") if e["level"] == "SEVERE" and e["source"] != "network"]
        assert not logs, f"browser console errors: {logs}"
        check("no JavaScript errors in the browser console")
    finally:
        driver.quit()
    print(f"all console checks passed in {time.monotonic() - started:.0f}s")


if __name__ == "__main__":
    try:
        main()
    except AssertionError as err:
        print(f"FAIL: {err}", file=sys.stderr)
        sys.exit(1)
