"""The screenshots in docs/img/: the head view of a retrieval head and of a non-retrieval head on
the same probe, and a result's inline display, rendered by headless Chromium (Playwright).

    make demo            # runs/demo: the default model's detection run
    python scripts/view_screenshots.py runs/demo --probe len500-depth50-lighthouse-soup \
        --heads 18.6,3.1 --out docs/img

Needs the browser extra and a Chromium binary (``make browser``; ``$RHLENS_CHROMIUM`` to point
at one). Prints what it wrote.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
from pathlib import Path

ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", help="a detection run (make demo: runs/demo)")
    ap.add_argument("--probe", default="len500-depth50-lighthouse-soup")
    ap.add_argument("--heads", default="18.6,3.1", help="a retrieval head, then a non-retrieval one")
    ap.add_argument("--out", default="docs/img")
    args = ap.parse_args()

    from playwright.sync_api import sync_playwright

    import rhlens as rh
    from rhlens.cli.show import run_probe
    from rhlens.trace import trace_heads
    from rhlens.views import head_view

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    scores = rh.load_result(Path(args.run) / "scores")
    probe, answer = run_probe(args.run, args.probe)
    model, tok = rh.load_model()
    trace = trace_heads(model, probe, args.heads, answer_ids=answer, tokenizer=tok, scores=scores,
                        context=40)
    copy_steps = trace.copied[:, 0].nonzero().flatten().tolist()
    step = copy_steps[1] if len(copy_steps) > 1 else 0  # a step where the first head copies
    exe = os.environ.get("RHLENS_CHROMIUM") or shutil.which("chromium") or "chromium"
    with tempfile.TemporaryDirectory() as tmp, sync_playwright() as p:
        browser = p.chromium.launch(executable_path=exe, args=ARGS)
        page = browser.new_page(viewport={"width": 1180, "height": 860}, device_scale_factor=1)
        errors: list[str] = []
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: errors.append(str(e)))
        view = head_view(trace).save(Path(tmp) / "view.html")
        page.goto(view.resolve().as_uri())
        page.locator(".rhv-step").fill(str(step))
        page.screenshot(path=str(out / "head-view.png"))
        panels = page.locator(".rhv-panel")
        for i, name in enumerate(("retrieval", "non-retrieval")):
            la, h = trace.heads[i]
            path = out / f"head-view-{name}-L{la}H{h}.png"
            panels.nth(i).screenshot(path=str(path))
            print(f"wrote {path}")
        inline = Path(tmp) / "inline.html"
        inline.write_text("<!DOCTYPE html><html><head><meta charset='utf-8'></head>"
                          "<body style='margin:12px'>" + scores._repr_html_() + "</body></html>",
                          encoding="utf-8")
        page.goto(inline.resolve().as_uri())
        page.locator(".rhlens-result").screenshot(path=str(out / "scores-inline.png"))
        browser.close()
    if errors:
        raise SystemExit(f"console errors: {errors}")
    print(f"wrote {out / 'head-view.png'} (step {step}), {out / 'scores-inline.png'}")


if __name__ == "__main__":
    main()
