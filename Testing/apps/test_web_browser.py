"""The web app end to end in a real headless Chromium, as a person uses it.

One app on a two-image 2D project (started once for the module's tests, in file order): Draw,
threshold-masked Paint and Smoothing land in the project's labels; paint two classes with the
mouse, Train, the prediction appears, erase a wrong region of it, copy it into the labels,
correct, survive a killed engine, train again: Dice goes up; Predict current / all, the
uncertainty overlay on and off, Export, Class fractions (table + CSV download), class edits.
A second app starts with no project on a non-loopback host: the socket refuses a wrong token
(plain WebSocket), and a 3D project made from the page shows three slice views.

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
DISKS2 = [(40, 40, 22), (90, 90, 24)]        # the second image (Draw, threshold, smoothing)
BAR = (slice(100, 112), slice(70, 122))      # bright like the disks, but background
BAR_ROWS = (101, 106, 111)                   # strokes that cover it
STEPS = 80
FIGURES: dict[str, tuple[float, float]] = {}   # name: (value, 1-min load average then)


def _synthetic(disks=DISKS, bar=True, seed=0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:SIZE, 0:SIZE]
    ref = np.full((SIZE, SIZE), 2, np.uint8)
    for cy, cx, r in disks:
        ref[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = 1
    bright = ref == 1
    if bar:
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
    """The browser, with the few gestures the tests need."""

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

    def type(self, element_id: str, value, settle: float = 0.6) -> None:
        """Type into a text field as a person does (select all, type, Tab away); waits until
        the typed value reached the server (trame syncs state after the input event)."""
        # Vuetify puts the id on the <input>; a field under v-if appears a moment after its switch.
        field = _wait(f"the field {element_id}", lambda: self.d.find_elements(By.ID, element_id), 5)[0]
        field.send_keys(Keys.CONTROL, "a")
        field.send_keys(str(value))
        _wait(f"'{value}' typed into {element_id}", lambda: field.get_attribute("value") == str(value), 5)
        field.send_keys(Keys.TAB)
        time.sleep(settle)

    def brush(self, value: float) -> None:
        """Set the brush size with the keyboard on the slider's thumb (steps of 0.5 %)."""
        thumb = self.d.find_element(By.CSS_SELECTOR, "#brush-size .v-slider-thumb, .v-slider-thumb")
        now = float(thumb.get_attribute("aria-valuenow"))
        steps = int(round((value - now) / 0.5))
        thumb.click()
        thumb.send_keys(*([Keys.ARROW_RIGHT if steps > 0 else Keys.ARROW_LEFT] * abs(steps)))
        _wait(f"brush {value}", lambda: float(thumb.get_attribute("aria-valuenow")) == value, 5)
        time.sleep(0.6)   # the value reaches the server

    def active(self, element_id: str) -> bool:
        return bool(self.d.execute_script(
            "const e = document.getElementById(arguments[0]);"
            "return !!e && e.classList.contains('v-list-item--active');", element_id))

    def views(self):
        return self.d.find_elements(By.CSS_SELECTOR, "#views img")

    def view(self):
        return self.views()[0]

    def frames(self) -> int:
        """How many slice views show a rendered frame."""
        return sum((img.get_attribute("src") or "").startswith(("blob:", "data:")) for img in self.views())

    def has_frame(self) -> bool:
        return self.frames() > 0

    def edits(self) -> int:
        m = re.match(r"(\d+) label edits", self.text("labels-edits"))
        return int(m.group(1)) if m else -1

    def stroke(self, pixels: list[tuple[float, float]], size: int = SIZE, view=None,
               pause: float = 0.05) -> float:
        """Drag the mouse through image pixels (row, col) on a slice view; returns the time of
        the mouse-up. A view fits the image to its shorter side, centred (Slicer's fit)."""
        img = view if view is not None else self.view()
        w, h = img.size["width"], img.size["height"]
        scale = min(w, h) / size

        def offset(p):
            return (int(round((p[1] + 0.5 - size / 2) * scale)),
                    int(round((p[0] + 0.5 - size / 2) * scale)))
        x0, y0 = offset(pixels[0])
        chain = ActionChains(self.d, duration=20).move_to_element_with_offset(img, x0, y0).click_and_hold()
        last = (x0, y0)
        for p in pixels[1:]:
            x, y = offset(p)
            chain = chain.move_by_offset(x - last[0], y - last[1]).pause(pause)
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


def _labels(project: Path, image_id: str = "tile") -> np.ndarray:
    f = project / "labels" / f"{image_id}.nrrd"
    return imageio.read_labels(f)[0][0] if f.exists() else np.zeros((SIZE, SIZE), np.uint8)


def _dice(project: Path, round_index: int, ref: np.ndarray) -> float:
    pred = imageio.read_labels(project / "predictions" / f"round_{round_index:03d}" / "tile.nrrd")[0]
    return float(np.nanmean(dice_per_class(pred, ref[None], 2)))


def _figure(name: str, value: float) -> None:
    FIGURES[name] = (value, os.getloadavg()[0])


def _print_figures():
    print("\nweb e2e figures (2 shared CPU cores; value, load average when measured): " +
          ", ".join(f"{k} {v:.3f} (load {load:.1f})" for k, (v, load) in FIGURES.items()))
    print(f"screenshots: {SCREENS}")


class WebServer:
    """`semsegloop web ...` as a child process: its URL, start time and log."""

    def __init__(self, args: list[str], log: Path):
        env = dict(os.environ, VTK_DEFAULT_OPENGL_WINDOW="vtkEGLRenderWindow", PYTHONUNBUFFERED="1")
        self.port = _free_port()
        self.t0 = time.perf_counter()
        self.proc = subprocess.Popen([sys.executable, "-m", "semsegloop", "web", *args,
                                      "--port", str(self.port), "--device", "cpu"],
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env,
                                     text=True, start_new_session=True)
        self.lines: list[str] = []
        self.url = _wait("the start-up URL", self._url_line, 120, every=0)
        self.log = log
        import threading
        threading.Thread(target=self._drain, daemon=True).start()
        _wait("the server listening", self._listening, 60, every=0.1)   # the URL comes first

    def _listening(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"web server ended; see {self.log}")
        try:
            socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
            return True
        except OSError:
            return False

    def _url_line(self):
        line = self.proc.stdout.readline()
        self.lines.append(line)
        if self.proc.poll() is not None:
            raise AssertionError("web server ended:\n" + "".join(self.lines) + self.proc.stdout.read())
        m = re.search(r"open (http://\S+)", line)
        return m.group(1) if m else None

    def _drain(self):
        with open(self.log, "w") as f:
            for line in self.proc.stdout:
                f.write(line)
                f.flush()

    def stop(self, projects=()):
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
        for proj in projects:
            for pid in _service_pids(proj):
                os.kill(pid, signal.SIGKILL)
        if self.log.exists():
            print(self.log.read_text()[-3000:])


@pytest.fixture(scope="module")
def app2d(tmp_path_factory, tiny_models):
    tmp = tmp_path_factory.mktemp("web2d")
    image, ref = _synthetic()
    image2, ref2 = _synthetic(DISKS2, bar=False, seed=1)
    proj = tmp / "project"
    p = Project.create(proj, ["disk", "background"], dims=2, preset="tiny2d")
    p.add_image(image, name="tile")
    p.add_image(image2, name="tile2")
    p.close()                      # the web app's engine service is the project's writer
    server = WebServer([str(proj)], tmp / "server.log")
    try:
        yield {"proj": proj, "ref": ref, "image2": image2, "ref2": ref2, "server": server,
               "tmp": tmp}
    finally:
        server.stop([proj])


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    opts = Options()
    opts.binary_location = CHROMIUM
    profile = tempfile.mkdtemp(prefix="semsegloop-chromium-")
    downloads = tmp_path_factory.mktemp("downloads")
    for a in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
              "--disable-background-networking", "--disable-component-update", "--disable-sync",
              "--window-size=1400,900", f"--user-data-dir={profile}"):
        opts.add_argument(a)
    opts.add_experimental_option("prefs", {"download.default_directory": str(downloads),
                                           "download.prompt_for_download": False})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    driver.downloads = downloads
    yield driver
    driver.quit()
    shutil.rmtree(profile, ignore_errors=True)


@pytest.fixture(scope="module")
def page(app2d, browser):
    shutil.rmtree(SCREENS, ignore_errors=True)
    SCREENS.mkdir(parents=True)
    url = app2d["server"].url
    # Without the token the socket is refused: no view ever arrives.
    browser.get(url.split("?")[0] + "?secret=wrong")
    time.sleep(3)
    assert not browser.find_elements(By.CSS_SELECTOR, "#views img[src^='blob:'], #views img[src^='data:']")
    browser.get(url)
    pg = Page(browser, SCREENS)
    _wait("the first frame", pg.has_frame, 60)
    _figure("start-up to first frame (s)", time.perf_counter() - app2d["server"].t0)
    pg.shot("first_frame")
    return pg


def _open_image(page: Page, image_id: str) -> None:
    before = page.view().screenshot_as_png
    page.click(f"image-{image_id}")
    _wait(f"image {image_id} selected", lambda: page.active(f"image-{image_id}"), 10)
    _wait(f"image {image_id} on the view", lambda: _changed(before, page.view().screenshot_as_png) > 0.05, 10)


def _use(page: Page, effect: str, klass: int) -> None:
    page.click(f"effect-{effect}")
    page.click(f"class-{klass}")
    time.sleep(0.4)


def _ring(cy, cx, r, n=12):
    return [(cy + r * np.sin(a), cx + r * np.cos(a)) for a in np.linspace(0, 2 * np.pi, n + 1)]


@pytest.mark.slow
def test_draw_threshold_and_smoothing_land_in_the_labels(app2d, page):
    proj, img2, ref2 = app2d["proj"], app2d["image2"], app2d["ref2"]
    _open_image(page, "tile2")
    page.shot("tile2")

    def edit(pixels, what, pause=0.05):
        before, n = _labels(proj, "tile2"), page.edits()
        page.stroke(pixels, pause=pause)
        _wait(f"{what} on the page", lambda: page.edits() > n, 20, every=0.01, page=page)
        _wait(f"{what} in the labels on disk",
              lambda: not np.array_equal(_labels(proj, "tile2"), before), 20, every=0.01, page=page)
        return before, _labels(proj, "tile2")

    # Draw: a closed outline inside the first disk fills it (Slicer's Draw effect). The outline
    # is drawn slowly: the page merges mouse moves while the server is busy (trame-rca's event
    # queue), and Draw makes a vertex of each move that arrives.
    (cy, cx, r) = DISKS2[0]
    _use(page, "draw", 1)
    _, lab = edit(_ring(cy, cx, r - 8, n=24), "the drawn outline", pause=0.15)
    yy, xx = np.mgrid[0:SIZE, 0:SIZE]
    inside = (yy - cy) ** 2 + (xx - cx) ** 2 < (r - 11) ** 2
    assert (lab[inside] == 1).mean() > 0.9, "Draw did not fill its outline"
    assert (lab == 1).sum() < 1.3 * np.pi * (r - 8) ** 2 and (ref2[lab == 1] == 1).all()
    page.shot("drawn")
    # A speck (one click of a small brush) for the smoothing brush, and one for "Smooth
    # segment": a 9 mm median removes both.
    _use(page, "paint", 1)
    page.brush(2.0)
    specks = [(cy + 2, cx + r + 12), (cy + r + 12, cx + 2)]
    for sy, sx in specks:
        edit([(sy, sx)], "a speck")
    lab = _labels(proj, "tile2")
    for sy, sx in specks:
        assert 3 <= lab[sy - 4:sy + 5, sx - 4:sx + 5].sum() == (lab[sy - 6:sy + 7, sx - 6:sx + 7] == 1).sum() < 30, \
            "the speck is not a small dot"
    page.brush(5.0)

    # Threshold-masked painting: a stroke from inside the second disk out into the background
    # paints only where the image is within [135, 255], i.e. inside the disk.
    (cy, cx, r) = DISKS2[1]
    _use(page, "paint", 1)
    page.click("mask-on")
    page.type("mask-min", 135)
    page.type("mask-max", 255)
    before, lab = edit([(cy, cx - r + 10), (cy, cx - r), (cy, cx - r - 12)], "the masked stroke")
    new = (lab == 1) & (before != 1)
    assert new.sum() > 30, "the masked stroke painted (almost) nothing"
    assert (img2[new] >= 135).all(), "masked painting painted pixels darker than the threshold"
    assert (ref2[new] == 2).sum() < 5 and new[cy - 2:cy + 3, cx - r - 12:cx - r - 3].sum() == 0, \
        "the mask did not stop the stroke at the disk's edge"
    page.click("mask-on")
    time.sleep(0.4)
    page.shot("masked_paint")
    _use(page, "paint", 2)    # and some background, unmasked
    before, lab = edit([(10, 10), (10, 60), (10, 118)], "a background stroke")
    assert ((lab == 2) & (ref2 == 1)).sum() == 0 and ((lab == 2) & (img2 < 135)).sum() > 100

    # Smoothing: the brush smooths under the stroke (median); the button smooths the segment.
    _use(page, "smoothing", 1)
    page.type("smoothing-kernel", 9)
    sy, sx = specks[0]
    before, lab = edit([(sy, sx - 4), (sy, sx), (sy, sx + 4)], "smoothing under the brush")
    assert not lab[sy - 4:sy + 5, sx - 4:sx + 5].any(), "the smoothing brush left the speck"
    assert lab[specks[1][0] - 4:specks[1][0] + 5, specks[1][1] - 4:specks[1][1] + 5].any(), \
        "the smoothing brush reached beyond the stroke"
    n = page.edits()
    page.click("smooth-segment")
    _wait("the segment smoothed", lambda: page.edits() > n, 20, page=page)
    sy, sx = specks[1]
    _wait("the smoothed segment on disk",
          lambda: not _labels(proj, "tile2")[sy - 4:sy + 5, sx - 4:sx + 5].any(), 20, page=page)
    lab = _labels(proj, "tile2")
    assert (lab[inside] == 1).mean() > 0.9, "smoothing removed the drawn region"
    page.shot("smoothed")
    _use(page, "none", 1)


@pytest.mark.slow
def test_paint_train_correct_train_in_the_browser(app2d, page, browser):
    proj, ref = app2d["proj"], app2d["ref"]
    _open_image(page, "tile")

    # Paint: class 1 across two disks, class 2 in the background, with the mouse. Each stroke
    # waits for the page to count the labelmap change, then for its labels on disk, so a class
    # switch never overtakes a stroke still in flight.
    changes, saves = [], []

    def paint(pixels):
        before, n = _labels(proj), page.edits()
        up = page.stroke(pixels)
        _wait("the labelmap changed", lambda: page.edits() > n, 20, every=0.005)
        changes.append(time.perf_counter() - up)
        _wait("the stroke in the labels on disk",
              lambda: not np.array_equal(_labels(proj), before), 20, every=0.005)
        saves.append(time.perf_counter() - up)

    _use(page, "paint", 1)
    paint([(32, 22), (32, 32), (32, 42)])
    paint([(88, 28), (88, 40), (88, 52)])
    page.click("class-2")
    time.sleep(0.3)
    paint([(8, 10), (8, 60), (8, 118)])
    paint([(60, 60), (40, 70), (20, 80)])
    _figure("mouse-up to labelmap changed on the page, median of 4 (s)", float(np.median(changes)))
    _figure("mouse-up to labels on disk, median of 4 (s)", float(np.median(saves)))
    lab = _labels(proj)
    assert {1, 2} <= set(np.unique(lab).tolist())
    assert (ref[lab == 1] == 1).mean() > 0.9 and (ref[lab == 2] == 2).mean() > 0.9, \
        "strokes landed off their regions"
    page.shot("painted")
    painted_view = page.view().screenshot_as_png

    # Train: progress, then the prediction segments on the view.
    # A fixed number of steps, so the rounds do not depend on the machine's load.
    page.type("train-steps", STEPS, settle=1.0)
    t_train = time.perf_counter()
    page.click("train")
    _wait("training progress", lambda: "step" in page.text("status"), 120, page=page)
    assert Project.open(proj, read_only=True).round == 0
    page.shot("training")
    _wait("round 1 shown", lambda: "round 1 shown" in page.text("prediction-shown"), 600, page=page)
    _figure(f"Train ({STEPS} steps) to first prediction shown (s)", time.perf_counter() - t_train)
    time.sleep(0.5)
    page.shot("prediction_round1")
    assert _changed(painted_view, page.view().screenshot_as_png) > 0.3, "no prediction on the view"
    dice1 = _dice(proj, 1, ref)
    assert page.text("error") == ""

    # Erase the wrong region of the prediction (the bright bar called disk), copy the rest,
    # then paint what the bar is.
    page.click("edit-prediction")
    _use(page, "erase", 1)

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
    _use(page, "paint", 2)
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
    _figure("Dice round 1", dice1)
    _figure("Dice round 2", dice2)
    _print_figures()
    assert dice2 > dice1, f"round 2 Dice {dice2:.3f} is not above round 1 {dice1:.3f}"
    assert Project.open(proj, read_only=True).round == 2


@pytest.mark.slow
def test_predict_uncertainty_export_fractions_and_classes(app2d, page, browser):
    proj = app2d["proj"]
    assert Project.open(proj, read_only=True).round == 2, \
        "this test continues the training test above it (run the module, not this test alone)"
    preds = proj / "predictions" / "round_002"
    mtime = lambda name: (preds / name).stat().st_mtime_ns  # noqa: E731

    # Predict the current image: the other image's prediction is left as it is.
    _open_image(page, "tile2")
    assert page.text("prediction-shown") == "No prediction shown"
    tile_before = mtime("tile.nrrd")
    page.click("predict-current")
    _wait("tile2's prediction shown", lambda: "round 2 shown with its uncertainty"
          in page.text("prediction-shown"), 120, page=page)
    assert (preds / "tile2.nrrd").exists() and (preds / "tile2_uncertainty.nrrd").exists()
    assert mtime("tile.nrrd") == tile_before, "Predict current image predicted the other image"
    time.sleep(0.5)
    with_unc = page.view().screenshot_as_png
    page.shot("prediction_tile2_uncertainty")

    # The uncertainty overlay off and on again.
    page.click("show-uncertainty")
    _wait("the overlay off", lambda: page.text("prediction-shown") == "SemSegLoop round 2 shown", 10)
    time.sleep(0.8)
    without = page.view().screenshot_as_png
    page.shot("prediction_tile2_no_uncertainty")
    # Confident pixels are not drawn: the overlay changes some of the view, not all of it.
    changed = _changed(with_unc, without)
    assert 0.002 < changed < 0.5, f"the overlay changed {changed:.1%} of the view"
    page.click("show-uncertainty")
    _wait("the overlay on", lambda: "with its uncertainty" in page.text("prediction-shown"), 10)
    time.sleep(0.8)
    assert _changed(with_unc, page.view().screenshot_as_png) < 0.2 * changed, "the overlay did not come back"
    # An image opened while the overlay is off shows its map when it is switched on.
    page.click("show-uncertainty")
    _open_image(page, "tile")
    _wait("tile's prediction without its map", lambda: page.text("prediction-shown") == "SemSegLoop round 2 shown", 10)
    time.sleep(0.8)
    without = page.view().screenshot_as_png
    page.click("show-uncertainty")
    _wait("tile's map read", lambda: "with its uncertainty" in page.text("prediction-shown"), 10, page=page)
    time.sleep(0.8)
    assert _changed(without, page.view().screenshot_as_png) > 0.002, "tile's map is not on the view"

    # Predict all images: both files are written again.
    before = {n: mtime(n) for n in ("tile.nrrd", "tile2.nrrd")}
    page.click("predict-all")
    _wait("all images predicted", lambda: all(mtime(n) > t for n, t in before.items())
          and "Prediction of round 2 ready" in page.text("status"), 120, page=page)

    # Export the label maps into a folder typed on the page.
    out = app2d["tmp"] / "exported"
    page.type("export-dir", out)
    page.click("export")
    _wait("the export", lambda: "Exported 2 label maps" in page.text("status"), 60, page=page)
    for name in ("tile", "tile2"):
        files = list(out.glob(f"{name}.*"))
        assert files, f"{name} was not exported to {out}"
        np.testing.assert_array_equal(imageio.read_labels(files[0])[0],
                                      imageio.read_labels(preds / f"{name}.nrrd")[0])

    # Class fractions: the table on the page and the CSV it downloads.
    page.click("fractions")
    rows = lambda: browser.execute_script(  # noqa: E731
        "return [...document.querySelectorAll('#fractions-table tbody tr')].map(r => r.innerText)")
    _wait("the fractions table", lambda: len(rows()) == 4, 60, page=page)
    assert any(r.startswith("tile2") and "disk" in r for r in rows())
    browser.execute_script("document.getElementById('fractions-table').scrollIntoView()")
    page.shot("fractions")
    page.click("fractions-csv")
    csv_file = browser.downloads / "class_fractions.csv"
    _wait("the CSV download", lambda: csv_file.exists() and csv_file.stat().st_size > 0, 20)
    assert csv_file.read_text() == (proj / "results" / "class_fractions.csv").read_text()
    fractions = [ln.split(",") for ln in csv_file.read_text().splitlines()[1:]]
    assert abs(sum(float(f[3]) for f in fractions if f[0] == "tile") - 1.0) < 1e-3

    # Classes: rename, recolour, add one; the project stores them and strokes of the new class.
    _open_image(page, "tile2")
    page.type("class-name-2", "stroma")
    browser.execute_script("const e = document.getElementById('class-color-1');"
                           "e.value = '#ff0080'; e.dispatchEvent(new Event('change'));")
    page.type("new-class", "debris")
    page.click("add-class")

    def stored():
        return [(c["name"], list(c["color"])) for c in Project.open(proj, read_only=True).classes]
    _wait("the classes in project.json", lambda: len(stored()) == 3 and stored()[0][1] == [255, 0, 128]
          and stored()[1][0] == "stroma", 20, page=page)
    assert [n for n, _ in stored()] == ["disk", "stroma", "debris"]
    _wait("the third class on the page", lambda: browser.find_elements(By.ID, "class-3"), 10)
    _use(page, "paint", 3)
    n = page.edits()
    page.stroke([(5, 5), (5, 20)])
    _wait("the debris stroke", lambda: page.edits() > n and (_labels(proj, "tile2") == 3).any(), 20, page=page)
    page.shot("classes_edited")


# ---------------------------------------------------------------------- no project, other host
def _ws_hello(url: str, secret: str | None):
    """Speak wslink's protocol over a plain WebSocket: the hello with ``secret`` (or, with
    None, a state RPC without any hello). Returns the server's reply."""
    import msgpack
    import websocket
    from wslink.chunking import UnChunker, generate_chunks

    port = re.search(r":(\d+)/", url).group(1)
    ws = websocket.create_connection(f"ws://127.0.0.1:{port}/ws", timeout=10)
    try:
        if secret is None:
            msg = {"wslink": "1.0", "id": "rpc:c0:1", "method": "trame.state.get", "args": [], "kwargs": {}}
        else:
            msg = {"wslink": "1.0", "id": "system:c0:0", "method": "wslink.hello",
                   "args": [{"secret": secret}], "kwargs": {}}
        for chunk in generate_chunks(msgpack.packb(msg), 1 << 20):
            ws.send_binary(chunk)
        unchunker = UnChunker()
        while True:
            reply = unchunker.process_chunk(ws.recv())
            if reply is not None:
                return reply
    finally:
        ws.close()


@pytest.fixture(scope="module")
def app_empty(tmp_path_factory, tiny_models):
    tmp = tmp_path_factory.mktemp("webempty")
    server = WebServer(["--host", "0.0.0.0"], tmp / "server.log")
    try:
        yield {"server": server, "tmp": tmp}
    finally:
        server.stop([tmp / "volume_project"])


@pytest.mark.slow
def test_other_host_needs_the_token(app_empty):
    server = app_empty["server"]
    assert any("anyone who can reach it" in ln for ln in server.lines), "no warning for a non-loopback host"
    token = re.search(r"secret=(\S+)", server.url).group(1)
    assert len(token) >= 24
    bad = _ws_hello(server.url, "wrong")
    assert bad.get("error", {}).get("message") == "Authentication failed", bad
    unauth = _ws_hello(server.url, None)
    assert "Unauthorized" in str(unauth.get("error")), unauth
    good = _ws_hello(server.url, token)
    assert "error" not in good and good["result"]["clientID"], good


@pytest.mark.slow
def test_make_a_3d_project_from_the_page(app_empty, browser):
    import SimpleITK as sitk

    tmp, server = app_empty["tmp"], app_empty["server"]
    rng = np.random.default_rng(3)
    zz, yy, xx = np.mgrid[0:16, 0:64, 0:64]
    vol = np.where((yy - 32) ** 2 + (xx - 32) ** 2 + 4 * (zz - 8) ** 2 < 200, 170, 80) + rng.normal(0, 10, zz.shape)
    sitk.WriteImage(sitk.GetImageFromArray(vol.astype(np.uint8)), str(tmp / "volume.nrrd"))
    proj = tmp / "volume_project"

    SCREENS.mkdir(parents=True, exist_ok=True)
    browser.get(server.url)
    page = Page(browser, SCREENS)
    page.n = 50
    _wait("the page", lambda: browser.find_elements(By.ID, "create"), 60)
    _wait("the first frame", page.has_frame, 60)
    page.type("project-path", proj, settle=0.2)
    page.type("new-image", tmp / "volume.nrrd", settle=0.2)
    page.type("new-classes", "blob,background", settle=0.2)
    page.click("new-dims-3")
    time.sleep(0.6)
    page.click("create")
    _wait("three slice views", lambda: len(page.views()) == 3 and page.frames() == 3, 60, page=page)
    assert Project.open(proj, read_only=True).dims == 3
    _wait("the image in the list", lambda: browser.find_elements(By.ID, "image-volume"), 10)
    page.shot("volume_three_views")

    # Paint in the axial view (the tall one on the left, first in the page, once the layout
    # has settled): the stroke lands in one slice of the volume's labels on disk.
    def settled():
        a, b, c = (e.rect for e in page.views())
        return a["height"] > 1.5 * b["height"] and a["x"] < b["x"] and abs(b["height"] - c["height"]) < 2
    _wait("the layout settled", settled, 20)
    time.sleep(0.5)
    axial = page.views()[0]
    _use(page, "paint", 1)
    n = page.edits()
    page.stroke([(32, 24), (32, 32), (32, 40)], size=64, view=axial)
    _wait("the stroke on the page", lambda: page.edits() > n, 20, page=page)
    f = proj / "labels" / "volume.nrrd"
    _wait("the 3D labels on disk", lambda: f.exists() and imageio.read_labels(f)[0].any(), 30, page=page)
    lab = imageio.read_labels(f)[0]
    z = np.unique(np.nonzero(lab)[0])
    assert lab.shape == (16, 64, 64) and len(z) == 1 and 5 <= z[0] <= 10, z
    assert (vol[lab == 1] > 125).mean() > 0.9, "the stroke is not on the blob"
    page.shot("volume_painted")
