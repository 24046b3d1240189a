"""The chat page in a real headless Chromium, against `baize-chat` started by its entry point: a message streams
answers into two panes, a blind vote lands in human_votes.jsonl, and answers (or messages) holding <script> and
HTML are shown as text.

Needs a Chromium binary (`make install` puts Debian's in place when run as root); the driver is the PyPI
`playwright` package pointed at that binary, so nothing is downloaded. BAIZE_CHAT_SCREENS=<dir> keeps the
screenshots."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers.chat_fixture import CACHE, make_base, make_chat_run

pytestmark = pytest.mark.slow  # starts baize-chat (a model load) and a browser: ~20 s here

# counts how often each pane's answer bubble changed while it was being written
COUNT_UPDATES = """() => {
  window.__updates = {};
  new MutationObserver((records) => {
    for (const r of records) {
      const pane = (r.target.nodeType === 3 ? r.target.parentElement : r.target).closest('.pane');
      if (pane) window.__updates[pane.dataset.model] = (window.__updates[pane.dataset.model] || 0) + 1;
    }
  }).observe(document.getElementById('panes'), {subtree: true, childList: true, characterData: true});
}"""


def _chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if found := shutil.which(name):
            return found
    pytest.skip("no Chromium binary (apt-get install chromium, or `make install` as root)")


@pytest.fixture(scope="module")
def page_url(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("chatpage")
    run = make_chat_run(tmp / "run", make_base(tmp / "base"))
    proc = subprocess.Popen(
        [sys.executable, "-m", "baize_exp.serve.ui", str(run), "--port", "0", "--cache-dir", str(CACHE)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        # "baize-chat: http://127.0.0.1:PORT/  models: ...; votes -> ..." once it listens
        line = next((x for x in proc.stdout if x.startswith("baize-chat: ")), "")
        assert line.startswith("baize-chat: http://127.0.0.1:"), line
        yield line.split()[1], run
    finally:
        proc.terminate()
        proc.wait(timeout=60)


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    exe = _chromium()
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=exe, args=["--no-sandbox"])  # root in containers: no sandbox
        yield b
        b.close()


def _keep(page, name: str) -> None:
    if keep := os.environ.get("BAIZE_CHAT_SCREENS"):
        Path(keep).mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(Path(keep) / name))


def test_chat_streams_into_two_panes_and_the_arena_records_a_blind_vote(browser, page_url) -> None:
    from playwright.sync_api import expect

    url, run = page_url
    page = browser.new_page(viewport={"width": 1280, "height": 860})
    outside: list[str] = []
    page.on("request", lambda r: None if r.url.startswith(url) or r.url.startswith("data:") else outside.append(r.url))
    errors: list[str] = []
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.goto(url, wait_until="load")

    page.locator("#model-picks input[value=v2]").uncheck()  # two panes: base and v1
    assert page.locator("#panes .pane").count() == 2
    assert page.locator("#panes .pane .fmt").all_inner_texts() == ["chat template", "Baize format"]
    page.fill("#temperature", "0")
    page.fill("#max_tokens", "40")
    page.evaluate(COUNT_UPDATES)
    page.fill("#chat-input", "Hello <b>there</b>, how are you?")
    page.click("#send")
    # (the page's CSP forbids eval, so waits are on locators, not wait_for_function strings)
    expect(page.locator("#send")).to_be_enabled(timeout=120_000)  # disabled while any pane is streaming
    answers = page.locator("#panes .msg.ai").all_inner_texts()
    assert len(answers) == 2 and all(a.strip() and not a.startswith("error") for a in answers), answers
    updates = page.evaluate("window.__updates")
    assert updates["base"] > 3 and updates["v1"] > 3, updates  # written token by token, not once at the end
    assert page.locator("#panes .msg.user").first.inner_text() == "Hello <b>there</b>, how are you?"  # shown as typed
    assert page.locator("#panes .msg b").count() == 0
    _keep(page, "chat.png")

    page.click("#tab-arena")
    page.fill("#arena-input", "Name three fruits.")
    page.click("#arena-ask")
    expect(page.locator("#votes button[data-vote=A]")).to_be_enabled(timeout=120_000)
    shown = {s: page.locator(f"#arena-{s} .answer").inner_text() for s in "AB"}
    assert page.locator("#arena-A h2").inner_text() == "Model A"  # anonymous until the vote
    page.click("#votes button[data-vote=A]")
    expect(page.locator("#arena-result")).to_have_text(re.compile("^Recorded"))
    vote = json.loads((run / "eval" / "human_votes.jsonl").read_text().splitlines()[-1])
    assert vote["vote"] == "A" and vote["question"] == "Name three fruits."
    assert vote["answers"] == shown
    assert (
        page.locator("#arena-result").inner_text() == f"Recorded. A was {vote['order'][0]}, B was {vote['order'][1]}."
    )
    _keep(page, "arena.png")

    # an eval question shows the answers the eval stage recorded: markup in them must stay text
    page.click("#arena-eval")
    expect(page.locator("#votes button[data-vote=A]")).to_be_enabled(timeout=120_000)
    for s in "AB":
        box = page.locator(f"#arena-{s} .answer")
        assert "<script>window.__pwned = 1</script><b>bold</b><img src=x" in box.inner_text()
        assert box.locator("script, b, img").count() == 0
    assert page.evaluate("window.__pwned") is None
    assert not outside and not errors, (outside, errors)
    page.close()
