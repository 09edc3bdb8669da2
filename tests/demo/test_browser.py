"""``tadm demo`` used the way a person uses it: Chromium (Debian's, driven by Playwright) against a demo started
on a free localhost port with the shipped model. A bundled photo is uploaded and its result checked against
the commands (LR size = photo / 16, the downloaded LR PNG byte for byte ``tadm downscale``'s, the PSNR shown
``tadm evaluate``'s); bad files get a message and the next upload works; the LR tab restores the downloaded
file; Stop stops; the page asks nothing of any host but the demo; Ctrl-C ends the demo and removes the uploads.
Screenshots go to ``runs/browser/``.

Only ``make test-browser`` runs these (``-m browser``; it installs gradio, Playwright and chromium first and
sets TADM_BROWSER_TEST=required, so that a missing piece fails instead of skipping).
"""

from __future__ import annotations

import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from PIL import Image, PngImagePlugin

from tadm.commands.demo import SHIPPED_MODEL
from tests.demo.cli_reference import downscaled_file, evaluated_rows
from tests.helpers import REPO, SAMPLES

pytestmark = pytest.mark.browser

CHELSEA = SAMPLES / "val" / "chelsea.png"  # 451x300: LR 29x19
COFFEE = SAMPLES / "val" / "coffee.png"  # 600x400: LR 38x25
SCREENSHOTS = REPO / "runs" / "browser"
#: seconds a step may take on a busy 2-core CI machine (a bundled photo takes about one)
STEP = 120_000


def _missing(what: str) -> None:
    """Skip when run by hand without the browser kit; fail under ``make test-browser``, which installs it."""
    message = f"the browser test needs {what} (`make test-browser` installs it)"
    if os.environ.get("TADM_BROWSER_TEST") == "required":
        pytest.fail(message)
    pytest.skip(message)


@dataclass
class Server:
    """A ``tadm demo`` process and what it printed."""

    url: str
    process: subprocess.Popen[str]
    tmp: Path
    lines: list[str] = field(default_factory=list)

    def output(self) -> str:
        return "".join(self.lines)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """``python -m tadm demo --port P``: the shipped model, one torch thread (its numbers match this process's
    ``tadm evaluate`` bit for bit), no VGG16 weights (no LPIPS: the page says why), its own TMPDIR."""
    import importlib.util

    if importlib.util.find_spec("gradio") is None:
        _missing("gradio (the demo extra)")
    root = tmp_path_factory.mktemp("server")
    (root / "tmp").mkdir()
    port = _free_port()
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "TMPDIR": str(root / "tmp"),
        "TORCH_HOME": str(root / "torch"),
        "PYTHONUNBUFFERED": "1",
    }
    process = subprocess.Popen(
        [sys.executable, "-m", "tadm", "demo", "--port", str(port)],
        cwd=root,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        # Ctrl-C as a terminal delivers it, even when this test runs as a background job (`make test-browser &`
        # starts everything with SIGINT ignored, and Python then installs no KeyboardInterrupt handler)
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    served = Server(f"http://127.0.0.1:{port}/", process, root / "tmp")
    ready = threading.Event()

    def read() -> None:
        assert process.stdout is not None
        for line in process.stdout:
            served.lines.append(line)
            if "serving at" in line:
                ready.set()

    threading.Thread(target=read, daemon=True).start()
    deadline = time.monotonic() + 300
    while not ready.wait(0.5):
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"tadm demo did not start:\n{served.output()[-3000:]}")
    yield served
    if process.poll() is None:
        process.kill()
        process.wait(30)


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _missing("Playwright's Python package")
    executable = shutil.which("chromium")
    if executable is None:
        _missing("Debian's chromium on PATH")
    with sync_playwright() as playwright:
        # as root (CI, containers) Chromium runs only without its sandbox
        args = ["--no-sandbox"] if os.geteuid() == 0 else []
        chromium = playwright.chromium.launch(executable_path=executable, headless=True, args=args)
        yield chromium
        chromium.close()


@dataclass
class Session:
    """One person's tab on the demo, and every host it asked something of."""

    page: Any
    hosts: set[str]
    downloads: Path


@pytest.fixture(scope="module")
def session(server: Server, browser: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Session]:
    page = browser.new_page(viewport={"width": 1280, "height": 900}, accept_downloads=True)
    hosts: set[str] = set()
    page.on("request", lambda request: hosts.add(request.url.split("/")[2] if "://" in request.url else ""))
    page.goto(server.url)
    page.wait_for_selector("#photo-input input[type=file]", state="attached", timeout=STEP)
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    yield Session(page, hosts, tmp_path_factory.mktemp("downloads"))
    page.close()


def _status(page: Any, element: str = "#photo-status") -> str:
    return str(page.locator(element).inner_text())


def _upload(page: Any, path: Path, tab: str = "photo", expect: str = "Done") -> float:
    """Upload ``path`` as a person does (clearing the previous file first); seconds until ``expect`` shows."""
    box, status = f"#{tab}-input", f"#{tab}-status" if tab == "photo" else "#lr-status"
    clear = page.locator(f"{box} button[aria-label=Clear]")
    if clear.count():
        clear.first.click()
        page.wait_for_function(
            f"document.querySelector('{status}').innerText.startsWith('Upload')", timeout=STEP
        )
    start = time.perf_counter()
    page.locator(f"{box} input[type=file]").set_input_files(str(path))
    page.wait_for_function(
        f"(() => {{ const t = document.querySelector('{status}').innerText;"
        f" return t.includes({expect!r}) || t.includes('Could not') || t.includes('Internal error'); }})()",
        timeout=STEP,
    )
    seconds = time.perf_counter() - start
    assert expect in _status(page, status), _status(page, status)
    return seconds


def _download(page: Any, element: str, folder: Path) -> Path:
    with page.expect_download(timeout=STEP) as event:
        page.locator(f"{element} a").first.click()
    download = event.value
    target = folder / download.suggested_filename
    download.save_as(target)
    return target


def _scores_shown(page: Any) -> float:
    """Seconds until PSNR-Y / SSIM-Y appear (they follow the images)."""
    start = time.perf_counter()
    page.wait_for_selector(
        '#scores td[data-method="bicubic"][data-metric="ssim_y"][data-value]', timeout=STEP
    )
    return time.perf_counter() - start


def _cell(page: Any, method: str, metric: str) -> Any:
    return page.locator(f'#scores td[data-method="{method}"][data-metric="{metric}"]')


def test_a_bundled_photos_round_trip_is_the_commands(
    session: Session, tmp_path: Path, one_thread: None
) -> None:
    page = session.page
    seconds = _upload(page, CHELSEA)
    scored = _scores_shown(page)
    print(
        f"\nchelsea.png 451x300: {seconds:.2f} s from upload to the result in the page, {scored:.2f} s more to the scores"
    )
    # the LR image, shown at its real size: the photo's size / 16 (rounded up: the codec pads)
    facts = page.locator("#lr-facts")
    lr_w, lr_h = int(facts.get_attribute("data-lr-width")), int(facts.get_attribute("data-lr-height"))
    assert (lr_w, lr_h) == (math.ceil(451 / 16), math.ceil(300 / 16)) == (29, 19)
    shown = page.locator("#lr-real-img").evaluate("e => [e.naturalWidth, e.naturalHeight, e.width, e.height]")
    assert shown == [29, 19, 29, 19]
    # the LR PNG offered for download is the file `tadm downscale` writes for this photo and checkpoint
    lr = _download(page, "#lr-download", session.downloads)
    assert lr.name == "chelsea.lr.png"
    assert lr.read_bytes() == downscaled_file(SHIPPED_MODEL, CHELSEA, tmp_path / "lr").read_bytes()
    assert int(facts.get_attribute("data-bytes")) == lr.stat().st_size
    restored = _download(page, "#restored-download", session.downloads)
    with Image.open(restored) as im:
        assert im.size == (451, 300)
    # the PSNR shown is `tadm evaluate`'s for this photo (the digits shown, and the exact value behind them)
    rows = evaluated_rows(SHIPPED_MODEL, CHELSEA, tmp_path / "report", "--no-perceptual")
    for method in ("restored", "bicubic"):
        psnr = float(rows[method]["psnr_y"])
        assert _cell(page, method, "psnr_y").inner_text() == f"{psnr:.2f}", method
        assert float(_cell(page, method, "psnr_y").get_attribute("data-value")) == psnr, method
        assert _cell(page, method, "ssim_y").inner_text() == f"{float(rows[method]['ssim_y']):.4f}", method
    assert _cell(page, "restored", "lpips").inner_text() == "n/a"
    assert "no VGG16 weights (vgg16-397923af.pth" in page.locator("#scores").inner_text()
    # the slider compares any two of original / restored / bicubic
    page.locator("#slider-left input").click()
    page.get_by_role("option", name="bicubic").click()
    page.wait_for_function(
        "[...document.querySelectorAll('#slider img')].some(i => i.src.includes('bicubic.view'))",
        timeout=STEP,
    )
    page.screenshot(path=str(SCREENSHOTS / "round_trip.png"), full_page=True)
    page.evaluate("window.scrollTo(0, 0)")  # the README's: the page down to restored | bicubic
    bottom = page.locator("#bicubic").evaluate("e => e.getBoundingClientRect().bottom")
    page.screenshot(
        path=str(SCREENSHOTS / "round_trip_top.png"),
        clip={"x": 0, "y": 0, "width": 1280, "height": bottom + 16},
        full_page=True,
    )
    assert session.hosts <= {page.url.split("/")[2], ""}, session.hosts  # nothing asked of any other host


def test_a_bad_file_is_a_message_and_the_next_upload_works(session: Session, tmp_path: Path) -> None:
    page = session.page
    (tmp_path / "notes.png").write_text("a shopping list, not a photo")
    _upload(page, tmp_path / "notes.png", expect="Could not process it: notes.png: not an image file")
    assert page.locator("#lr-real-img").count() == 0  # no earlier result beside the message
    page.screenshot(path=str(SCREENSHOTS / "bad_file.png"))
    data = CHELSEA.read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    _upload(page, tmp_path / "cut.png", expect="Could not process it: cut.png: file is truncated")
    _upload(page, COFFEE)
    facts = page.locator("#lr-facts")
    assert (int(facts.get_attribute("data-lr-width")), int(facts.get_attribute("data-lr-height"))) == (38, 25)


def test_the_lr_tab_restores_the_downloaded_file_alone(session: Session, tmp_path: Path) -> None:
    page = session.page
    lr, restored = session.downloads / "chelsea.lr.png", session.downloads / "chelsea.restored.png"
    page.get_by_role("tab", name="LR file → photo").click()
    _upload(page, lr, tab="lr")
    assert "451x300 px" in _status(page, "#lr-status")
    again = _download(page, "#restored-download-2", tmp_path)
    assert again.read_bytes() == restored.read_bytes()  # the receiving side rebuilds the same photo
    page.screenshot(path=str(SCREENSHOTS / "lr_tab.png"))
    with Image.open(lr) as im:  # the same file, as if another model had written it
        info = PngImagePlugin.PngInfo()
        for key, value in {**im.text, "tadm:rescaler_id": "0123456789abcdef"}.items():
            info.add_text(key, value)
        im.save(tmp_path / "other.png", pnginfo=info)
    _upload(page, tmp_path / "other.png", tab="lr", expect="other.png: LR file was made by a different model")
    page.get_by_role("tab", name="Photo → LR → photo").click()


def test_stop_stops_a_large_photo_and_the_next_upload_works(session: Session, tmp_path: Path) -> None:
    page = session.page
    with Image.open(SAMPLES / "heldout" / "raccoon.jpg") as im:  # 1024x768 -> 2560x1600 (4.1 MP)
        im.convert("RGB").crop((0, 64, 1024, 704)).resize((2560, 1600), Image.Resampling.BICUBIC).save(
            tmp_path / "large.png"
        )
    page.locator("#photo-stop").click()
    page.wait_for_function("document.querySelector('#photo-status').innerText.includes('Nothing is running')")
    clear = page.locator("#photo-input button[aria-label=Clear]")
    clear.first.click()
    page.wait_for_function(
        "document.querySelector('#photo-status').innerText.startsWith('Upload')", timeout=STEP
    )
    page.locator("#photo-input input[type=file]").set_input_files(str(tmp_path / "large.png"))
    page.get_by_text("tile", exact=False).first.wait_for(timeout=STEP)  # the progress names the tiles
    page.locator("#photo-stop").click()
    page.wait_for_function(
        "document.querySelector('#photo-status').innerText.includes('Stopped')", timeout=STEP
    )
    seconds = _upload(page, tmp_path / "large.png")
    scored = _scores_shown(page)
    print(
        f"\nlarge.png 2560x1600: {seconds:.2f} s from upload to the result, {scored:.2f} s more to the scores (1 thread)"
    )
    facts = page.locator("#lr-facts")
    assert (int(facts.get_attribute("data-lr-width")), int(facts.get_attribute("data-lr-height"))) == (
        160,
        100,
    )


def test_ctrl_c_stops_the_demo_and_removes_the_uploads(server: Server, session: Session) -> None:
    assert any(server.tmp.iterdir())  # the uploads and results live in the demo's temporary folder ...
    server.process.send_signal(signal.SIGINT)
    assert server.process.wait(60) == 130, server.output()[-3000:]
    assert "tadm demo: interrupted" in server.output()
    assert not any(server.tmp.iterdir()), list(server.tmp.iterdir())  # ... which goes with it
    assert "Traceback" not in server.output(), server.output()[-3000:]
