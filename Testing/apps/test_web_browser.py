"""The web app end to end in a real headless Chromium: paint two classes with the mouse, the
labels land in the project on disk, Train, the prediction appears, erase a wrong region of it,
copy it into the labels, correct, survive a killed engine, train again: Dice goes up.

Skips (saying why) without Chromium + chromedriver or the [web] extra. Screenshots of every
step go to out/web_e2e/ (printed at the end); figures are printed with -s.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest

from helpers_engine import tiny_models  # noqa: F401  (fixture)

pytest.importorskip("trame_slicer", reason="the [web] extra (trame-slicer) is not installed")
webdriver = pytest.importorskip("selenium.webdriver", reason="selenium (the [web] extra) is not installed")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
if not (CHROMIUM and CHROMEDRIVER):
    pytest.skip("Chromium and chromedriver are not installed (apt-get install chromium "
                "chromium-driver); the browser test is skipped", allow_module_level=True)

from selenium.webdriver.common.action_chains import ActionChains  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402

from semsegloop.data import imageio  # noqa: E402
from semsegloop.measure.metrics import dice_per_class  # noqa: E402
from semsegloop.project import Project  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
SCREENS = ROOT / "out" / "web_e2e"
SIZE = 128
DISKS = [(32, 32, 17), (88, 40, 19), (60, 98, 16)]
BAR = (slice(100, 112), slice(70, 122))      # bright like the disks, but background
BAR_ROWS = (101, 106, 111)                   # strokes that cover it
STEPS = 80


def _synthetic() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:SIZE, 0:SIZE]
    ref = np.full((SIZE, SIZE), 2, np.uint8)
    for cy, cx, r in DISKS:
        ref[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = 1
    bright = ref == 1
    bright[BAR] = True
    img = np.where(bright, 170, 80).astype(np.float32) + rng.normal(0, 15, (SIZE, SIZE))
    return np.clip(img, 0, 255).astype(np.uint8), ref


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(what: str, predicate, timeout: float, every: float = 0.05, page=None):
    """Poll ``predicate``; with ``page``, an error shown on the page fails at once."""
    deadline = time.perf_counter() + timeout
    while time.perf_counter() < deadline:
        if page is not None and page.text("error"):
            raise AssertionError(f"waiting for {what}, the page says: {page.text('error')}")
        value = predicate()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def _service_pids(project: Path) -> list[int]:
    """PIDs of `semsegloop serve <project>` processes (the web app's engine service)."""
    pids = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            argv = (d / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"serve" in argv and str(project).encode() in argv:
            pids.append(int(d.name))
    return pids


class Page:
    """The browser, with the few gestures the test needs."""

    def __init__(self, driver, screens: Path):
        self.d, self.screens, self.n = driver, screens, 0

    def shot(self, name: str) -> None:
        self.n += 1
        self.d.save_screenshot(str(self.screens / f"{self.n:02d}_{name}.png"))

    def click(self, element_id: str) -> None:
        # A JS click on the element itself: Vuetify hides radio inputs under their ripple.
        self.d.execute_script(f"document.getElementById('{element_id}').click()")

    def text(self, element_id: str) -> str:
        # Read in one script: Vue may replace the element between a find and a .text
        # (StaleElementReferenceException seen in CI).
        value = self.d.execute_script(
            "const e = document.getElementById(arguments[0]); return e ? e.innerText : '';",
            element_id)
        return (value or "").strip()

    def view(self):
        return self.d.find_elements(By.CSS_SELECTOR, "#views img")[0]

    def has_frame(self) -> bool:
        imgs = self.d.find_elements(By.CSS_SELECTOR, "#views img")
        return bool(imgs) and (imgs[0].get_attribute("src") or "").startswith(("blob:", "data:"))

    def stroke(self, pixels: list[tuple[float, float]]) -> float:
        """Drag the mouse through image pixels (row, col) on the slice view; returns the time of
        the mouse-up. The 2D view fits the image to its height, centred (Slicer's fit)."""
        img = self.view()
        w, h = img.size["width"], img.size["height"]
        scale = min(w, h) / SIZE

        def offset(p):
            return (int(round((p[1] + 0.5 - SIZE / 2) * scale)),
                    int(round((p[0] + 0.5 - SIZE / 2) * scale)))
        x0, y0 = offset(pixels[0])
        chain = ActionChains(self.d, duration=20).move_to_element_with_offset(img, x0, y0).click_and_hold()
        last = (x0, y0)
        for p in pixels[1:]:
            x, y = offset(p)
            chain = chain.move_by_offset(x - last[0], y - last[1]).pause(0.05)
            last = (x, y)
        chain.release().perform()
        return time.perf_counter()


def _changed(png_a: bytes, png_b: bytes) -> float:
    """Fraction of view pixels that changed between two screenshots."""
    import io

    from PIL import Image

    a, b = (np.asarray(Image.open(io.BytesIO(x)).convert("RGB"), np.int16) for x in (png_a, png_b))
    if a.shape != b.shape:
        return 1.0
    return float((np.abs(a - b).sum(axis=2) > 30).mean())


def _labels(project: Path) -> np.ndarray:
    f = project / "labels" / "tile.nrrd"
    return imageio.read_labels(f)[0][0] if f.exists() else np.zeros((SIZE, SIZE), np.uint8)


def _dice(project: Path, round_index: int, ref: np.ndarray) -> float:
    pred = imageio.read_labels(project / "predictions" / f"round_{round_index:03d}" / "tile.nrrd")[0]
    return float(np.nanmean(dice_per_class(pred, ref[None], 2)))


@pytest.fixture
def web_app(tmp_path, tiny_models):
    image, ref = _synthetic()
    proj = tmp_path / "project"
    p = Project.create(proj, ["disk", "background"], dims=2, preset="tiny2d")
    p.add_image(image, name="tile")
    p.close()                      # the web app's engine service is the project's writer
    port = _free_port()
    env = dict(os.environ, VTK_DEFAULT_OPENGL_WINDOW="vtkEGLRenderWindow", PYTHONUNBUFFERED="1")
    t0 = time.perf_counter()
    server = subprocess.Popen([sys.executable, "-m", "semsegloop", "web", str(proj), "--port", str(port),
                               "--device", "cpu"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              env=env, text=True, start_new_session=True)
    lines: list[str] = []

    def url():
        line = server.stdout.readline()
        lines.append(line)
        m = re.search(r"open (http://\S+)", line)
        if server.poll() is not None:
            raise AssertionError("web server ended:\n" + "".join(lines) + server.stdout.read())
        return m.group(1) if m else None
    page_url = _wait("the start-up URL", url, 120, every=0)
    log = tmp_path / "server.log"

    def drain():
        with open(log, "w") as f:
            for line in server.stdout:
                f.write(line)
                f.flush()
    import threading
    threading.Thread(target=drain, daemon=True).start()
    try:
        yield proj, ref, page_url, t0
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
        for pid in _service_pids(proj):
            os.kill(pid, signal.SIGKILL)
        if log.exists():
            print(log.read_text()[-3000:])


@pytest.fixture
def browser():
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    opts = Options()
    opts.binary_location = CHROMIUM
    profile = tempfile.mkdtemp(prefix="semsegloop-chromium-")
    for a in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
              "--disable-background-networking", "--disable-component-update", "--disable-sync",
              "--window-size=1400,900", f"--user-data-dir={profile}"):
        opts.add_argument(a)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    yield driver
    driver.quit()
    shutil.rmtree(profile, ignore_errors=True)


@pytest.mark.slow
def test_paint_train_correct_train_in_the_browser(web_app, browser):
    proj, ref, url, t0 = web_app
    shutil.rmtree(SCREENS, ignore_errors=True)
    SCREENS.mkdir(parents=True)
    page = Page(browser, SCREENS)
    figures = {}

    # Without the token the socket is refused: no view ever arrives.
    browser.get(url.split("?")[0] + "?secret=wrong")
    time.sleep(3)
    assert not browser.find_elements(By.CSS_SELECTOR, "#views img[src^='blob:'], #views img[src^='data:']")

    browser.get(url)
    _wait("the first frame", page.has_frame, 60)
    figures["start-up to first frame (s)"] = time.perf_counter() - t0
    page.shot("first_frame")

    # Paint: class 1 across two disks, class 2 in the background, with the mouse. Each stroke
    # waits for its labels on disk, so a class switch never overtakes a stroke still in flight.
    saves = []

    def paint(pixels):
        before = _labels(proj)
        up = page.stroke(pixels)
        _wait("the stroke in the labels on disk",
              lambda: not np.array_equal(_labels(proj), before), 20, every=0.005)
        saves.append(time.perf_counter() - up)

    page.click("effect-paint")
    page.click("class-1")
    time.sleep(0.3)
    paint([(32, 22), (32, 32), (32, 42)])
    paint([(88, 28), (88, 40), (88, 52)])
    page.click("class-2")
    time.sleep(0.3)
    paint([(8, 10), (8, 60), (8, 118)])
    paint([(60, 60), (40, 70), (20, 80)])
    figures["mouse-up to labels on disk, median of 4 (s)"] = float(np.median(saves))
    lab = _labels(proj)
    assert {1, 2} <= set(np.unique(lab).tolist())
    assert (ref[lab == 1] == 1).mean() > 0.9 and (ref[lab == 2] == 2).mean() > 0.9, \
        "strokes landed off their regions"
    page.shot("painted")
    painted_view = page.view().screenshot_as_png

    # Train: progress, then the prediction segments on the view.
    t_train = time.perf_counter()
    # A fixed number of steps, so the rounds do not depend on the machine's load.
    steps = browser.find_element(By.ID, "train-steps")   # Vuetify puts the id on the <input>
    steps.send_keys(Keys.CONTROL, "a")
    steps.send_keys(str(STEPS))
    _wait("the steps typed", lambda: steps.get_attribute("value") == str(STEPS), 5)
    steps.send_keys(Keys.TAB)
    time.sleep(1.0)    # the typed value reaches the server before the click (state sync)
    page.click("train")
    _wait("training progress", lambda: "step" in page.text("status"), 120, page=page)
    assert Project.open(proj, read_only=True).round == 0
    page.shot("training")
    _wait("round 1 shown", lambda: "round 1 shown" in page.text("prediction-shown"), 600, page=page)
    figures["Train to first prediction shown (s)"] = time.perf_counter() - t_train
    time.sleep(0.5)
    page.shot("prediction_round1")
    assert _changed(painted_view, page.view().screenshot_as_png) > 0.3, "no prediction on the view"
    dice1 = _dice(proj, 1, ref)
    assert page.text("error") == ""

    # Erase the wrong region of the prediction (the bright bar called disk), copy the rest,
    # then paint what the bar is.
    page.click("edit-prediction")
    page.click("effect-erase")
    page.click("class-1")
    time.sleep(0.5)
    def edits() -> int:
        m = re.search(r"edited (\d+)", page.text("prediction-shown"))
        return int(m.group(1)) if m else 0

    for row in BAR_ROWS:
        before = edits()
        page.stroke([(row, 66), (row, 96), (row, 126)])
        _wait("the prediction edited", lambda: edits() > before, 20)
    page.shot("prediction_erased")
    page.click("edit-labels")
    page.click("copy-prediction")
    _wait("copied labels on disk", lambda: (_labels(proj) > 0).mean() > 0.5, 20, page=page)
    lab = _labels(proj)
    assert (lab[BAR] != 1).mean() > 0.9, "the erased region was copied into the labels"
    assert (lab[ref == 1] == 1).mean() > 0.5, "the prediction was not copied"
    page.click("effect-paint")
    page.click("class-2")
    time.sleep(0.3)
    for row in BAR_ROWS:
        paint([(row, 66), (row, 96), (row, 126)])
    assert (_labels(proj)[BAR] == 2).mean() > 0.9
    page.shot("corrected")

    # A killed engine is reported on the page and the next request starts a new one.
    pids = _service_pids(proj)
    assert pids, "no engine service process found"
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    _wait("the crash on the page", lambda: "engine" in page.text("error"), 20)
    page.shot("engine_killed")

    page.click("train")
    _wait("the crash message to clear", lambda: not page.text("error"), 10)
    _wait("round 2 shown", lambda: "round 2 shown" in page.text("prediction-shown"), 600, page=page)
    time.sleep(0.5)
    page.shot("prediction_round2")
    dice2 = _dice(proj, 2, ref)
    figures["Dice round 1"], figures["Dice round 2"] = dice1, dice2
    print("\nweb e2e figures (2 shared CPU cores): " +
          ", ".join(f"{k} {v:.3f}" for k, v in figures.items()))
    print(f"screenshots: {SCREENS}")
    assert dice2 > dice1, f"round 2 Dice {dice2:.3f} is not above round 1 {dice1:.3f}"
    assert Project.open(proj, read_only=True).round == 2
