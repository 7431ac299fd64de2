"""The supervisor page of ``emostream serve`` (``/``), in a real browser.

Debian's ``chromium`` driven by Selenium through Debian's ``chromium-driver``; both paths are passed
explicitly, so Selenium Manager never looks for (or downloads) a browser or a driver. ``make test``
installs the two packages when they are missing and it runs as root; otherwise this test skips and
says why.

One real ``emostream serve`` (the shipped model, a token, the default customer-only analysis, a
realistic alert rule) gets two calls from ``emostream send``: a stereo agent/customer call at
real-time pace that stays live, and the mono example call sent ``--fast`` that ends. The test signs
in through the page's form (a wrong token first), then reads what the page shows: both calls, their
channels, the customer's label changing, the ended call greyed out, the full timeline of each call
(one cell per event sent so far). Then it stops the server (the page must say it is reconnecting),
starts another one on the same port, a fleet this time (``--no-model --workers 2`` with an alert rule
that fires), and checks that the page comes back by itself, marks the vanished call as ended,
highlights the alert of a new call, shows a hostile channel name as text, and shows the calls of both
front ends (the page is connected to one of them) with their labels. The screenshot goes to pytest's tmp dir, and to
``docs/supervisor.png`` with ``EMOSTREAM_UPDATE_SCREENSHOT=1``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from .conftest import EXAMPLES, ROOT

TOKEN = "web-test-s3cret-7f4e9a"
CLASSES = {"Angry", "Disgusted", "Fearful", "Happy", "Neutral", "Sad", "Surprised"}
LIVE_ID, FAST_ID, ALERT_ID = "support-live-1", "support-fast-2", "support-alert-3"
HOSTILE = "<img src=x onerror=window.pwned=1>"  # a channel name is user input: must show as text
LIVE_RULE, NOMODEL_RULE = "Angry>=0.6 for 3s", "Neutral>=0.6 for 2s"
SKIP_REASON = (
    "supervisor page browser test: chromium/chromedriver not installed: run make test as root, "
    "or apt-get install chromium chromium-driver"
)

# Everything the test needs to know about the page in one round trip.
SNAPSHOT_JS = """
return Array.from(document.querySelectorAll('#calls .card')).map(card => ({
  id: card.dataset.callId,
  classes: Array.from(card.classList),
  status: card.querySelector('.status').textContent,
  alerts: Array.from(card.querySelectorAll('.alert-badge')).map(b => b.textContent),
  channels: Object.fromEntries(Array.from(card.querySelectorAll('.channel')).map(
      row => [row.dataset.channel, row.querySelector('.label').textContent])),
  cells: card.querySelectorAll('.strip .cell').length,
}));
"""


def emostream_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "emostream", *args]


def wait_for(predicate, timeout: float, what: str, interval: float = 0.15):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)


class ServerProcess:
    """``emostream serve`` in a subprocess; ``port`` is read from its "listening on" line."""

    def __init__(self, *args: str, port: int = 0):
        self.lines: list[str] = []
        self.proc = subprocess.Popen(
            emostream_cmd("serve", "--port", str(port), "--token", TOKEN, *args),
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        line = wait_for(
            lambda: next((line for line in self.lines if "listening on" in line), None) or self._died(),
            120,
            "the server's listening line",
        )
        match = re.search(r"listening on \S+?://[^\s:]+:(\d+)", line)
        assert match, f"cannot read the port from {line!r}"
        self.port = int(match.group(1))
        self.url = f"http://127.0.0.1:{self.port}/"
        self.ws_url = f"ws://127.0.0.1:{self.port}"

    def _read(self) -> None:
        for line in self.proc.stderr:
            self.lines.append(line.rstrip("\n"))

    def _died(self):
        if self.proc.poll() is not None:
            raise AssertionError(f"emostream serve exited with {self.proc.returncode}:\n" + "\n".join(self.lines[-20:]))
        return None

    def wait_ready(self, timeout: float = 60) -> None:
        def ready():
            self._died()
            try:
                with urllib.request.urlopen(self.url + "readyz", timeout=2) as response:
                    return json.load(response).get("ready")
            except OSError:
                return False

        wait_for(ready, timeout, "GET /readyz to say ready", interval=0.3)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)  # as a service manager stops it: calls get their summaries
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


class Sender:
    """``emostream send`` in a subprocess; collects the JSON lines it prints (the call's events)."""

    def __init__(self, path: Path, url: str, call_id: str, names: str, fast: bool):
        args = [str(path), url, "--protocol", "pcm", "--token", TOKEN, "--call-id", call_id, "--channel-names", names]
        self.messages: list[dict] = []
        self.proc = subprocess.Popen(
            emostream_cmd("send", *args, *(["--fast"] if fast else [])),
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            try:
                self.messages.append(json.loads(line))
            except ValueError:
                pass

    @property
    def events(self) -> list[dict]:
        return [m for m in list(self.messages) if m.get("type") == "event"]

    def finish(self, timeout: float) -> int:
        code = self.proc.wait(timeout)
        self._reader.join(5)
        return code

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)


def clip(source: Path, out: Path, start: float, stop: float, names: int | None = None) -> Path:
    """Seconds ``[start, stop)`` of ``source`` (mono duplicated to ``names`` channels when given)."""
    data, sr = sf.read(source, start=int(start * 16000), stop=int(stop * 16000), dtype="float32", always_2d=True)
    assert sr == 16000
    if names:
        data = np.repeat(data[:, :1], names, axis=1)
    sf.write(out, data, sr, subtype="PCM_16")
    return out


def save_for_docs(driver, shot: Path, out: Path) -> None:
    """The screenshot cut below the last card (the page is mostly empty below), for README."""
    bottom = driver.execute_script(
        "return Math.ceil(document.getElementById('calls').getBoundingClientRect().bottom * window.devicePixelRatio)"
    )
    try:
        from PIL import Image
    except ImportError:
        shutil.copyfile(shot, out)
        return
    with Image.open(shot) as image:
        image.crop((0, 0, image.width, min(image.height, int(bottom) + 24))).save(out, optimize=True)


@pytest.fixture
def driver(tmp_path, monkeypatch):
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    chromedriver = shutil.which("chromedriver")
    if not chromium or not chromedriver:
        pytest.skip(SKIP_REASON)
    pytest.importorskip(
        "selenium",
        reason="supervisor page browser test: selenium is not installed (pip install -e '.[test]', or make test)",
    )
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    monkeypatch.setenv("SE_OFFLINE", "true")  # belt and braces: Selenium Manager must not download
    options = Options()
    options.binary_location = chromium
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-dev-shm-usage",
        "--window-size=1400,900",
        "--disable-gpu",
        "--no-first-run",
        "--disable-extensions",
        "--password-store=basic",
        f"--user-data-dir={tmp_path / 'chromium-profile'}",
    ):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    service = Service(executable_path=chromedriver, log_output=str(tmp_path / "chromedriver.log"))
    browser = webdriver.Chrome(service=service, options=options)
    browser.set_page_load_timeout(30)
    try:
        yield browser
    finally:
        browser.quit()


def test_supervisor_page_in_chromium(driver, shipped_checkpoint, tmp_path):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    t0 = time.monotonic()
    processes: list = []
    snapshot = lambda: {c["id"]: c for c in driver.execute_script(SNAPSHOT_JS)}  # noqa: E731
    visible = lambda css: any(e.is_displayed() for e in driver.find_elements(By.CSS_SELECTOR, css))  # noqa: E731
    live_audio = clip(EXAMPLES / "call_stereo.flac", tmp_path / "live.flac", 24.0, 70.0)
    try:
        server = ServerProcess("--alert", LIVE_RULE)
        processes.append(server)

        # --- sign in: the page finds out that a token is needed, refuses a wrong one
        driver.get(server.url)
        wait_for(lambda: visible("#token-input"), 20, "the login form")
        assert not visible("#main")
        driver.find_element(By.ID, "token-input").send_keys("not-the-token", Keys.ENTER)
        wait_for(
            lambda: visible("#login-error") and "did not accept" in driver.find_element(By.ID, "login-error").text,
            10,
            "the wrong token to be refused",
        )
        driver.find_element(By.ID, "token-input").send_keys(TOKEN, Keys.ENTER)
        wait_for(lambda: driver.find_element(By.ID, "conn").text.startswith("live"), 20, "the events feed")
        assert not visible("#login") and visible("#legend")
        assert TOKEN not in driver.current_url and "token" not in driver.current_url
        assert driver.execute_script("return window.localStorage.length") == 0
        assert driver.execute_script("return sessionStorage.getItem('emostream.token')") == TOKEN
        legend = driver.find_element(By.ID, "legend").text
        assert all(c in legend for c in CLASSES) and "silence" in legend
        server.wait_ready()

        # --- two calls: one stays live (real-time pace), one is sent --fast and ends
        live = Sender(live_audio, server.ws_url, LIVE_ID, "agent,customer", fast=False)
        processes.append(live)
        wait_for(lambda: LIVE_ID in snapshot(), 20, "the live call's card")
        fast = Sender(EXAMPLES / "call_mono.flac", server.ws_url, FAST_ID, "customer", fast=True)
        processes.append(fast)
        seen: dict[str, list[str]] = {LIVE_ID: [], FAST_ID: []}

        def fast_call_ended():
            cards = snapshot()
            for call_id, labels in seen.items():
                label = cards.get(call_id, {}).get("channels", {}).get("customer")
                if label in CLASSES and (not labels or labels[-1] != label):
                    labels.append(label)
            return "ended" in cards.get(FAST_ID, {}).get("classes", [])

        wait_for(fast_call_ended, 60, "the --fast call to be greyed out as ended", interval=0.1)
        assert fast.finish(30) == 0, "emostream send --fast failed"
        cards = snapshot()
        assert set(cards) == {LIVE_ID, FAST_ID}
        assert set(cards[LIVE_ID]["channels"]) == {"agent", "customer"}
        assert cards[LIVE_ID]["channels"]["agent"] == "not analysed (privacy)"  # serve's default: customer only
        assert set(cards[FAST_ID]["channels"]) == {"customer"}
        assert "ended" not in cards[LIVE_ID]["classes"] and cards[LIVE_ID]["status"] == "live"
        assert cards[FAST_ID]["status"] == "ended · completed"
        assert len(set(seen[FAST_ID])) >= 2, f"the label never changed: {seen}"
        fast_events = fast.events
        assert fast_events and {e["channel"] for e in fast_events} == {"customer"}

        # --- the screenshot: both calls, one greyed out (a few more seconds of the live call first)
        update_docs = os.environ.get("EMOSTREAM_UPDATE_SCREENSHOT") == "1"  # then: more of the live call
        windows = 32 if update_docs else 12
        wait_for(lambda: snapshot()[LIVE_ID]["cells"] >= windows, 60, f"{windows} windows of the live call")
        shot = tmp_path / "supervisor.png"
        assert driver.save_screenshot(str(shot)) and shot.stat().st_size > 10_000
        if update_docs:
            save_for_docs(driver, shot, ROOT / "docs" / "supervisor.png")

        # --- one click opens the full timeline so far: at least one cell per event sent so far
        sent = len(live.events)
        assert sent > 0
        driver.find_element(By.CSS_SELECTOR, f'[data-call-id="{LIVE_ID}"]').click()
        wait_for(lambda: visible("#detail"), 10, "the timeline overlay")
        wait_for(
            lambda: len(driver.find_elements(By.CSS_SELECTOR, "#detail .tl .cell")) >= sent,
            10,
            f"{sent} cells in the live call's timeline",
        )
        driver.save_screenshot(str(tmp_path / "supervisor-timeline.png"))
        assert driver.find_element(By.ID, "detail-title").text == LIVE_ID
        # read in one script: the live call's overlay re-renders as events arrive (elements go stale)
        channels = set(
            driver.execute_script(
                "return [...document.querySelectorAll('#detail .tl-channel')].map(e => e.dataset.channel)"
            )
        )
        assert channels == {"agent", "customer"}
        driver.find_element(By.ID, "detail-close").click()
        wait_for(lambda: not visible("#detail"), 5, "the overlay to close")

        driver.find_element(By.CSS_SELECTOR, f'[data-call-id="{FAST_ID}"]').click()
        wait_for(
            lambda: (
                len(driver.find_elements(By.CSS_SELECTOR, "#detail .tl .cell")) == len(fast_events)
                and "Summary" in driver.find_element(By.ID, "detail-summary").text
            ),
            10,
            f"the ended call's {len(fast_events)} cells and its summary",
        )
        last = fast_events[-1]
        colour = f"e-{last['label']}" if last["speech"] else "e-silence"
        cells = driver.find_elements(By.CSS_SELECTOR, f"#detail .tl .cell.{colour}")
        assert cells, f"no {colour} cell for the last window"
        ActionChains(driver).move_to_element(cells[-1]).perform()
        wait_for(lambda: "customer · " in driver.find_element(By.ID, "detail-hover").text, 5, "the hover readout")
        driver.save_screenshot(str(tmp_path / "supervisor-ended-call.png"))
        driver.find_element(By.TAG_NAME, "body").send_keys(Keys.ESCAPE)
        wait_for(lambda: not visible("#detail"), 5, "Escape to close the overlay")

        # --- the server goes away: the page says so and retries
        server.stop()
        wait_for(
            lambda: visible("#conn-banner") and "reconnecting" in driver.find_element(By.ID, "conn-banner").text,
            15,
            "the reconnect banner",
        )
        assert re.search(r"reconnecting in \d+ s", driver.find_element(By.ID, "conn-banner").text)
        driver.save_screenshot(str(tmp_path / "supervisor-reconnecting.png"))
        live.stop()

        # --- a server on the same port again, a fleet this time (serve --workers 2: two front ends on
        # the port, one view): the page reconnects by itself and rebuilds its state
        server = ServerProcess("--no-model", "--workers", "2", "--alert", NOMODEL_RULE, port=server.port)
        processes.append(server)
        try:
            wait_for(
                lambda: not visible("#conn-banner") and driver.find_element(By.ID, "conn").text.startswith("live"),
                90,
                "the page to reconnect",
            )
        except AssertionError as exc:  # say what the page and the fleet were doing
            page = driver.find_element(By.ID, "conn").text, driver.find_element(By.ID, "conn-banner").text
            console = [entry["message"] for entry in driver.get_log("browser")][-10:]
            raise AssertionError(f"{exc}; page {page}; console {console}; serve:\n" + "\n".join(server.lines[-30:]))
        cards = snapshot()
        assert "ended" in cards[LIVE_ID]["classes"], "a call the new server does not know must be shown as ended"

        # --- an alert on a new call is highlighted; a hostile channel name is shown as text
        alert_audio = clip(EXAMPLES / "call_mono.flac", tmp_path / "alert.flac", 0.0, 14.0, names=2)
        alerting = Sender(alert_audio, server.ws_url, ALERT_ID, f"{HOSTILE},customer", fast=False)
        processes.append(alerting)
        wait_for(lambda: "alerting" in snapshot().get(ALERT_ID, {}).get("classes", []), 30, "the alert highlight")
        card = snapshot()[ALERT_ID]
        assert any(NOMODEL_RULE in text for text in card["alerts"]), card
        assert set(card["channels"]) == {HOSTILE, "customer"}
        assert driver.execute_script("return window.pwned === undefined && !document.querySelector('#calls img')")
        driver.save_screenshot(str(tmp_path / "supervisor-after-restart.png"))

        # --- calls on both front ends of the fleet: the page (connected to one of them) shows them all
        def live_calls() -> dict:
            request = urllib.request.Request(server.url + "v1/calls", headers={"Authorization": f"Bearer {TOKEN}"})
            with urllib.request.urlopen(request, timeout=5) as response:
                return {c["call_id"]: c["worker"] for c in json.load(response)["calls"] if c["ended_at"] is None}

        for k in range(10):
            if len(set(live_calls().values())) == 2:
                break
            processes.append(Sender(alert_audio, server.ws_url, f"fleet-{k}", "agent,customer", fast=False))
            wait_for(lambda: f"fleet-{k}" in live_calls(), 20, f"call fleet-{k} to be listed")
        holders = live_calls()
        assert len(set(holders.values())) == 2, f"calls landed on one front end only: {holders}"
        wait_for(
            lambda: all(
                snapshot().get(c, {}).get("channels", {}).get("customer") in CLASSES or c == ALERT_ID for c in holders
            ),
            30,
            f"every call of both front ends ({holders}) on the page, with a label",
        )
        driver.save_screenshot(str(tmp_path / "supervisor-fleet.png"))

        assert TOKEN not in driver.current_url
        problems = [
            entry["message"]
            for entry in driver.get_log("browser")
            if "Content Security Policy" in entry["message"] or "Uncaught" in entry["message"]
        ]
        assert not problems, problems
    finally:
        for process in reversed(processes):
            process.stop()
    print(f"supervisor page test: {time.monotonic() - t0:.1f} s")
