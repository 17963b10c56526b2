"""Check the built documentation in a real browser: headless Chromium, driven over the Chrome DevTools
Protocol, opens every HTML page of the site at a 1280-px-wide window, waits for MathJax to finish,
saves a full-page screenshot, and checks that

- the page's rendered text (code blocks excluded) holds no raw TeX: no ``$…$`` pair, no ``\\frac``,
  ``\\mathbb``-style command, no ``\\(``/``\\[`` delimiters — i.e. every formula was typeset;
- MathJax reported no formula it could not parse and no undefined macro (no ``mjx-merror`` element,
  nothing MathJax drew in red — how it shows an unknown command such as ``\\llbracket``);
- no code block (``pre``) is wider than its box: ``scrollWidth <= clientWidth`` (no horizontal scroll).

Usage::

    python docs/check_pages.py docs/_build/html --screenshots docs/_build/screenshots

Prints one line per page and a summary; exits 1 when any page fails, 2 when the browser cannot run.
``--chromium`` names the browser (default: ``$CHROMIUM`` or ``/usr/bin/chromium``).
"""

from __future__ import annotations

import argparse
import base64
import functools
import http.server
import json
import os
import re
import shutil
import socketserver
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import websocket  # websocket-client (the `docs` extra)

WIDTH, HEIGHT = 1280, 900
MAX_SCREENSHOT_HEIGHT = 16000  # px; longer pages are captured down to this height

# Raw TeX that a reader would see if MathJax did not typeset a formula. `$` pairs must enclose
# something that looks like math (a backslash, ^, _ or =), so "$5 and $10" in prose is not flagged.
TEX_PATTERNS = {
    "dollar math": re.compile(r"\$[^$\n]{0,200}?(?:\\[a-zA-Z]+|[_^={}])[^$\n]{0,200}?\$"),
    "TeX command": re.compile(
        r"\\(?:frac|dfrac|sum|prod|int|mathbb|mathcal|mathrm|operatorname|hat|bar|tilde|log|exp|"
        r"alpha|beta|gamma|delta|lambda|mu|pi|sigma|theta|psi|phi|ell|mid|le|ge|ne|approx|propto|"
        r"llbracket|rrbracket|begin|end|left|right|big|Big|cdot|times|infty|sqrt|text|quad)\b"
    ),
    "TeX delimiter": re.compile(r"\\\(|\\\)|\\\[|\\\]"),
}

# Runs in the page: the visible text without code, MathJax's output and scripts; MathJax errors;
# code blocks wider than their box.
PAGE_PROBE = r"""
(() => {
  const clone = document.body.cloneNode(true);
  const hidden = 'pre, code, script, style, mjx-container, .MathJax, nav, .sidebar-drawer, .toc-drawer';
  clone.querySelectorAll(hidden).forEach(e => e.remove());
  const overflow = [];
  document.querySelectorAll('pre').forEach((pre, i) => {
    if (pre.scrollWidth > pre.clientWidth + 1) {
      const longest = pre.innerText.split('\n').reduce((a, b) => (b.length > a.length ? b : a), '');
      overflow.push({index: i, scrollWidth: pre.scrollWidth, clientWidth: pre.clientWidth,
                     longest: longest.slice(0, 160), chars: longest.length});
    }
  });
  return JSON.stringify({
    text: clone.innerText,
    math: document.querySelectorAll('mjx-container').length,
    mathErrors: Array.from(document.querySelectorAll(
      'mjx-merror, mjx-container [style*="color: red"], mjx-container [mathcolor="red"]'))
      .map(e => e.textContent.slice(0, 80)).filter(t => t.trim()),
    codeBlocks: document.querySelectorAll('pre').length,
    contentWidth: (document.querySelector('article') || document.body).clientWidth,
    overflow: overflow,
    height: Math.ceil(document.documentElement.scrollHeight),
  });
})()
"""

WAIT_FOR_MATHJAX = """
(async () => {
  if (typeof MathJax === 'undefined' || !MathJax.startup) { return 'none'; }
  await MathJax.startup.promise;
  return 'done';
})()
"""


@dataclass
class PageReport:
    path: str
    math: int = 0
    code_blocks: int = 0
    tex: list[str] = field(default_factory=list)
    math_errors: list[str] = field(default_factory=list)
    overflow: list[dict] = field(default_factory=list)
    js_errors: list[str] = field(default_factory=list)
    screenshot: str = ""
    failure: str = ""

    @property
    def ok(self) -> bool:
        return not (self.tex or self.math_errors or self.overflow or self.failure)


class DevTools:
    """A minimal synchronous Chrome DevTools Protocol client over one page's websocket."""

    def __init__(self, ws_url: str):
        self.ws = websocket.create_connection(ws_url, timeout=120, suppress_origin=True)
        self.next_id = 0
        self.events: list[dict] = []

    def call(self, method: str, **params):
        self.next_id += 1
        self.ws.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        while True:
            message = json.loads(self.ws.recv())
            if message.get("id") == self.next_id:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message.get("result", {})
            self.events.append(message)

    def evaluate(self, expression: str, await_promise: bool = False):
        result = self.call(
            "Runtime.evaluate", expression=expression, awaitPromise=await_promise, returnByValue=True
        )
        if "exceptionDetails" in result:
            raise RuntimeError(f"page script failed: {result['exceptionDetails'].get('text')}")
        return result["result"].get("value")

    def drain(self, kind: str) -> list[dict]:
        found = [e for e in self.events if e.get("method") == kind]
        self.events = [e for e in self.events if e.get("method") != kind]
        return found

    def close(self) -> None:
        self.ws.close()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:  # no request log
        pass


def serve(root: Path) -> tuple[socketserver.TCPServer, str]:
    """Serve ``root`` over HTTP on a free local port (MathJax loads its fonts by URL)."""
    handler = functools.partial(_QuietHandler, directory=str(root))
    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}/"


def launch(chromium: str, profile: Path) -> tuple[subprocess.Popen, str]:
    """Start headless Chromium with a fresh profile; returns the process and a page's websocket URL."""
    args = [
        chromium,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        "--hide-scrollbars",
        "--remote-allow-origins=*",
        "--remote-debugging-port=0",
        f"--user-data-dir={profile}",
        f"--window-size={WIDTH},{HEIGHT}",
        "about:blank",
    ]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    port_file = profile / "DevToolsActivePort"
    deadline = time.monotonic() + 60
    while not port_file.exists() or not port_file.read_text().strip():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"{chromium} did not start (exit code {proc.poll()})")
        time.sleep(0.1)
    port = int(port_file.read_text().split()[0])
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=5) as r:
                pages = [t for t in json.load(r) if t.get("type") == "page"]
            if pages:
                return proc, pages[0]["webSocketDebuggerUrl"]
        except OSError:
            pass
        if time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError("Chromium's DevTools endpoint did not answer")
        time.sleep(0.2)


def raw_tex(text: str) -> list[str]:
    """Snippets of ``text`` that look like untypeset TeX."""
    found = []
    for name, pattern in TEX_PATTERNS.items():
        for m in pattern.finditer(text):
            start = max(0, m.start() - 30)
            found.append(f"{name}: …{text[start : m.end() + 30]!s}…".replace("\n", " "))
    return found


def check_page(tools: DevTools, url: str, rel: str, shots: Path | None) -> PageReport:
    report = PageReport(rel)
    tools.call("Page.navigate", url=url)
    deadline = time.monotonic() + 60
    while tools.evaluate("document.readyState") != "complete":
        if time.monotonic() > deadline:
            report.failure = "page did not finish loading in 60 s"
            return report
        time.sleep(0.05)
    tools.evaluate(WAIT_FOR_MATHJAX, await_promise=True)
    tools.evaluate("document.fonts.ready.then(() => true)", await_promise=True)
    probe = json.loads(tools.evaluate(PAGE_PROBE))
    report.math, report.math_errors = probe["math"], probe["mathErrors"]
    report.code_blocks, report.overflow = probe["codeBlocks"], probe["overflow"]
    report.tex = raw_tex(probe["text"])
    for event in tools.drain("Runtime.exceptionThrown"):
        details = event["params"]["exceptionDetails"]
        report.js_errors.append(details.get("exception", {}).get("description") or details.get("text", ""))
    if shots is not None:
        height = min(probe["height"], MAX_SCREENSHOT_HEIGHT)
        clip = {"x": 0, "y": 0, "width": WIDTH, "height": height, "scale": 1}
        shot = tools.call("Page.captureScreenshot", format="png", clip=clip, captureBeyondViewport=True)
        out = shots / (rel.replace("/", "__").removesuffix(".html") + ".png")
        out.write_bytes(base64.b64decode(shot["data"]))
        report.screenshot = str(out)
    return report


def pages_of(root: Path) -> list[str]:
    """Every HTML page of the site (the generated index and search pages included), not the files
    under ``_static``/``_sources``."""
    return sorted(
        p.relative_to(root).as_posix()
        for p in root.rglob("*.html")
        if not any(part.startswith("_") for part in p.relative_to(root).parts)
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("html", type=Path, help="the built site (docs/_build/html)")
    parser.add_argument("--screenshots", type=Path, default=None, help="folder for one PNG per page")
    parser.add_argument("--chromium", default=os.environ.get("CHROMIUM", "/usr/bin/chromium"))
    parser.add_argument("--report", type=Path, default=None, help="write the per-page results as JSON")
    parser.add_argument("--pages", nargs="*", default=None, help="only these pages (paths under html/)")
    args = parser.parse_args(argv)

    if not (args.html / "index.html").is_file():
        print(f"check_pages: no built site at {args.html} (run `make docs` first)", file=sys.stderr)
        return 2
    if shutil.which(args.chromium) is None:
        print(
            f"check_pages: no browser at {args.chromium} (Debian: apt-get install chromium)", file=sys.stderr
        )
        return 2
    if args.screenshots is not None:
        shutil.rmtree(args.screenshots, ignore_errors=True)
        args.screenshots.mkdir(parents=True)

    pages = pages_of(args.html) if not args.pages else args.pages
    server, base = serve(args.html)
    profile = Path(tempfile.mkdtemp(prefix="ppinfer-docs-chromium-"))
    try:
        proc, ws_url = launch(args.chromium, profile)
    except RuntimeError as error:
        print(f"check_pages: {error}", file=sys.stderr)
        return 2
    reports: list[PageReport] = []
    start = time.perf_counter()
    try:
        tools = DevTools(ws_url)
        tools.call("Page.enable")
        tools.call("Runtime.enable")
        tools.call(
            "Emulation.setDeviceMetricsOverride",
            width=WIDTH,
            height=HEIGHT,
            deviceScaleFactor=1,
            mobile=False,
        )
        for i, rel in enumerate(pages, start=1):
            try:
                report = check_page(tools, base + rel, rel, args.screenshots)
            except (RuntimeError, websocket.WebSocketException, OSError) as error:
                report = PageReport(rel, failure=str(error))
            reports.append(report)
            status = "ok  " if report.ok else "FAIL"
            print(
                f"[{i:2d}/{len(pages)}] {status} {rel:40s} math {report.math:3d}  code blocks "
                f"{report.code_blocks:3d}  raw TeX {len(report.tex)}  overflowing {len(report.overflow)}"
                + (f"  MathJax errors {len(report.math_errors)}" if report.math_errors else "")
                + (f"  JS errors {len(report.js_errors)}" if report.js_errors else ""),
                flush=True,
            )
            for snippet in report.tex[:5]:
                print(f"        raw TeX {snippet}")
            for snippet in report.math_errors[:5]:
                print(f"        MathJax could not typeset: {snippet!r}")
            for block in report.overflow[:5]:
                print(
                    f"        code block {block['index']} overflows ({block['scrollWidth']} > "
                    f"{block['clientWidth']} px; longest line {block['chars']} chars): {block['longest']!r}"
                )
            for message in report.js_errors[:3]:
                print(f"        JS error: {message.splitlines()[0] if message else ''}")
            if report.failure:
                print(f"        {report.failure}")
        tools.close()
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
        server.shutdown()
        shutil.rmtree(profile, ignore_errors=True)

    failed = [r for r in reports if not r.ok]
    if args.report is not None:
        args.report.write_text(json.dumps([r.__dict__ for r in reports], indent=1))
    print(
        f"check_pages: {len(reports)} pages in {time.perf_counter() - start:.1f} s, "
        f"{sum(r.math for r in reports)} formulas typeset, "
        f"{sum(r.code_blocks for r in reports)} code blocks; "
        f"{len(failed)} failing" + (f"; screenshots in {args.screenshots}" if args.screenshots else "")
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
