"""Regenerate docs/chat.png: `baize-chat` on a run, one message to base and v1, a screenshot of the page.

    python docs/chat_screenshot.py outputs/<date>/<time> [--message "..."] [--out docs/chat.png]

Drives Debian's Chromium through playwright, as the browser tests do (nothing is downloaded)."""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("run", type=Path)
    ap.add_argument("--message", default="How do I keep a basil plant alive indoors?")
    ap.add_argument("--max-tokens", default="64")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "chat.png")
    args = ap.parse_args()
    from playwright.sync_api import expect, sync_playwright

    proc = subprocess.Popen(
        [sys.executable, "-m", "baize_exp.serve.ui", str(args.run), "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        line = next(x for x in proc.stdout if x.startswith("baize-chat: "))
        url = line.split()[1]
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=shutil.which("chromium"), args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 1180, "height": 560})
            page.goto(url, wait_until="load")
            page.locator("#model-picks input[value=v2]").uncheck()
            page.fill("#temperature", "0")
            page.fill("#max_tokens", args.max_tokens)
            page.fill("#chat-input", args.message)
            page.click("#send")
            expect(page.locator("#send")).to_be_enabled(timeout=600_000)
            page.screenshot(path=str(args.out))
            browser.close()
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    print(f"{args.out}: {args.out.stat().st_size // 1024} KiB")


if __name__ == "__main__":
    main()
