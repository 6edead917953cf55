"""JupyterLab in a real (headless) browser: the launcher shows our kernel, and code runs in a container."""

from __future__ import annotations

from pathlib import Path

import pytest
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support import expected_conditions as ec
from selenium.webdriver.support.ui import WebDriverWait

from .stack import Stack, eventually, jupyter

pytestmark = pytest.mark.docker
TOKEN = "browser-test-token"
CARD = "Python 3 (Backend.AI)"


@pytest.fixture
def lab(stack: Stack, tmp_path: Path):
    with jupyter("lab", tmp_path, TOKEN) as url:
        yield url


def test_launcher_card_starts_a_kernel_in_a_container_and_runs_a_cell(
    stack: Stack, lab: str, browser, tmp_path
):
    before = len(stack.containers())
    browser.get(f"{lab}/lab?token={TOKEN}")
    try:
        _use_the_launcher(stack, browser, before)
    finally:
        browser.save_screenshot(str(tmp_path / "lab.png"))


def _use_the_launcher(stack: Stack, browser, before: int) -> None:
    wait = WebDriverWait(browser, 60)
    card = wait.until(ec.element_to_be_clickable((By.CSS_SELECTOR, f'.jp-LauncherCard[title="{CARD}"]')))
    card.click()
    # The notebook opens with our kernel; wait until it is idle (started in its container).
    wait.until(ec.presence_of_element_located((By.XPATH, f"//*[contains(text(), '{CARD} | Idle')]")))
    eventually(lambda: len(stack.containers()) == before + 1, timeout=30)
    editor = wait.until(ec.element_to_be_clickable((By.CSS_SELECTOR, ".jp-Cell .cm-content")))
    editor.click()
    editor.send_keys("import os; print('in container:', os.path.exists('/.dockerenv'))")
    editor.send_keys(Keys.SHIFT, Keys.ENTER)
    wait.until(
        ec.text_to_be_present_in_element((By.CSS_SELECTOR, ".jp-OutputArea-output"), "in container: True")
    )
