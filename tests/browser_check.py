"""Open an HTML report in Debian's headless Chromium and report what a reader would see.

Used by the report tests. The page is opened from disk (``file://``) with every network
feature off; a test-only copy of the page gets a small script that, once the page has
loaded, records the sections present, each image's ``naturalWidth`` and any script error
into the DOM, which ``--dump-dom`` then prints. Console errors (a resource that failed to
load, a JavaScript error) come from Chromium's own log on stderr.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

#: Chromium's flags for a closed machine (see the environment notes): no background
#: networking, no component updates, no sync, no GPU; root needs --no-sandbox.
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-extensions", "--hide-scrollbars", "--enable-logging=stderr", "--v=0"]

_PROBE = """
<script>
window.__errors = [];
const __consoleError = console.error.bind(console);
console.error = (...args) => { window.__errors.push('console.error: ' + args.join(' ')); __consoleError(...args); };
window.addEventListener('error', e => window.__errors.push(String(e.message || e.target && e.target.src)), true);
window.addEventListener('load', () => {
  const imgs = Array.from(document.images).map(i => ({alt: i.alt, complete: i.complete,
      naturalWidth: i.naturalWidth, naturalHeight: i.naturalHeight, inline: i.src.startsWith('data:image/png;base64,')}));
  const sections = Array.from(document.querySelectorAll('section')).map(s => ({id: s.id,
      heading: (s.querySelector('h2') || {}).textContent, images: s.querySelectorAll('img').length,
      missing: Array.from(s.querySelectorAll('.missing')).map(m => m.textContent)}));
  const out = document.createElement('pre');
  out.id = '__probe';
  out.textContent = JSON.stringify({title: document.title, images: imgs, sections: sections,
                                    errors: window.__errors});
  document.body.appendChild(out);
});
</script>
"""


def chromium() -> str | None:
    """Path of a Chromium binary, or None."""
    return shutil.which("chromium") or shutil.which("chromium-browser")


def _run(args: list[str], profile: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    exe = chromium()
    assert exe is not None
    return subprocess.run([exe, *FLAGS, f"--user-data-dir={profile}", *args], check=False, capture_output=True,
                          text=True, timeout=timeout)


def console_errors(stderr: str) -> list[str]:
    """Console messages at error level and failed loads from Chromium's stderr log."""
    lines = [ln for ln in stderr.splitlines() if "CONSOLE" in ln or "Failed to load resource" in ln
             or "Uncaught" in ln or "net::ERR_" in ln]
    return [ln for ln in lines if re.search(r"error|Uncaught|Failed|ERR_", ln, re.IGNORECASE)]


def inspect(html_file: Path, workdir: Path) -> tuple[dict, list[str]]:
    """(what the probe saw, console errors) for ``html_file`` opened in headless Chromium."""
    workdir.mkdir(parents=True, exist_ok=True)
    text = html_file.read_text(encoding="utf-8")
    probed = workdir / "probe.html"
    # first thing in the page, so it sees every error and console.error call
    head = re.search(r"<head[^>]*>", text, re.IGNORECASE)
    at = head.end() if head else 0
    probed.write_text(text[:at] + _PROBE + text[at:], encoding="utf-8")
    proc = _run(["--virtual-time-budget=5000", "--dump-dom", probed.resolve().as_uri()], workdir / "profile")
    match = re.search(r'<pre id="__probe">(.*?)</pre>', proc.stdout, re.DOTALL)
    if not match:
        raise AssertionError(f"the probe did not run (chromium exit {proc.returncode}); stderr tail:\n"
                             f"{proc.stderr[-2000:]}")
    import html as _html

    return json.loads(_html.unescape(match.group(1))), console_errors(proc.stderr)


def screenshot(html_file: Path, png: Path, workdir: Path, size: tuple[int, int] = (1100, 3000)) -> Path:
    """A PNG of ``html_file`` as Chromium renders it (the page itself, not the probe copy)."""
    png.parent.mkdir(parents=True, exist_ok=True)
    proc = _run([f"--window-size={size[0]},{size[1]}", f"--screenshot={png.resolve()}",
                 html_file.resolve().as_uri()], workdir / "profile-shot")
    if not png.is_file():
        raise AssertionError(f"chromium wrote no screenshot (exit {proc.returncode}): {proc.stderr[-2000:]}")
    return png
