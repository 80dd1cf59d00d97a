"""multidiff edit in a real browser (issue 24): Chromium driven through WebDriver (Debian's chromium and
chromium-driver, PyPI's selenium) on a copy of scenes/living_room.yaml with tiny-random. A box dragged 64 px
right, another resized, a prompt typed: the YAML file holds the new boxes and prompt with its comments, and a
preview picture appears on the page. Skipped, with the reason, where no browser or selenium is installed.

MULTIDIFF_EDITOR_SCREENSHOT=docs/editor.png also writes the page's screenshot there (the README's)."""
from __future__ import annotations

import os
import re
import secrets
import shutil
import threading
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

pytest.importorskip("starlette", reason="multidiff edit needs the editor extra: pip install -e '.[edit,test]'")
pytest.importorskip("selenium", reason="the browser test needs selenium: pip install selenium")

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
if not (CHROMIUM and CHROMEDRIVER):
    pytest.skip("the browser test needs Chromium and its driver: apt-get install chromium chromium-driver",
                allow_module_level=True)

import uvicorn  # noqa: E402
from selenium import webdriver  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.action_chains import ActionChains  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

from multidiff_cli.edit.server import bind, create_app  # noqa: E402
from multidiff_cli.edit.session import Editor  # noqa: E402
from multidiff_cli.run.batch import RunSettings  # noqa: E402

EXAMPLE = Path(__file__).resolve().parents[1] / "scenes" / "living_room.yaml"
SCREENSHOT = os.environ.get("MULTIDIFF_EDITOR_SCREENSHOT")
SCREENSHOT = Path(SCREENSHOT).resolve() if SCREENSHOT else None  # from where pytest started


@pytest.fixture(autouse=True)
def one_torch_thread():
    """tiny-random gains nothing from a second thread; on a busy 2-core machine two threads spin for each other."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def served(tmp_path, monkeypatch):
    """The editor on a copy of the living room, served by uvicorn on 127.0.0.1 in this process: (url, file)."""
    monkeypatch.chdir(tmp_path)  # the page names the file as given: living_room.yaml
    scene = tmp_path / "living_room.yaml"
    shutil.copy(EXAMPLE, scene)
    editor = Editor(Path(scene.name), RunSettings(device="cpu"), model="tiny-random", preview_steps=2, debounce_s=0.3)
    sock = bind(0)
    port = sock.getsockname()[1]
    token = secrets.token_urlsafe(16)
    server = uvicorn.Server(uvicorn.Config(create_app(editor, token, port), log_level="warning", lifespan="off",
                                           timeout_graceful_shutdown=1))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    editor.start()
    try:
        yield f"http://127.0.0.1:{port}/?token={token}", scene
    finally:
        server.should_exit = True
        thread.join(10)
        editor.stop()
        sock.close()


@pytest.fixture
def browser():
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                     "--window-size=1400,900", "--no-first-run", "--disable-extensions"):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()


def wait_for(what, timeout=60, every=0.2):
    """what() once it is true, else fail after `timeout` seconds."""
    ends = time.monotonic() + timeout
    while time.monotonic() < ends:
        value = what()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out waiting for {what.__doc__ or what}")


def boxes(driver):
    return driver.find_elements(By.CSS_SELECTOR, "#layers .box")


def test_drag_resize_and_type_write_the_scene_file_and_a_preview_appears(served, browser, tmp_path):
    url, scene = served
    browser.get(url)
    WebDriverWait(browser, 30).until(lambda d: len(boxes(d)) == 3)
    canvas = browser.find_element(By.ID, "canvas")
    scale = canvas.size["width"] / 512  # screen px per scene px

    # the sofa's box, 64 px to the right
    ActionChains(browser).click_and_hold(boxes(browser)[0]).move_by_offset(round(64 * scale), 0).release().perform()

    def moved():
        """the sofa's new box in the file"""
        return "box: [192, 272, 448, 448]" in scene.read_text()

    wait_for(moved, 20)

    # the painting's box, its lower right corner 32 px left and down
    handle = boxes(browser)[2].find_element(By.CSS_SELECTOR, '.handle[data-edge="se"]')
    ActionChains(browser).click_and_hold(handle).move_by_offset(round(-32 * scale), round(32 * scale)).release().perform()

    def resized():
        """the painting's new box in the file"""
        return "box: [336, 48, 448, 208]" in scene.read_text()

    wait_for(resized, 20)

    prompt = browser.find_element(By.CSS_SELECTOR, 'textarea[data-field="regions[1].prompt"]')
    prompt.clear()
    prompt.send_keys("a tall fern in a blue pot")

    def typed():
        """the new prompt in the file"""
        return "- prompt: a tall fern in a blue pot\n" in scene.read_text()

    wait_for(typed, 20)

    text = scene.read_text()
    assert text.startswith("# The seed article's cover picture")
    assert "    box: [192, 272, 448, 448]      # x0, y0, x1, y1 in pixels, origin top-left\n" in text
    assert "a houseplant in a terracotta pot" not in text and "a framed oil painting of a sailing ship" in text
    assert re.findall(r"^(\w+):", text, re.M) == [
        "prompt", "negative_prompt", "width", "height", "steps", "bootstrap_steps", "guidance_scale", "seed", "regions"]

    def previewed():
        """the final preview picture on the page"""
        src = browser.find_element(By.ID, "picture").get_attribute("src") or ""
        state = browser.find_element(By.ID, "preview-state").text
        return src.startswith("data:image/png;base64,") and state.startswith("preview: 2 steps on tiny-random")

    wait_for(previewed, 120)
    assert browser.find_element(By.ID, "saved").text in ("saved", "no change")
    assert browser.find_element(By.ID, "problems").text == ""

    shot = tmp_path / "editor.png"
    browser.save_screenshot(str(shot))
    assert shot.stat().st_size > 0
    if SCREENSHOT:  # 256 colours: a quarter of the bytes, for the repository
        from PIL import Image

        SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
        with Image.open(shot) as image:
            image.convert("RGB").quantize(256).save(SCREENSHOT, optimize=True)
