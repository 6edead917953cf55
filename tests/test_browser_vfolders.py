"""The vfolder story in JupyterLab, in headless Chromium, against the real gateway, agent and Docker.

A user uploads a CSV in the file browser (large enough that JupyterLab sends it in chunks),
starts a Backend.AI notebook next to it, reads the CSV from the kernel, writes a result file and
saves. The result and the notebook appear in the file browser, are on the vfolder, and the
notebook reopened shows its outputs. Screenshots of each step go to the test artifacts
(``$BAI_TEST_ARTIFACTS``, default ``test-artifacts/`` in the repository).
"""

from __future__ import annotations

import json
import os
import urllib.parse
from collections.abc import Iterator
from pathlib import Path

import pytest
from selenium.webdriver import ActionChains
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support import expected_conditions as ec
from selenium.webdriver.support.ui import WebDriverWait

from backendai_jupyter.common.wire import KERNEL_HOME

from .stack import Stack, eventually, jupyter
from .test_browser import CARD

pytestmark = pytest.mark.docker
TOKEN = "vfolder-story-token"
CM = "backendai_jupyter.provisioner.contents.VFolderContentsManager"
ROWS = 40_000  # about 1.3 MB: JupyterLab uploads files over 1 MB in chunks


@pytest.fixture
def artifacts(request: pytest.FixtureRequest) -> Path:
    root = Path(os.environ.get("BAI_TEST_ARTIFACTS", Path(__file__).parent.parent / "test-artifacts"))
    path = root / request.node.name
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture
def story_vfolder(stack: Stack) -> Iterator[dict]:
    vf = stack.api("POST", "/v1/vfolders", {"name": "story"})
    try:
        yield vf
    finally:
        stack.api.request("DELETE", f"/v1/vfolders/{vf['id']}?force=1")
        stack.api.request("POST", f"/v1/vfolders/{vf['id']}/purge")


@pytest.fixture
def lab(stack: Stack, tmp_path: Path) -> Iterator[str]:
    with jupyter("lab", tmp_path, TOKEN, f"--ServerApp.contents_manager_class={CM}") as url:
        yield url


def test_upload_a_csv_run_a_notebook_on_it_and_find_everything_saved(
    stack: Stack,
    story_vfolder: dict,
    lab: str,
    browser,
    artifacts: Path,
    tmp_path: Path,
):
    csv = tmp_path / "measurements.csv"
    csv.write_text("x,y\n" + "".join(f"{i},{i * 2}\n" for i in range(ROWS)))
    step = iter(range(1, 100))

    def shot(name: str) -> None:
        browser.save_screenshot(str(artifacts / f"{next(step):02d}-{name}.png"))

    wait = WebDriverWait(browser, 90)
    browser.get(f"{lab}/lab/tree/story?token={TOKEN}")
    try:
        _story(stack, story_vfolder, browser, wait, csv, shot)
    finally:
        shot("last")


def _upload(browser, path: Path) -> None:
    """Drop a file on the file browser, as a user dragging it there from the desktop does.

    JupyterLab's Upload button opens an ``<input type=file>`` that is never in the page, so a
    test cannot hand it a file; a drop goes through the same upload code (in chunks when big).
    """
    picker = browser.execute_script(
        "const i = document.createElement('input'); i.type = 'file'; i.id = 'test-upload';"
        "i.style.display = 'none'; document.body.appendChild(i); return i;"
    )
    picker.send_keys(str(path))
    # The drop carries the files alone (no directory entries), which JupyterLab uploads as they are.
    browser.execute_script(
        "const files = document.getElementById('test-upload').files;"
        "const drop = new Event('drop', {bubbles: true, cancelable: true});"
        "Object.defineProperty(drop, 'dataTransfer', {value: {files: files}});"
        "document.querySelector('.jp-FileBrowser .jp-DirListing-content').dispatchEvent(drop);"
    )


def _listed(browser) -> list[str]:
    items = browser.find_elements(By.CSS_SELECTOR, ".jp-FileBrowser .jp-DirListing-itemText")
    return [i.text for i in items]


def _refresh(browser) -> None:
    browser.find_element(By.CSS_SELECTOR, '.jp-FileBrowser [data-command="filebrowser:refresh"]').click()


def _story(stack: Stack, vf: dict, browser, wait: WebDriverWait, csv: Path, shot) -> None:
    # The file browser opens in the vfolder (empty).
    wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, ".jp-FileBrowser .jp-DirListing-content")))
    wait.until(lambda b: "story" in b.find_element(By.CSS_SELECTOR, ".jp-FileBrowser .jp-BreadCrumbs").text)
    shot("vfolder-open")

    # Upload the CSV through the file browser's upload input (what its Upload button opens).
    _upload(browser, csv)
    wait.until(lambda b: csv.name in _listed(b))
    shot("csv-uploaded")
    vid = vf["id"]
    stat = eventually(lambda: _stat(stack, vid, csv.name), timeout=60)
    assert stat["size"] == csv.stat().st_size

    # A Backend.AI notebook next to it, from the launcher.
    browser.find_element(By.CSS_SELECTOR, '.jp-FileBrowser [data-command="launcher:create"]').click()
    # JupyterLab opens with a launcher already: the card to click is the one on show.
    card = wait.until(
        lambda b: next(
            (
                c
                for c in b.find_elements(By.CSS_SELECTOR, f'.jp-LauncherCard[title="{CARD}"]')
                if c.is_displayed()
            ),
            False,
        )
    )
    card.click()
    wait.until(ec.presence_of_element_located((By.XPATH, f"//*[contains(text(), '{CARD} | Idle')]")))
    shot("notebook-started")
    editor = wait.until(ec.element_to_be_clickable((By.CSS_SELECTOR, ".jp-Cell .cm-content")))
    editor.click()
    editor.send_keys(
        "import csv, os; rows = list(csv.DictReader(open('measurements.csv'))); "
        "total = sum(int(r['y']) for r in rows); open('result.txt', 'w').write(f'{len(rows)} {total}\\n'); "
        "print('rows:', len(rows), 'cwd:', os.getcwd())"
    )
    editor.send_keys(Keys.SHIFT, Keys.ENTER)
    expected = f"rows: {ROWS} cwd: {KERNEL_HOME}/story"
    wait.until(ec.text_to_be_present_in_element((By.CSS_SELECTOR, ".jp-OutputArea-output"), expected))
    shot("cell-ran")
    # Save (Ctrl+S) and wait until the notebook is clean.
    browser.find_element(By.CSS_SELECTOR, ".jp-NotebookPanel").click()
    browser.find_element(By.TAG_NAME, "body").send_keys(Keys.CONTROL, "s")
    # JupyterLab 4 offers to rename an untitled notebook on its first save: keep the name.
    first_save = wait.until(
        lambda b: (
            b.find_elements(By.CSS_SELECTOR, ".jp-Dialog .jp-mod-accept")
            or not b.find_elements(By.CSS_SELECTOR, ".jp-mod-current.jp-mod-dirty")
        )
    )
    if isinstance(first_save, list):
        first_save[0].click()
    wait.until(lambda b: not b.find_elements(By.CSS_SELECTOR, ".jp-mod-current.jp-mod-dirty"))
    shot("saved")

    # The result file and the notebook are in the file browser, and on the vfolder.
    _refresh(browser)
    wait.until(lambda b: {"result.txt", "Untitled.ipynb", csv.name} <= set(_listed(b)))
    shot("files-listed")
    total = sum(i * 2 for i in range(ROWS))
    assert _download(stack, vid, "result.txt") == f"{ROWS} {total}\n".encode()
    saved = json.loads(_download(stack, vid, "Untitled.ipynb"))
    outputs = saved["cells"][0]["outputs"]
    assert any(expected in "".join(o.get("text", "")) for o in outputs), outputs

    # Closed and reopened from the file browser, the notebook shows its output.
    close = browser.find_element(
        By.CSS_SELECTOR, "#jp-main-dock-panel .lm-TabBar-tab.jp-mod-current .lm-TabBar-tabCloseIcon"
    )
    close.click()
    wait.until(lambda b: not b.find_elements(By.CSS_SELECTOR, ".jp-NotebookPanel"))
    shot("closed")
    item = wait.until(
        ec.element_to_be_clickable(
            (By.XPATH, "//*[contains(@class, 'jp-DirListing-itemText')][.//text()='Untitled.ipynb']")
        )
    )
    ActionChains(browser).double_click(item).perform()
    wait.until(ec.text_to_be_present_in_element((By.CSS_SELECTOR, ".jp-OutputArea-output"), expected))
    shot("reopened")


def _stat(stack: Stack, vid: str, path: str) -> dict | None:
    resp = stack.api.request("GET", f"/v1/vfolders/{vid}/stat?path={urllib.parse.quote(path)}")
    return resp.json() if resp.status_code == 200 else None


def _download(stack: Stack, vid: str, path: str) -> bytes:
    resp = stack.api.raw("GET", f"/v1/vfolders/{vid}/download?path={urllib.parse.quote(path)}")
    assert resp.status_code == 200, resp.text
    return resp.content
