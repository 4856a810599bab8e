"""The playground at `/` in headless Chromium: pick an adapter, type a prompt, read the streamed answer.

Needs Debian's `chromium` and `chromium-driver` packages (/usr/bin/chromium, /usr/bin/chromedriver) and
selenium (the `test` extra). Skipped only when /usr/bin/chromium is absent.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import httpx
import pytest

from prefixtune.serve import create_app
from serve_fixtures import LiveServer, save_adapters, tiny_llama, tiny_tokenizer

CHROMIUM = "/usr/bin/chromium"

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(
        not os.path.exists(CHROMIUM),
        reason=f"{CHROMIUM} is absent; install it with: apt-get install -y chromium chromium-driver",
    ),
]


def test_playground_streams_an_answer(tmp_path: Path) -> None:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    driver_path = shutil.which("chromedriver") or "/usr/bin/chromedriver"
    assert os.path.exists(driver_path), "chromedriver not found: apt-get install -y chromium-driver"
    model = tiny_llama()
    app = create_app(model, tiny_tokenizer(), adapters_dir=save_adapters(model, tmp_path / "adapters"))
    profile = tempfile.mkdtemp(prefix="chromium-profile-")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        f"--user-data-dir={profile}",
    ):
        options.add_argument(flag)
    with LiveServer(app) as live:
        expected = httpx.post(
            live.url + "/v1/completions",
            json={"model": "beta", "prompt": "the old king sang", "max_tokens": 8, "temperature": 0},
        ).json()["choices"][0]["text"]
        browser = webdriver.Chrome(service=Service(executable_path=driver_path), options=options)
        try:
            browser.get(live.url + "/")
            wait = WebDriverWait(browser, 30)
            wait.until(lambda b: b.find_element(By.ID, "status").text == "ready")
            choices = [o.get_attribute("value") for o in Select(browser.find_element(By.ID, "model")).options]
            assert choices == ["tiny-llama", "alpha", "beta", "gamma"]
            Select(browser.find_element(By.ID, "model")).select_by_value("beta")
            browser.find_element(By.ID, "prompt").send_keys("the old king sang")
            tokens = browser.find_element(By.ID, "max_tokens")
            tokens.clear()
            tokens.send_keys("8")
            browser.find_element(By.ID, "send").click()
            wait.until(lambda b: b.find_element(By.ID, "status").text.startswith("done"))
            streamed = browser.execute_script("return document.getElementById('output').textContent")
            assert streamed == expected
            assert browser.find_element(By.ID, "status").text in ("done (length)", "done (stop)")
        finally:
            browser.quit()
            shutil.rmtree(profile, ignore_errors=True)
