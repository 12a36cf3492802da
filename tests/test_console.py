"""The operator console in a real headless browser (Debian's chromium through Selenium):
a paused run is approved from the page and seen to finish live."""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from agentpool import AgentPool, PoolConfig, SimulatorConfig
from agentpool.cluster.redis_server import free_port
from agentpool.config import HttpConfig
from agentpool.http.serve import serve_http, stop_http

pytestmark = pytest.mark.usefixtures("ray_session")

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
if CHROMIUM is None or CHROMEDRIVER is None:
    if os.environ.get("TEST_REQUIRE_BROWSER"):  # CI (.ci/run installs them): a missing browser fails
        raise RuntimeError("the console test needs Debian's chromium and chromium-driver, which .ci/run installs")
    pytest.skip(
        "needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver)",
        allow_module_level=True,
    )

from selenium import webdriver  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support import expected_conditions as ec  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402


@pytest.fixture(scope="module")
def served(redis_url: str) -> Iterator[tuple[AgentPool, str]]:
    config = PoolConfig(
        name=f"c{uuid.uuid4().hex[:8]}",
        key_prefix=f"t{uuid.uuid4().hex[:8]}",
        redis_url=redis_url,
        tool_modules=["tests.toolkit"],
        simulator=SimulatorConfig(latency_ms=5, latency_sigma=0),
        num_workers=1,
        approval_timeout_s=120.0,
        http=HttpConfig(port=free_port(), sse_heartbeat_s=1.0),
    )
    with AgentPool.start(config) as pool:
        url = serve_http(pool.config.name)
        try:
            yield pool, url
        finally:
            stop_http(pool.config.name)


@pytest.fixture
def browser() -> Iterator[webdriver.Chrome]:
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,900"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def test_a_paused_run_is_approved_from_the_console_and_finishes_live(
    served: tuple[AgentPool, str], browser: webdriver.Chrome
) -> None:
    pool, url = served
    key = pool.create_api_key("acme", name="console test")
    browser.get(url + "/")
    wait = WebDriverWait(browser, 30)
    browser.find_element(By.ID, "key").send_keys(key)
    browser.find_element(By.ID, "use-key").click()
    wait.until(ec.text_to_be_present_in_element((By.ID, "who"), "tenant acme"))
    browser.find_element(By.ID, "prompt").send_keys(
        'sim: tool wire_money {"amount": 500, "to": "bob"}\nsim: answer paid bob'
    )
    browser.find_element(By.ID, "tools").send_keys("wire_money")
    browser.find_element(By.CSS_SELECTOR, "#start button[type=submit]").click()
    # The run pauses: it shows in the approvals queue, and its timeline says so live.
    approve = wait.until(ec.element_to_be_clickable((By.CSS_SELECTOR, "#approvals button.approve")))
    task_id = browser.find_element(By.CSS_SELECTOR, "#approvals tr").get_attribute("data-task-id")
    assert task_id and browser.find_element(By.ID, "timeline-run").text == task_id
    wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, '#timeline li[data-event="approval_requested"]')))
    state = pool.get(task_id, tenant="acme")
    assert state is not None and state.phase == "awaiting_approval"
    approve.click()
    wait.until(ec.text_to_be_present_in_element((By.ID, "timeline-end"), "ended: succeeded"))
    events = [li.get_attribute("data-event") for li in browser.find_elements(By.CSS_SELECTOR, "#timeline li")]
    assert events[0] == "task_admitted" and events[-1] == "task_end"
    assert {"approval_requested", "approval_decided", "tool_result"} <= set(events)
    wait.until(ec.text_to_be_present_in_element((By.ID, "runs"), "paid bob"))  # the runs table, refreshed
    assert browser.find_element(By.ID, "error").text == ""
    record = pool.get(task_id, tenant="acme")
    assert record is not None and record.result is not None and record.result.answer == "paid bob"
    shot = os.environ.get("TEST_CONSOLE_SCREENSHOT")
    if shot:  # docs/console.png is taken this way
        Path(shot).parent.mkdir(parents=True, exist_ok=True)
        browser.save_screenshot(shot)
