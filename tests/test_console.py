"""The web console (``/ui``) in a real browser: Debian's headless Chromium driven by selenium through
chromium-driver, on a lab (the hub, controllers ``a`` and ``b`` and a gateway as real processes, on real
PostgreSQL and the real Docker engine).

One user story, in order: the admin logs in, is refused a service named ``<script>…`` (the hub's error
shown, escaped), deploys a service from the form, sees it running with its labels and environment shown
as text, follows its log live (and stops and follows again past the per-user cap of open streams: each
stop gives its slot back), migrates and scales it behind the confirmation and sees the operations, sees charts of
its CPU, memory, requests and latency from the hub's history; a forged POST
(no CSRF token, or from another origin) is refused and changes nothing; every answer carries the
console's CSP and the browser reported no violation of it; a second user sees none of the admin's
services, and the admin's service page by URL answers not found; a refused call whose path holds
``<script>`` is shown as text on the audit page. Each page is saved as a screenshot in
``$MMANAGER_TEST_ARTIFACTS/console`` (default ``test-artifacts/console``).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import docker
import httpx
import pytest
from selenium import webdriver
from selenium.webdriver.chrome.service import Service as ChromeService
from selenium.webdriver.chrome.webdriver import WebDriver
from selenium.webdriver.common.by import By
from selenium.webdriver.support import expected_conditions as ec
from selenium.webdriver.support.ui import Select, WebDriverWait

from examples.images import EXAMPLE_IMAGE
from hub.ui.security import CSP
from mmanager.client import ApiError, Client
from tests.support.lab import Lab, running_lab
from tests.support.pg import create_database

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = Path(os.environ.get("MMANAGER_TEST_ARTIFACTS") or ROOT / "test-artifacts") / "console"
# Markup in what the hub stores and shows: a service's name (refused), a label's and an env value.
XSS = "<script>window.__xss = 1</script>"
SPEC = {
    "name": "console-demo", "image": EXAMPLE_IMAGE, "ports": {"5000": None},
    "health_check": {"path": "/health", "port": 5000, "interval": 1, "start_period": 5},
    "resources": {"cpu_limit": 0.5, "memory_limit": "32MB"},
    # The example's web server, and a line a second on the log for the live view to show.
    "command": ["/bin/sh", "-c", "trap 'exit 0' TERM INT; httpd -f -v -p 5000 -h /www & "
                "i=0; while true; do i=$((i+1)); echo console-tick-$i; sleep 1; done"],
    "labels": {"note": XSS}, "env": {"GREETING": XSS},
}


@pytest.fixture
async def db_url(pg_server: str) -> str:
    return await create_database(pg_server, "console")


@pytest.fixture
def lab(db_url: str, example_image: str, docker_client: docker.DockerClient, tmp_path: Path,
        request: pytest.FixtureRequest) -> Iterator[Lab]:
    # A point of metrics history every second or two, so that the service's charts have something to draw.
    with running_lab(db_url, tmp_path, request, docker_client, hub_env={"MMANAGER_METRICS_RESOLUTION": "1"},
                     controller_env={"MMANAGER_STATS_INTERVAL": "2"}) as lab:
        yield lab


@pytest.fixture
def browser(request: pytest.FixtureRequest) -> Iterator[WebDriver]:
    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium") or "/usr/bin/chromium"
    # As root (the test machines) Chromium runs only without its sandbox; /dev/shm may be small in a container.
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,1100",
                "--disable-gpu", "--no-first-run"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    service = ChromeService(executable_path=shutil.which("chromedriver") or "/usr/bin/chromedriver")
    driver = webdriver.Chrome(options=options, service=service)
    try:
        yield driver
        failed = getattr(request.node, "rep_call", None)
        if failed is not None and failed.failed:
            # What the browser showed when the story broke off.
            ARTIFACTS.mkdir(parents=True, exist_ok=True)
            (ARTIFACTS / "failure.html").write_text(driver.page_source)
            driver.save_screenshot(str(ARTIFACTS / "failure.png"))
    finally:
        driver.quit()


class Story:
    """The browser, and what the test checks on every page it opens."""

    def __init__(self, driver: WebDriver, ui: str) -> None:
        self.driver = driver
        self.ui = ui
        ARTIFACTS.mkdir(parents=True, exist_ok=True)

    def wait(self, timeout: float = 20) -> WebDriverWait[WebDriver]:
        return WebDriverWait(self.driver, timeout)

    def open(self, path: str, ready: str) -> None:
        self.driver.get(self.ui + path)
        self.wait().until(ec.presence_of_element_located((By.CSS_SELECTOR, ready)))

    def text(self, css: str) -> str:
        return self.driver.find_element(By.CSS_SELECTOR, css).text

    def shot(self, name: str) -> None:
        # The whole page's height, so that a screenshot shows the page and not just its top.
        self.driver.set_window_size(1280, 1100)
        height = self.driver.execute_script("return document.documentElement.scrollHeight")
        self.driver.set_window_size(1280, max(1100, min(int(height) + 120, 4000)))
        self.driver.execute_script("window.scrollTo(0, 0)")
        self.driver.save_screenshot(str(ARTIFACTS / f"{name}.png"))

    def no_script_ran(self) -> None:
        assert self.driver.execute_script("return window.__xss === undefined"), "markup from the hub ran as script"
        # The page's only script is the console's own.
        sources = [s.get_attribute("src") for s in self.driver.find_elements(By.TAG_NAME, "script")]
        assert sources == [f"{self.ui}/static/console.js"], sources

    def log_in(self, token: str, who: str) -> None:
        self.open("/", "#token")
        self.driver.find_element(By.ID, "token").send_keys(token)
        self.driver.find_element(By.CSS_SELECTOR, "#login-form button").click()
        self.wait().until(ec.text_to_be_present_in_element((By.ID, "whoami"), who))


def test_the_console_in_a_browser(lab: Lab, browser: WebDriver, request: pytest.FixtureRequest) -> None:
    hub = lab.dep.hub().url
    story = Story(browser, hub + "/ui")
    sdk = Client(url=hub, token=lab.token)
    request.addfinalizer(sdk.close)

    # The admin logs in: the login page first, for anyone not signed in.
    story.open("/services", "#token")
    story.shot("login")
    story.log_in(lab.token, "root")
    assert browser.find_element(By.ID, "no-services")

    # A service named <script>…: the hub refuses the name, and the page shows its error as text.
    story.open("/deploy", "#deploy-form")
    browser.find_element(By.ID, "spec").send_keys(json.dumps({**SPEC, "name": XSS}))
    browser.find_element(By.ID, "deploy").click()
    story.wait().until(ec.presence_of_element_located((By.ID, "error")))
    assert story.text("#error .code") == "VALIDATION_ERROR"
    assert XSS in story.text("#error")
    story.no_script_ran()
    story.shot("deploy-refused")
    assert sdk.services.list() == []

    # Deployed from the form: the hub answers once it runs; its markup-bearing label and env shown as text.
    spec = browser.find_element(By.ID, "spec")
    spec.clear()
    spec.send_keys(json.dumps(SPEC, indent=2))
    story.shot("deploy")
    browser.find_element(By.ID, "deploy").click()
    story.wait(60).until(ec.text_to_be_present_in_element((By.ID, "done"), "deployed"))
    assert story.text("#service-name") == "console-demo"
    assert story.text("#service-status") == "running"
    assert story.text("#service-url").startswith(lab.gateway)
    assert story.text("#labels td") == XSS and story.text("#env td") == XSS
    story.no_script_ran()
    service_id = browser.current_url.split("/services/")[1].split("?")[0]
    source = story.text("#service-controller")

    # Its log, followed: lines the container prints after the follow began appear.
    browser.find_element(By.ID, "follow").click()
    story.wait(20).until(ec.text_to_be_present_in_element((By.ID, "log-live"), "console-tick-"))

    # Stopped (the button, or leaving the page) and followed again, more times than a user may hold streams
    # open at once (4): each stop gives its slot back, or the hub would answer TOO_MANY_LOG_STREAMS.
    def state_is(text: str) -> Callable[[WebDriver], bool]:
        return lambda driver: driver.find_element(By.ID, "follow-state").text == text

    for i in range(6):
        if i % 2 == 0:
            browser.find_element(By.ID, "follow").click()
            story.wait(5).until(state_is("stopped"))
        else:
            story.open(f"/services/{service_id}", "#follow")
        browser.find_element(By.ID, "follow").click()
        story.wait(10).until(state_is("following"))
    story.wait(20).until(ec.text_to_be_present_in_element((By.ID, "log-live"), "console-tick-"))

    # Migrated behind the confirmation, to the other controller; the operation is listed, succeeded.
    target = next(c for c in lab.dep.controllers if c != source)
    Select(browser.find_element(By.ID, "migrate-target")).select_by_value(target)
    browser.find_element(By.CSS_SELECTOR, "#migrate-form button").click()
    confirm = story.wait(5).until(ec.alert_is_present())
    assert confirm.text == f"Migrate console-demo to {target}?"
    confirm.accept()
    story.wait(90).until(ec.text_to_be_present_in_element((By.ID, "done"), "migrate"))
    assert story.text("#service-controller") == target

    # Scaled to two replicas behind its confirmation: both listed, one on each controller.
    replicas = browser.find_element(By.CSS_SELECTOR, "#scale-form input[name=replicas]")
    replicas.clear()
    replicas.send_keys("2")
    browser.find_element(By.CSS_SELECTOR, "#scale-form button").click()
    confirm = story.wait(5).until(ec.alert_is_present())
    assert confirm.text == "Scale console-demo to 2 replicas?"
    confirm.accept()
    story.wait(90).until(ec.text_to_be_present_in_element((By.ID, "done"), "scale"))
    placed = [r.find_elements(By.TAG_NAME, "td")[1].text for r in browser.find_elements(By.CSS_SELECTOR, "#replicas tbody tr")]
    assert sorted(placed) == sorted(lab.dep.controllers), placed

    story.open(f"/operations?service_id={service_id}", "#operations")
    rows = [(r.find_element(By.CLASS_NAME, "op-name").text, r.find_element(By.CLASS_NAME, "op-status").text)
            for r in browser.find_elements(By.CSS_SELECTOR, "#operations tbody tr[data-operation]")]
    assert {("create", "succeeded"), ("migrate", "succeeded"), ("scale", "succeeded")} <= set(rows), rows
    story.shot("operations")

    # A refused call whose path holds markup (a path no route takes: refused before anyone is authenticated).
    assert httpx.get(f"{hub}/api/services/{XSS}", timeout=30).status_code == 404
    for path, ready, name in [("/services", "#services", "services"), ("/controllers", "#controllers", "controllers"),
                              ("/audit?actor=root", "#audit", "audit"), ("/alerts", "#alerts", "alerts")]:
        story.open(path, ready)
        story.shot(name)
    # The audit page shows it as text: no script runs.
    story.open("/audit?actor=anonymous", "#audit")
    assert f"/api/services/{XSS}" in story.text("#audit")
    story.no_script_ran()
    # A confirmation declined changes nothing: the controller the service left stays enabled.
    story.open("/controllers", "#controllers")
    browser.find_element(By.CSS_SELECTOR, f"#disable-{source} button").click()
    story.wait(5).until(ec.alert_is_present()).dismiss()
    story.open("/controllers", f"#disable-{source}")
    assert sdk.controllers.get(source).enabled
    story.open("/services", "#services")
    assert [r.get_attribute("data-service") for r in browser.find_elements(By.CSS_SELECTOR, "#services tbody tr")] \
        == [service_id]

    # Forged changes: no CSRF token, or sent from another site's page; refused, and the service stays.
    cookies = {"mm_session": lab.token}
    delete = f"{hub}/ui/services/{service_id}/delete"
    with httpx.Client(cookies=cookies, timeout=30) as forger:
        csrf = forger.get(f"{hub}/ui/services/{service_id}").text.split('name="csrf" value="')[1].split('"')[0]
        for form, origin in [({"confirmed": "yes"}, hub), ({"confirmed": "yes", "csrf": "0" * 64}, hub),
                             ({"confirmed": "yes", "csrf": csrf}, "https://evil.example")]:
            refused = forger.post(delete, data=form, headers={"Origin": origin})
            assert refused.status_code == 403 and "CSRF_REFUSED" in refused.text, (form, origin, refused.text)
        # Without the page's script a change is not confirmed by the browser: the hub asks on a page instead.
        asked = forger.post(delete, data={"csrf": csrf}, headers={"Origin": hub})
        assert asked.status_code == 200 and "Delete console-demo?" in asked.text and 'value="yes"' in asked.text
        # Every answer of the console carries its headers: pages, errors, the static files.
        for path in ("/login", f"/services/{service_id}", "/nope", "/static/console.js"):
            answer = forger.get(f"{hub}/ui{path}")
            assert answer.headers["content-security-policy"] == CSP, path
            assert answer.headers["x-frame-options"] == "DENY" and answer.headers["x-content-type-options"] == "nosniff"
    assert sdk.services.get(service_id).status == "running"

    # Its charts, from the hub's history: resource use, and the requests a client sends through the gateway
    # meanwhile with their latency, each a line once the hub has stored two points of it.
    url = sdk.services.get(service_id).url
    assert url is not None

    def charted(driver: WebDriver) -> bool:
        # Traffic, whatever each answer: the wait fails if the requests never show on the charts.
        with contextlib.suppress(httpx.HTTPError):
            httpx.get(url + "health", timeout=5)
        driver.get(f"{story.ui}/services/{service_id}?window=5m")
        drawn = {f.find_element(By.TAG_NAME, "strong").text for f in driver.find_elements(By.CSS_SELECTOR, "#charts figure")
                 if f.find_elements(By.TAG_NAME, "path")}
        return {"CPU", "Memory", "Requests", "Latency"} <= drawn

    story.wait(40).until(charted)
    browser.find_element(By.ID, "follow").click()
    story.wait(20).until(ec.text_to_be_present_in_element((By.ID, "log-live"), "console-tick-"))
    story.shot("service")

    # A second user: none of the admin's services, and the admin's service by URL is not found.
    with lab.hub() as admin:
        created = admin.post("/api/admin/users", json={"username": "alice"})
        assert created.status_code == 201, created.text
    alice = created.json()["token"]
    browser.find_element(By.ID, "logout").click()
    story.wait().until(ec.presence_of_element_located((By.ID, "token")))
    assert "mm_session" not in {c["name"] for c in browser.get_cookies()}
    story.log_in(alice, "alice")
    assert browser.find_element(By.ID, "no-services")
    assert [a.text for a in browser.find_elements(By.CSS_SELECTOR, "header nav a")] == [
        "Services", "Deploy", "Jobs", "Operations", "Audit", "Alerts"]
    story.shot("services-other-user")
    with Client(url=hub, token=alice) as as_alice, pytest.raises(ApiError) as missing:
        as_alice.services.get(service_id)
    assert missing.value.status == 404
    story.open(f"/services/{service_id}", "#error")
    assert story.text("#error") == f"{missing.value.code}: {missing.value.message}"
    story.shot("service-not-found")
    story.open("/controllers", "#error")
    assert story.text("#error .code") == "ADMIN_REQUIRED"
    # The followed log, the one page that calls the API's handler itself, answers her the same not found.
    with httpx.Client(cookies={"mm_session": alice}, timeout=30) as as_her:
        followed = as_her.get(f"{hub}/ui/services/{service_id}/logs/follow")
    assert (followed.status_code, followed.text) == (404, f"{missing.value.code}: {missing.value.message}")

    # No page of the story broke the console's own policy (an inline script or style would have).
    violations = [e["message"] for e in browser.get_log("browser") if "Content Security Policy" in e["message"]]
    assert violations == []
