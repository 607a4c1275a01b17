"""The console in a real browser: Debian's headless Chromium, driven by Selenium through Debian's
chromedriver, against the real ``cgb-worker console`` process, a real Redis, a real worker and the simulator.
Set CONSOLE_SCREENSHOTS to a folder to keep the overview's and a job page's screenshots (the README's)."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webelement import WebElement
from selenium.webdriver.support import expected_conditions
from selenium.webdriver.support.ui import WebDriverWait

from cgb_worker.deadletters import DeadLetters

from .attribution import settle
from .conftest import Harness, free_port
from .test_webhooks import SECRET, start_receiver

TOKEN_VALUE = "browser-test-token-0123456789"
PHONE = "+12025550100"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"


@pytest.fixture
def browser() -> Iterator[webdriver.Chrome]:
    assert os.path.exists(CHROMIUM), "Chromium is missing: `make test` installs Debian's chromium and chromium-driver"
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-dev-shm-usage",
        "--disable-gpu",
        "--window-size=1280,900",
    ):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture
def console(harness: Harness, worker_env: dict[str, str]) -> Iterator[str]:
    port = free_port()
    env = {**worker_env, "CONSOLE_TOKEN": TOKEN_VALUE, "CONSOLE_PORT": str(port), "LOG_LEVEL": "INFO"}
    proc = subprocess.Popen(
        [str(Path(sys.executable).parent / "cgb-worker"), "console"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    assert proc.stdout is not None
    line = proc.stdout.readline()  # the console says where it listens once it does
    assert f"console on http://127.0.0.1:{port}/ (CONSOLE_TOKEN required)" in line, line
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(10)
        proc.stdout.close()


def _find(driver: webdriver.Chrome, by: str, what: str) -> WebElement:
    """An element of the page a click led to, once that page has loaded (a click does not wait for it)."""
    found: WebElement = WebDriverWait(driver, 15).until(expected_conditions.presence_of_element_located((by, what)))
    return found


def _shot(driver: webdriver.Chrome, name: str, tmp: Path) -> None:
    folder = Path(os.environ.get("CONSOLE_SCREENSHOTS") or tmp)
    folder.mkdir(parents=True, exist_ok=True)
    assert driver.save_screenshot(str(folder / name))


def _browse(driver: webdriver.Chrome, base: str, job_id: str, dead_id: str, foreign: str, tmp: Path) -> dict[str, Any]:
    seen: dict[str, Any] = {}
    driver.get(base + "/")
    seen["redirected"] = driver.current_url
    driver.find_element(By.NAME, "token").send_keys("not-the-token-0123456789")
    driver.find_element(By.CSS_SELECTOR, "form[action='/login'] button").click()
    seen["wrong"] = _find(driver, By.CSS_SELECTOR, "[role=alert]").text
    _find(driver, By.NAME, "token").send_keys(TOKEN_VALUE)
    driver.find_element(By.CSS_SELECTOR, "form[action='/login'] button").click()
    seen["dead_tile"] = _find(driver, By.ID, "dead").text
    seen["after_sign_in"] = driver.current_url
    _shot(driver, "console-overview.png", tmp)
    # find the job by the number, then open it
    driver.get(base + "/find")
    driver.find_element(By.ID, "phone").send_keys("+1 202 555 0100")
    driver.find_element(By.ID, "find-phone").click()
    _find(driver, By.ID, "person-jobs")
    seen["find_url"] = driver.current_url
    links = driver.find_elements(By.CSS_SELECTOR, "#person-jobs a")
    seen["found"] = [a.text for a in links]
    links[0].click()
    seen["job_state"] = _find(driver, By.ID, "state").text
    seen["job_payload"] = driver.find_element(By.ID, "payload").text
    seen["timeline"] = [
        [td.text for td in tr.find_elements(By.TAG_NAME, "td")]
        for tr in driver.find_elements(By.CSS_SELECTOR, "#timeline tr")
        if tr.find_elements(By.TAG_NAME, "td")
    ]
    seen["page_sources"] = [driver.page_source]
    _shot(driver, "console-job.png", tmp)
    # replay a dead letter through its confirmation
    driver.get(base + "/failures")
    driver.find_element(By.CSS_SELECTOR, f"a[href='/failures/{dead_id}/replay']").click()
    _find(driver, By.ID, "confirm").click()
    seen["replay_of"] = _find(driver, By.ID, "replay-of").get_attribute("href")
    seen["replay_url"] = driver.current_url
    seen["page_sources"].append(driver.page_source)
    # a page elsewhere posting to the console: the cookie is SameSite=Strict, and there is no CSRF token
    driver.get(foreign)
    WebDriverWait(driver, 15).until(lambda d: d.current_url.startswith(base))  # the forged form was posted
    seen["foreign_result"] = _find(driver, By.TAG_NAME, "body").text
    # signed out: no page without the token again
    driver.delete_all_cookies()
    driver.get(base + f"/jobs/{job_id}")
    seen["signed_out"] = driver.current_url
    return seen


async def test_the_console_in_a_browser(
    harness: Harness, console: str, browser: webdriver.Chrome, redis_client: Any, tmp_path: Path
) -> None:
    rec, stop = await start_receiver(harness.redis_url)
    harness.sim.configure(webhook_url=rec.url, webhook_secret=SECRET, webhook_delay=0.05, webhook_jitter=0.5,
                          webhook_duplicate_rate=0.5, inbound_on_create=True)  # fmt: skip
    try:
        [job] = await harness.enqueue({"to": PHONE, "message": "Your visa is approved"})
        await harness.run()
        await settle(harness.sim.state, redis_client, within=30)
    finally:
        await stop()
    dead = DeadLetters(redis_client)
    await dead.add(job_id="dead0000browser", function="whatsapp_send",
                   payload={"to": PHONE, "message": "Documents needed"}, error=RuntimeError("CGB was down"),
                   attempts=5, enqueued_at=None)  # fmt: skip
    await dead.add(job_id="dead0000target", function="whatsapp_send", payload={"to": PHONE, "message": "x"},
                   error=RuntimeError("CGB was down"), attempts=5, enqueued_at=None)  # fmt: skip
    # a page on another origin that posts to the console as a forged form would
    forged = web.Application()
    page = (f'<form method="post" action="{console}/failures/dead0000target/delete"></form>'
            "<script>document.forms[0].submit()</script>")  # fmt: skip

    async def forged_page(request: web.Request) -> web.Response:
        return web.Response(text=page, content_type="text/html")

    forged.router.add_get("/", forged_page)
    runner = web.AppRunner(forged)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        # another name than the console's: a different site, as a browser sees it
        seen = await asyncio.to_thread(
            _browse, browser, console, job.job_id, "dead0000browser", f"http://localhost:{port}/", tmp_path
        )
    finally:
        await runner.cleanup()
    assert seen["redirected"] == console + "/login?next=/"
    assert seen["wrong"] == "That is not the console's token."
    assert seen["after_sign_in"] == console + "/"
    assert seen["dead_tile"] == "2"
    assert seen["find_url"] == console + "/find"
    assert seen["found"] == [job.job_id]
    assert seen["job_state"].startswith(f"{job.job_id}: succeeded (try 1, finished ")
    assert '"to": "+1********00"' in seen["job_payload"]
    # its delivery timeline: the worker's 'accepted', then WhatsApp's statuses once each, shuffled as they came
    assert seen["timeline"][0][0] == "accepted"
    assert sorted(row[0] for row in seen["timeline"][1:]) == ["delivered", "read", "sent"]
    assert all(row[4].startswith("wamid.SIM") for row in seen["timeline"][1:])
    new_id = seen["replay_url"].rsplit("/", 1)[1]
    assert seen["replay_url"] == f"{console}/jobs/{new_id}"
    assert seen["replay_of"] == console + "/jobs/dead0000browser"
    assert await redis_client.zscore("arq:queue", new_id) is not None
    # the browser did not send the SameSite=Strict cookie with the forged POST: refused, nothing deleted
    assert seen["foreign_result"] == "sign in first, or send Authorization: Bearer <CONSOLE_TOKEN>"
    assert await dead.get("dead0000target") is not None
    assert seen["signed_out"] == f"{console}/login?next=/jobs/{job.job_id}"
    for source in seen["page_sources"]:
        assert "2025550100" not in source
