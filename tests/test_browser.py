"""The head view and the report in a real browser: headless Chromium driven by Playwright.

Skipped when Playwright or a Chromium binary is missing (``make browser`` installs both where
it can: Debian's ``chromium`` package and the ``browser`` extra). Playwright's own browser
download is never used: the system's Chromium is launched by path (``$RHLENS_CHROMIUM``, else
``chromium`` / ``chromium-browser`` / ``google-chrome`` on the PATH).
"""

from __future__ import annotations

import os
import shutil

import pytest

from rhlens.probe import Probe
from rhlens.trace import trace_heads
from rhlens.views import head_view

from toy import make_toy_probe

ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def _chromium() -> str | None:
    found = os.environ.get("RHLENS_CHROMIUM")
    if found:
        return found
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if (path := shutil.which(name)):
            return path
    return None


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed "
                                   "(make browser)")
    exe = _chromium()
    if exe is None:
        pytest.skip("no Chromium binary (make browser installs Debian's chromium)")
    with sync_api.sync_playwright() as p:
        try:
            b = p.chromium.launch(executable_path=exe, args=ARGS)
        except Exception as exc:  # a binary that cannot start here
            pytest.skip(f"Chromium at {exe} does not start: {str(exc).splitlines()[0]}")
        yield b
        b.close()


def _open(browser, path):
    """A page at ``path``, with every console error and uncaught exception collected."""
    page = browser.new_page(viewport={"width": 1200, "height": 900})
    errors: list[str] = []
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(path.resolve().as_uri())
    return page, errors


def test_head_view_in_chromium(browser, toy_model, tmp_path):
    model, tok = toy_model
    ids, span, answer = make_toy_probe(tok, 40, 3)
    probe = Probe(ids, span, answer, length=len(ids), needle_id="toy3", question="ASK")
    trace = trace_heads(model, probe, [(1, 2), (0, 0)], tokenizer=tok, context=6)
    page, errors = _open(browser, head_view(trace).save(tmp_path / "view.html"))
    panels = page.locator(".rhv-panel")
    assert panels.count() == 2
    assert page.locator(".rhv-panel h4").first.inner_text().startswith("L1H2")
    # The needle is highlighted in each panel's context: exactly its tokens.
    needle = page.locator(".rhv-panel").first.locator(".rhv-ctx .rhv-needle")
    assert needle.count() == span[1] - span[0]
    assert needle.first.evaluate("e => getComputedStyle(e).backgroundColor") != "rgba(0, 0, 0, 0)"
    label = page.locator(".rhv-steplabel")
    top = page.locator(".rhv-panel").first.locator(".rhv-ctx .rhv-top")

    def shown():
        return label.inner_text(), top.get_attribute("data-pos"), page.locator(
            ".rhv-panel").first.locator(".rhv-now").inner_text()

    first = shown()
    assert first[0].startswith("step 0 ")
    page.click(".rhv-next")
    second = shown()
    assert second[0].startswith("step 1 ") and second != first
    # At every step the copy head's outlined key is the trace's top key; the slider drives it.
    last = trace.n_steps - 1
    page.locator(".rhv-step").fill(str(last))
    assert label.inner_text().startswith(f"step {last} ")
    page.locator(".rhv-step").fill("1")
    assert top.get_attribute("data-pos") == str(int(trace.top_position[1, 0]))
    assert ("copied" in second[2]) == bool(trace.copied[1, 0])
    page.click(".rhv-prev")
    assert shown() == first
    assert errors == []


def test_report_in_chromium(browser, tmp_path):
    from test_report import _detection_run, _niah

    from rhlens.report import build_report
    from rhlens.runs import save_niah_run

    run = _detection_run(tmp_path / "run")
    save_niah_run(run, _niah({"none": [], "top-2": [[2, 1], [3, 0]]}), figures=False)
    path = build_report([run]).to_html(tmp_path / "report.html")
    page, errors = _open(browser, path)
    assert page.locator("h1").first.inner_text()
    assert page.locator("table").count() >= 2
    images = page.locator("img")
    assert images.count() >= 1
    # Every figure decoded (an inline PNG that failed would have no natural width).
    widths = images.evaluate_all("els => els.map(e => e.naturalWidth)")
    assert min(widths) > 0
    assert "dragons sing under the moon" in page.content()
    assert errors == []
