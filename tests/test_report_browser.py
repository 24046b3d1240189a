"""The HTML reports opened in a real headless Chromium: tables visible, every image decoded, nothing wider than a
1280 px window, and the judge-check warning on screen when the judge was not shown to discriminate.

Needs a Chromium binary (`make install` puts Debian's in place when run as root); the browser driver is the PyPI
`playwright` package (dev extra) pointed at that binary, so nothing is downloaded. Set BAIZE_REPORT_SCREENS=<dir>
to keep the full-page screenshots somewhere to look at."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from helpers.report_fixture import make_run

from baize_exp.stages import report
from baize_exp.stages.report.single import WARNING

WIDTH = 1280


def _chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if found := shutil.which(name):
            return found
    if Path("/usr/bin/chromium").is_file():
        return "/usr/bin/chromium"
    pytest.skip("no Chromium binary (apt-get install chromium, or `make install` as root)")


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    exe = _chromium()
    with sync_playwright() as p:
        # --no-sandbox: containers and CI run as root, where Chromium's sandbox refuses to start
        b = p.chromium.launch(executable_path=exe, args=["--no-sandbox"])
        yield b
        b.close()


@pytest.fixture(scope="module")
def pages(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("reports")
    run = make_run(tmp / "run", ["eval=pairwise", "lora.r=8"], mode="pairwise", discriminates=False)
    _, run_page = report.write(run)
    runs = [
        make_run(tmp / "cmp" / "2026-11-30_10-00-00", ["lora.r=4", "train.learning_rate=1e-4"], loss=2.1),
        make_run(
            tmp / "cmp" / "2026-11-30_11-00-00",
            ["data=file", "data.path=/datasets/self_chat/quora_medical_stackoverflow_merged_v3.jsonl"],
            shift=1.0,
            loss=1.9,
        ),
        make_run(tmp / "cmp" / "2026-11-30_12-00-00", ["sdf=off", "lora.dropout=0.1"], loss=2.0, discriminates=False),
    ]
    report.compare(runs, tmp / "cmp" / "report")
    return {"run": run_page, "cross_run": tmp / "cmp" / "report" / "report.html"}


@pytest.mark.parametrize("which", ["run", "cross_run"])
def test_report_page_renders_in_chromium(browser, pages: dict[str, Path], which: str, tmp_path: Path) -> None:
    page = browser.new_page(viewport={"width": WIDTH, "height": 900})
    page.goto(pages[which].as_uri(), wait_until="load")

    tables = page.locator("table")
    assert tables.count() >= (6 if which == "run" else 2)
    assert all(tables.nth(i).is_visible() for i in range(tables.count()))
    imgs = page.evaluate(
        "Array.from(document.images).map(i => [i.alt, i.complete, i.naturalWidth, i.getBoundingClientRect().right])"
    )
    assert len(imgs) == 4, imgs
    assert all(ok and w > 0 for _, ok, w, _ in imgs), [alt for alt, ok, w, _ in imgs if not (ok and w > 0)]
    assert all(right <= WIDTH for *_, right in imgs)  # scaled to the page, not cut at its edge
    # the wide tables scroll inside their own box; the page itself never scrolls sideways
    assert page.evaluate("document.documentElement.scrollWidth") <= WIDTH
    warning = page.get_by_text(WARNING)
    assert warning.count() == 1 and warning.is_visible()
    if which == "run":
        assert page.locator("table.samples th").all_inner_texts() == ["question", "base", "v1", "v2", "teacher"]
        assert "<b>v2</b> answers" in page.locator("table.samples").inner_text()  # shown as text, not markup
    else:
        # the shifted run on all three metrics, the third run on held-out loss only (its loss is lower)
        assert page.locator("tr.better").count() == 4 and page.locator("tr.worse").count() == 0

    shot = tmp_path / f"report_{which}.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 50_000
    if keep := os.environ.get("BAIZE_REPORT_SCREENS"):
        Path(keep).mkdir(parents=True, exist_ok=True)
        shutil.copy(shot, Path(keep) / shot.name)
    page.close()
