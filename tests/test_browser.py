"""The translation page (mt/static/index.html) in a real browser: `python -m mt.serve` runs the toy
checkpoint on a free local port and Debian's chromium, driven headless by Playwright, uses the page
as a person would. The page's translations must equal scripts/translate.py's for the same lines
and beam, its heatmap must have one row per output piece and one column per source piece, and an
input beyond the server's limits must show the server's own message in the page's alert region.

Skips, with the reason, where the Playwright package or a chromium binary is missing
(`make test` installs Debian's chromium where it can).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest
from conftest import REPO, toy_translate

pytestmark = pytest.mark.browser

LINES = ["hund sieht katze", "rot auto und blau haus"]
BEAM, NBEST = 3, 2
MAX_LINES, MAX_CHARS = 3, 120  # small limits, so the oversized inputs are small too
TIMEOUT_MS = 20_000


def chromium_path() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        pytest.skip("no chromium on PATH (Debian: apt-get install chromium; `make test` does it as root)")
    return path


@pytest.fixture(scope="module")
def playwright_api():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError as e:
        pytest.skip(f"the Playwright package is not installed ({e}); pip install -e '.[dev]'")
    return sync_playwright


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_env() -> dict[str, str]:
    return {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
    }


@pytest.fixture(scope="module")
def cli_nbest(tiny_run, tmp_path_factory) -> subprocess.Popen:
    """scripts/translate.py on LINES with the page's beam and n-best, started early: it runs while
    the server loads."""
    src = tmp_path_factory.mktemp("cli") / "lines.de"
    src.write_text("\n".join(LINES) + "\n", encoding="utf-8")
    cmd = [sys.executable, str(REPO / "scripts" / "translate.py"), "--checkpoint", str(tiny_run["checkpoint"])]
    cmd += ["--input", str(src), "--beam", str(BEAM), "--nbest", str(NBEST), "--device", "cpu", "--quiet"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=child_env(), cwd=REPO)
    yield proc
    if proc.poll() is None:
        proc.kill()
        proc.wait()


@contextlib.contextmanager
def serve(checkpoint, log_path, *extra: str, env: dict[str, str] | None = None):
    """`python -m mt.serve` on a free port, up once /health answers: its base URL."""
    port = free_port()
    cmd = [sys.executable, "-m", "mt.serve", "--model", str(checkpoint), "--host", "127.0.0.1", "--port", str(port)]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [*cmd, *extra], stdout=log, stderr=subprocess.STDOUT, env={**child_env(), **(env or {})}, cwd=REPO
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None:
                pytest.fail(f"mt.serve exited with status {proc.returncode}:\n{log_path.read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(url + "/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"mt.serve did not answer /health within 60 s:\n{log_path.read_text()[-2000:]}")
            time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def server(tiny_run, cli_nbest, tmp_path_factory):
    """The server the page tests use, with small --max-lines / --max-chars."""
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    limits = ["--max-lines", str(MAX_LINES), "--max-chars", str(MAX_CHARS)]
    with serve(tiny_run["checkpoint"], log, *limits) as url:
        yield url


@pytest.fixture(scope="module")
def browser(playwright_api):
    exe = chromium_path()
    args = ["--no-sandbox"] if hasattr(os, "geteuid") and os.geteuid() == 0 else []
    with playwright_api() as p:
        b = p.chromium.launch(executable_path=exe, args=args, headless=True)
        yield b
        b.close()


@contextlib.contextmanager
def open_page(browser, url: str):
    """A fresh browser context on the page at `url`; fails the test on a script error."""
    ctx = browser.new_context(viewport={"width": 1000, "height": 900})
    pg = ctx.new_page()
    pg.set_default_timeout(TIMEOUT_MS)
    script_errors: list[str] = []
    pg.on("pageerror", lambda e: script_errors.append(str(e)))
    pg.goto(url + "/")
    yield pg
    ctx.close()
    assert not script_errors, script_errors


def wait_for_info(pg) -> None:
    """Until the page has shown the language pair it read from /info."""
    pg.wait_for_function("document.getElementById('pair').textContent.includes('→')")


@pytest.fixture
def page(browser, server):
    """The page, loaded, with the language pair from /info shown."""
    with open_page(browser, server) as pg:
        wait_for_info(pg)
        yield pg


def server_error(url: str, body: dict) -> tuple[int, str]:
    """What the server answers `body` with, when it refuses it: (status, its one-line message)."""
    req = urllib.request.Request(
        url + "/translate", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            pytest.fail(f"the server accepted an input beyond its limits (status {r.status})")
    except urllib.error.HTTPError as e:
        status, payload = e.code, json.loads(e.read())
    message = payload.get("error") or payload.get("detail")
    if isinstance(message, list):  # FastAPI's validation errors
        message = message[0]["msg"]
    return status, str(message).splitlines()[0]


def translate_in_page(pg, text: str, *, beam: int, nbest: int, submit: str = "click") -> None:
    pg.get_by_label("Text to translate").fill(text)
    pg.get_by_label("Beam size").fill(str(beam))
    pg.get_by_label("N-best").fill(str(nbest))
    if submit == "click":
        pg.get_by_role("button", name="Translate", exact=True).click()
    else:
        pg.get_by_label("Text to translate").press("Control+Enter")


# ----------------------------------------------------------------------------- tests
def test_page_shows_the_language_pair(page, tiny_run):
    assert "de → en" in page.locator("h1").inner_text()
    assert page.locator("[role=alert]").text_content() == ""


def test_translations_and_nbest_match_the_cli(page, cli_nbest, tmp_path):
    translate_in_page(page, "\n".join(LINES), beam=BEAM, nbest=NBEST)
    page.wait_for_selector(f".result >> nth={len(LINES) - 1}")
    results = page.locator("#results > li")
    assert results.count() == len(LINES)

    out, err = cli_nbest.communicate(timeout=60)
    assert cli_nbest.returncode == 0, err.decode()
    want: list[list[tuple[str, float]]] = [[] for _ in LINES]
    for row in out.decode().splitlines():  # Moses style: i ||| translation ||| score
        i, text, score = (f.strip() for f in row.split("|||"))
        want[int(i)].append((text, float(score)))

    for i, line in enumerate(LINES):
        item = results.nth(i)
        assert item.locator(".source").inner_text() == line
        assert item.locator(".translation").inner_text() == want[i][0][0]
        alternatives = item.locator(".nbest > li")
        assert alternatives.count() == len(want[i]) == NBEST
        for k, (text, score) in enumerate(want[i]):
            alt = alternatives.nth(k)
            assert alt.locator(".hyp-text").inner_text() == text
            assert float(alt.locator(".score").get_attribute("data-score")) == pytest.approx(score, abs=1e-3)
    assert page.locator("[role=alert]").text_content() == ""
    page.screenshot(path=str(tmp_path / "translations.png"), full_page=True)
    assert (tmp_path / "translations.png").stat().st_size > 0


def test_attention_heatmap_is_drawn(page, tmp_path):
    with page.expect_response(lambda r: r.url.endswith("/translate")) as answer:
        translate_in_page(page, "\n".join(LINES), beam=BEAM, nbest=1, submit="ctrl+enter")
    att = answer.value.json()["translations"][1]["attention"]
    page.wait_for_selector(".result >> nth=1")

    page.get_by_role("button", name="Show the attention of line 2").click()
    table = page.locator("#heatmap")
    table.wait_for(state="visible")
    cols = table.locator("thead th[scope=col]").all_inner_texts()
    rows = table.locator("tbody th[scope=row]").all_inner_texts()
    assert cols == att["source"] and rows == att["target"]
    assert table.locator("tbody tr").count() == len(att["weights"]) == len(rows)
    assert all(table.locator("tbody tr").nth(r).locator("td").count() == len(cols) for r in range(len(rows)))
    # piece labels are the sentence's: the source words across, the translation's words down
    assert [c.lstrip("\u2581") for c in cols[:5]] == LINES[1].split()
    translation = page.locator("#results > li").nth(1).locator(".translation").inner_text()
    assert [r.lstrip("\u2581") for r in rows[: len(translation.split())]] == translation.split()
    # drawn, not blank: the cells are shaded by weight, and the word-for-word task's attention is peaked
    weights = [float(w) for w in table.locator("td").evaluate_all("cells => cells.map(c => c.dataset.weight)")]
    assert len(weights) == len(rows) * len(cols) and max(weights) > 0.5
    shaded = table.locator("td").evaluate_all(
        "cells => cells.filter(c => getComputedStyle(c).backgroundColor !== 'rgba(0, 0, 0, 0)').length"
    )
    assert shaded >= len(rows)
    assert page.get_by_role("button", name="Show the attention of line 2").get_attribute("aria-pressed") == "true"
    page.screenshot(path=str(tmp_path / "heatmap.png"), full_page=True)
    assert (tmp_path / "heatmap.png").stat().st_size > 0


@pytest.mark.parametrize(
    "text",
    [
        "\n".join(["hund"] * (MAX_LINES + 1)),  # too many lines
        " ".join(["katze"] * (MAX_CHARS // 6 + 2)),  # too many characters on one line
    ],
    ids=["lines", "chars"],
)
def test_oversized_input_shows_the_servers_error(page, server, text, tmp_path):
    status, message = server_error(server, {"text": text.split("\n"), "attention": True})
    assert 400 <= status < 500
    translate_in_page(page, text, beam=1, nbest=1)
    alert = page.get_by_role("alert")
    page.wait_for_function("document.getElementById('error').textContent.length > 0")
    shown = alert.inner_text()
    assert shown.startswith(f"Error {status}") and message in shown and "\n" not in shown.strip()
    assert alert.is_visible()
    assert page.locator("#results > li").count() == 0
    page.screenshot(path=str(tmp_path / "error.png"))
    assert (tmp_path / "error.png").stat().st_size > 0


def test_narrow_window_keeps_the_controls_usable(page, tmp_path):
    page.set_viewport_size({"width": 360, "height": 740})
    for name in ("Text to translate", "Beam size", "N-best"):
        box = page.get_by_label(name).bounding_box()
        assert box is not None and box["x"] >= 0 and box["x"] + box["width"] <= 360, name
    button = page.get_by_role("button", name="Translate", exact=True).bounding_box()
    assert button["x"] + button["width"] <= 360
    assert page.evaluate("document.documentElement.scrollWidth") <= 360  # no sideways scrolling
    page.screenshot(path=str(tmp_path / "narrow.png"), full_page=True)


def test_api_key_is_asked_for_and_sent(browser, tiny_run, tmp_path):
    """With a key required, /info's 401 shows in the alert region and reveals the key field; the
    entered key is then sent as a Bearer token, so settings and translations come through."""
    key = "page-test-key"
    with serve(tiny_run["checkpoint"], tmp_path / "serve.log", env={"MT_API_KEY": key}) as url:
        with open_page(browser, url) as pg:
            alert = pg.get_by_role("alert")
            pg.wait_for_function("document.getElementById('error').textContent.length > 0")
            assert alert.inner_text().startswith("Error 401")
            key_box = pg.get_by_label("API key")
            assert key_box.is_visible() and key_box.get_attribute("type") == "password"

            key_box.fill("wrong")
            key_box.press("Tab")  # a change event: the page retries /info with the key
            pg.wait_for_function("document.getElementById('error').textContent.startsWith('Error 401')")
            assert "→" not in pg.locator("#pair").inner_text()

            key_box.fill(key)
            key_box.press("Tab")
            wait_for_info(pg)
            assert pg.locator("[role=alert]").text_content() == ""
            with pg.expect_request(lambda r: r.url.endswith("/translate")) as sent:
                translate_in_page(pg, LINES[0], beam=1, nbest=1)
            assert sent.value.headers["authorization"] == f"Bearer {key}"
            pg.wait_for_selector(".result")
            assert pg.locator(".result .translation").inner_text() == toy_translate(LINES[0])
