"""The web page in a real headless Chromium (Debian's package, driven by Playwright for Python)."""

import os
import shutil
from pathlib import Path

import pytest

sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install -e .[dev])")

CHROMIUM = next((p for p in (os.environ.get("AIAYN_CHROMIUM"), "/usr/bin/chromium", shutil.which("chromium"),
                             shutil.which("chromium-browser")) if p and Path(p).is_file()), None)
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no Chromium on this machine (apt-get install chromium)")
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run"]


@pytest.fixture(scope="module")
def page(live_server):
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        page = browser.new_page(viewport={"width": 1200, "height": 1000})
        errors = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(live_server)
        yield page
        browser.close()
        assert not errors, f"JavaScript errors on the page: {errors}"


def test_translate_draws_the_heat_map(page, tmp_path):
    page.get_by_test_id("translate-input").fill("A dog runs in the snow.")
    page.get_by_test_id("translate-button").click()
    out = page.get_by_test_id("translate-output")
    sync_api.expect(out).to_have_text("Ein Hund rennt im Schnee.", timeout=30_000)
    heat = page.get_by_test_id("heatmap")
    # rows: the German tokens (</s> hidden), columns: the English ones
    sync_api.expect(heat.locator("tbody tr")).to_have_count(6)  # ▁Ein ▁Hund ▁rennt ▁im ▁Schnee .
    assert heat.locator("thead th").count() == 1 + 7  # corner + ▁A ▁dog ▁runs ▁in ▁the ▁snow .
    cell = heat.locator("tbody td").first
    assert cell.evaluate("td => getComputedStyle(td).backgroundColor").startswith("rgb(")
    # hovering a German token lists the English tokens it attends to, best first
    heat.locator("tbody tr").nth(1).hover()
    sync_api.expect(page.locator("#focus-title")).to_contain_text("Hund")
    assert page.get_by_test_id("attn-focus").locator("li").count() == 7
    # the keyboard moves between rows; showing </s> adds a row
    heat.locator("tbody tr").nth(1).focus()
    page.keyboard.press("ArrowDown")
    sync_api.expect(page.locator("#focus-title")).to_contain_text("rennt")
    page.get_by_test_id("hide-special").uncheck()
    sync_api.expect(heat.locator("tbody tr")).to_have_count(7)
    page.get_by_test_id("head-select").select_option("2")  # head 3 alone
    sync_api.expect(heat.locator("tbody tr")).to_have_count(7)
    page.get_by_test_id("hide-special").check()
    page.screenshot(path=str(os.environ.get("AIAYN_SCREENSHOT") or tmp_path / "page.png"), full_page=True)


def test_typing_translates_after_a_pause(page):
    page.get_by_test_id("translate-input").fill("")
    page.get_by_test_id("translate-input").type("Two men play football.")
    sync_api.expect(page.get_by_test_id("translate-output")).to_have_text("Zwei Männer spielen Football.", timeout=30_000)


@pytest.fixture
def slow_generation(live_app):
    """5 ms more per generated token: a long generation lasts long enough (5 s for 1,000 tokens) to
    be stopped on any machine, however fast its model."""
    import time

    server = live_app.state.server
    model = server.models.lm.inference(server.precision)  # the copy the server generates with
    hook = model.generator.register_forward_pre_hook(lambda *_: time.sleep(0.005))
    yield
    hook.remove()


def test_generation_streams_and_stops(page, slow_generation):
    page.get_by_test_id("generate-input").fill("ROMEO:")
    page.get_by_test_id("max-tokens").fill("40")
    page.get_by_test_id("temperature").fill("0")
    page.get_by_test_id("generate-button").click()
    status = page.get_by_test_id("generate-status")
    sync_api.expect(status).to_contain_text("finished: length", timeout=30_000)
    tokens = page.get_by_test_id("generate-output").locator(".t")
    assert tokens.count() == 40
    tokens.nth(3).hover()  # the top-10 next-token probabilities of that step
    sync_api.expect(page.get_by_test_id("top-tokens").locator("li")).to_have_count(10)
    # a long generation stopped by the button ends early
    page.get_by_test_id("max-tokens").fill("1000")
    page.get_by_test_id("generate-button").click()
    sync_api.expect(tokens.nth(5)).to_be_attached(timeout=30_000)
    page.get_by_test_id("stop-button").click()
    sync_api.expect(status).to_contain_text("stopped", timeout=10_000)
    assert tokens.count() < 1000


def test_errors_show_inline(page):
    page.get_by_test_id("translate-input").fill("   ")
    page.get_by_test_id("translate-button").click()
    sync_api.expect(page.get_by_test_id("translate-error")).to_be_visible()
    page.get_by_test_id("generate-input").fill("naïve ☃")  # characters the character model has never seen
    page.get_by_test_id("max-tokens").fill("5")
    page.get_by_test_id("generate-button").click()
    sync_api.expect(page.get_by_test_id("generate-error")).to_contain_text("outside the model's vocabulary")
