"""Benchmark behind the chat page's library choice: Gradio (what Baize, FastChat and LLaMA-Factory use) against
FastAPI + a hand-written page (FastAPI and uvicorn are already dependencies). Each goes into a throwaway venv
under a temp dir (needs the package index; the project's .venv is not touched), then:

- install size: the venv's site-packages (pip included on both sides), and what Gradio would add to this
  project's own venv (`pip install --dry-run --report`);
- start time: a two-pane page served on loopback, from process start to the first 200 on `/`, interleaved
  A, B, A, B;
- what it reaches for: host names the server process resolves or connects to in its first seconds (socket calls
  logged), and requests the page makes in Chromium to anything but the server (with playwright and a Chromium
  binary; skipped without).

    python benchmarks/chat_page_choice.py [--rounds 5] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

GRADIO_APP = """
import sys
import gradio as gr

with gr.Blocks() as demo:
    with gr.Row():
        gr.Chatbot(label="A")
        gr.Chatbot(label="B")
    gr.Textbox()
demo.launch(server_name="127.0.0.1", server_port=int(sys.argv[1]))
"""
FASTAPI_APP = """
import sys
import uvicorn
from fastapi import FastAPI
from fastapi.responses import HTMLResponse

PAGE = "<!doctype html><div id=a></div><div id=b></div><textarea></textarea><script>a.textContent='ready'</script>"
app = FastAPI()
app.get("/")(lambda: HTMLResponse(PAGE))
uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), log_level="warning")
"""
# run a script with every name lookup and connect beyond loopback printed to stderr, for `seconds` seconds
NETWATCH = """
import os, runpy, socket, sys, threading
LOCAL = ("127.0.0.1", "::1", "localhost", None)
connect, lookup = socket.socket.connect, socket.getaddrinfo
def logged_connect(self, addr):
    if not (isinstance(addr, tuple) and addr[0] in LOCAL):
        print("CONNECT", addr[0], file=sys.stderr, flush=True)
    return connect(self, addr)
def logged_lookup(host, *a, **k):
    if host not in LOCAL:
        print("RESOLVE", host, file=sys.stderr, flush=True)
    return lookup(host, *a, **k)
socket.socket.connect, socket.getaddrinfo = logged_connect, logged_lookup
threading.Timer(float(sys.argv[1]), lambda: os._exit(0)).start()
sys.argv = sys.argv[2:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""

# the installed size of the named distributions (their RECORD files), MiB
SIZE_OF = (
    "import sys, importlib.metadata as m; "
    "print(sum(f.size or 0 for n in sys.argv[1:] for f in m.distribution(n).files or []) / 2**20)"
)


def venv(path: Path, packages: list[str]) -> Path:
    subprocess.run([sys.executable, "-m", "venv", str(path)], check=True)
    py = path / "bin" / "python"
    subprocess.run([str(py), "-m", "pip", "install", "-q", *packages], check=True)
    return py


def size_mib(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and not f.is_symlink()) / 2**20


def wait_ok(port: int, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=1) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing answered on port {port}")


def start_times(apps: dict[str, list[str]], rounds: int) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {k: [] for k in apps}
    port = 18700
    for _ in range(rounds):
        for name, cmd in apps.items():  # interleaved: A, B, A, B
            port += 1
            t0 = time.monotonic()
            p = subprocess.Popen([*cmd, str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            try:
                wait_ok(port)
                out[name].append(time.monotonic() - t0)
            finally:
                p.terminate()
                p.wait()
    return out


def outbound(cmd: list[str], netwatch: Path, seconds: float = 10, env: dict | None = None) -> list[str]:
    """Host names the app looks up or connects to (beyond loopback) in its first `seconds`."""
    env = {**os.environ, **(env or {})}
    r = subprocess.run(
        [cmd[0], str(netwatch), str(seconds), *cmd[1:], "18699"], capture_output=True, text=True, env=env
    )
    return sorted({line.split()[1] for line in r.stderr.splitlines() if line.startswith(("RESOLVE", "CONNECT"))})


def page_requests(apps: dict[str, list[str]]) -> dict[str, dict]:
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        return {}
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if not exe:
        return {}
    out = {}
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=exe, args=["--no-sandbox"])
        for k, (name, cmd) in enumerate(apps.items()):
            port = 18690 + k
            p = subprocess.Popen([*cmd, str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            try:
                wait_ok(port)
                page, seen = browser.new_page(), []
                page.on("request", lambda r, seen=seen: seen.append(r.url))
                page.goto(f"http://127.0.0.1:{port}/", wait_until="networkidle")
                elsewhere = sorted({u.split("/")[2] for u in seen if not u.startswith(f"http://127.0.0.1:{port}")})
                out[name] = {"requests": len(seen), "other_hosts": elsewhere}
                page.close()
            finally:
                p.terminate()
                p.wait()
        browser.close()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--keep", type=Path, help="build the venvs here (default: a temp dir, removed after)")
    args = ap.parse_args()
    work = args.keep or Path(tempfile.mkdtemp(prefix="chat_page_choice_"))
    work.mkdir(parents=True, exist_ok=True)
    (work / "gradio_app.py").write_text(GRADIO_APP)
    (work / "fastapi_app.py").write_text(FASTAPI_APP)
    (work / "netwatch.py").write_text(NETWATCH)
    py = {"gradio": venv(work / "gradio", ["gradio"]), "fastapi": venv(work / "fastapi", ["fastapi", "uvicorn"])}
    apps = {k: [str(py[k]), str(work / f"{k}_app.py")] for k in py}
    site = {k: next((work / k / "lib").glob("python3*/site-packages")) for k in py}
    report = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--dry-run", "-q", "--report", "-", "gradio"],
        capture_output=True,
        text=True,
    )
    added = [f"{i['metadata']['name']}=={i['metadata']['version']}" for i in json.loads(report.stdout)["install"]]
    names = [a.split("==")[0] for a in added]
    added_mib = float(subprocess.run([str(py["gradio"]), "-c", SIZE_OF, *names], capture_output=True, text=True).stdout)
    times = start_times(apps, args.rounds)
    result = {
        "site_packages_mib": {k: round(size_mib(v), 1) for k, v in site.items()},
        "gradio_adds_to_this_venv": added,
        "gradio_adds_mib": round(added_mib, 1),
        "start_to_first_200_s": {k: sorted(round(x, 2) for x in v) for k, v in times.items()},
        "start_median_s": {k: round(statistics.median(v), 2) for k, v in times.items()},
        "outbound_hosts": {k: outbound(cmd, work / "netwatch.py") for k, cmd in apps.items()},
        "outbound_hosts_gradio_analytics_off": outbound(
            apps["gradio"], work / "netwatch.py", env={"GRADIO_ANALYTICS_ENABLED": "False"}
        ),
        "page_in_chromium": page_requests(apps),
    }
    print(json.dumps(result, indent=2))
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
