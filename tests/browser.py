"""Open a page in headless Chromium as a person would, and say what that person would see wrong.

    result = check_page("report.html", "shot.png", 390, 844)
    assert result.problems == []            # console errors, uncaught exceptions, broken images, blank page
    assert not result.scrolls_sideways, result.overflowing

Chromium (Debian's `chromium`, installed by scripts/setup_env.sh) is driven over the DevTools protocol on
`--remote-debugging-pipe` (JSON messages ending in NUL on file descriptors 3 and 4; no extra Python
package). The command-line shortcuts are not enough for this check, measured on Chromium 156:
`--enable-logging=stderr --v=0` prints every console message as `INFO:CONSOLE:<line>] "text", source: ...`
whatever its level (console.log and console.error look the same) and says nothing of an image that failed
to load, and `--window-size` is clamped to at least 500 px wide in headless mode, so no phone width. Over the
protocol the viewport is emulated at any size (Emulation.setDeviceMetricsOverride, as DevTools' device
toolbar does), console calls arrive with their level (Runtime.consoleAPICalled), uncaught exceptions as
Runtime.exceptionThrown, the browser's own errors (a resource that failed to load) as Log.entryAdded, and
the page is measured after its load event with Runtime.evaluate.

What is checked (PageCheck.problems):
- console errors: console.error / console.assert calls and browser log entries of level "error";
- uncaught JavaScript exceptions (and unhandled promise rejections);
- broken images: every <img> must be complete with naturalWidth > 0;
- a blank page: the screenshot (the viewport, as first seen) is nearly one colour, or the body has no
  visible text (innerText, which leaves out what CSS hides);
- the page did not load at all (navigation error).
Sideways scrolling is reported apart (PageCheck.scrolls_sideways: the page is wider than the width it is
laid out in, documentElement.clientWidth; .overflowing names the elements that make it so): it matters at
phone width. For a phone, check with mobile=True (phone emulation) and that client_width is the phone's
width, i.e. the page has <meta name=viewport content="width=device-width">.
"""
from __future__ import annotations

import base64
import dataclasses
import fcntl
import json
import os
import select
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

PHONE = (390, 844)
DESKTOP = (1280, 900)
# The page may be this much wider than the window before it counts as scrolling sideways (sub-pixel layout).
SIDEWAYS_TOLERANCE_PX = 2
# The screenshot is "one colour" when fewer than this share of its pixels differ from its commonest colour
# (a line of text at 16 px covers far more).
BLANK_PIXEL_SHARE = 1e-4

CHROMIUM_FLAGS = (
    "--headless",                 # no display in CI or a container
    "--no-sandbox",               # the sandbox needs user namespaces, which containers (and root) lack
    "--disable-gpu",
    "--disable-dev-shm-usage",    # a container's /dev/shm is small: shared memory goes to /tmp instead
    "--no-first-run",
    "--no-default-browser-check",
    "--disable-extensions",
    "--disable-background-networking",
    "--disable-sync",
    "--mute-audio",
    "--hide-scrollbars",          # overlay scrollbars, as on a phone: they neither take width nor show in shots
    "--remote-debugging-pipe",
)


def chromium_path() -> str | None:
    """The Chromium to run: $CHROMIUM, else `chromium` (Debian) or `chromium-browser` on PATH; None if none."""
    return os.environ.get("CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")


class BrowserError(RuntimeError):
    """Chromium could not be started or driven (not a problem of the page)."""


@dataclasses.dataclass
class PageCheck:
    url: str
    width: int
    height: int
    screenshot: str
    load_error: str | None = None
    console_errors: list[str] = dataclasses.field(default_factory=list)
    exceptions: list[str] = dataclasses.field(default_factory=list)
    images: list[dict] = dataclasses.field(default_factory=list)   # {"src", "alt", "ok", "width", "height"}
    visible_text_chars: int = 0
    screenshot_size: tuple[int, int] = (0, 0)
    non_background_pixels: int = 0
    inner_width: int = 0     # window.innerWidth (on a phone, zoomed out to fit a too-wide page: grows)
    client_width: int = 0    # document.documentElement.clientWidth: the width the page is laid out in
    scroll_width: int = 0
    overflowing: list[dict] = dataclasses.field(default_factory=list)  # outermost elements past the right edge

    @property
    def broken_images(self) -> list[str]:
        return [f"{i['src']} (alt {i['alt']!r})" for i in self.images if not i["ok"]]

    @property
    def blank_reasons(self) -> list[str]:
        reasons = []
        w, h = self.screenshot_size
        if self.non_background_pixels < BLANK_PIXEL_SHARE * w * h:
            reasons.append(f"the {w}x{h} screenshot is one colour but for {self.non_background_pixels} pixels")
        if self.visible_text_chars == 0:
            reasons.append("the body has no visible text")
        return reasons

    @property
    def blank(self) -> bool:
        return bool(self.blank_reasons)

    @property
    def scrolls_sideways(self) -> bool:
        """The page is wider than the width it is laid out in (scrollWidth > clientWidth + tolerance)."""
        return self.scroll_width > self.client_width + SIDEWAYS_TOLERANCE_PX

    @property
    def problems(self) -> list[str]:
        """What a person would see wrong, one line each (sideways scrolling apart); [] when none."""
        out = [f"page did not load: {self.load_error}"] if self.load_error else []
        out += [f"console error: {e}" for e in self.console_errors]
        out += [f"uncaught exception: {e}" for e in self.exceptions]
        out += [f"broken image: {b}" for b in self.broken_images]
        out += [f"blank page: {r}" for r in self.blank_reasons]
        return out

    def overflow_summary(self) -> str:
        """The elements that make the page scroll sideways, for an assertion message."""
        lines = [f"page {self.scroll_width} px wide in a {self.client_width} px window:"]
        for o in self.overflowing:
            lines.append(f"  {o['element']} in section {o['section']!r}, {o['kind']}: box {o['width']:.0f} px wide "
                         f"at x {o['left']:.0f}..{o['right']:.0f}" + (f" ({o['text']!r})" if o["text"] else ""))
        return "\n".join(lines)


class _DevTools:
    """The DevTools protocol over Chromium's --remote-debugging-pipe: we write fd 3, it writes fd 4."""

    def __init__(self, proc: subprocess.Popen, to_browser: int, from_browser: int, deadline: float, stderr_path):
        self.proc, self.to_browser, self.from_browser = proc, to_browser, from_browser
        self.deadline, self.stderr_path = deadline, stderr_path
        self.events: list[dict] = []
        self._buffer = b""
        self._next_id = 0

    def _stderr_tail(self) -> str:
        try:
            lines = Path(self.stderr_path).read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(lines[-15:])

    def _read_message(self) -> dict:
        while b"\0" not in self._buffer:
            left = self.deadline - time.monotonic()
            if left <= 0:
                raise BrowserError("Chromium did not answer in time; its stderr ends:\n" + self._stderr_tail())
            ready, _, _ = select.select([self.from_browser], [], [], left)
            if not ready:
                continue
            chunk = os.read(self.from_browser, 1 << 20)
            if not chunk:
                raise BrowserError(f"Chromium exited (status {self.proc.poll()}); its stderr ends:\n"
                                   + self._stderr_tail())
            self._buffer += chunk
        message, self._buffer = self._buffer.split(b"\0", 1)
        return json.loads(message)

    def call(self, method: str, params: dict | None = None, session: str | None = None) -> dict:
        self._next_id += 1
        msg = {"id": self._next_id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        data = json.dumps(msg).encode() + b"\0"
        while data:
            data = data[os.write(self.to_browser, data):]
        while True:
            reply = self._read_message()
            if reply.get("id") == self._next_id:
                if "error" in reply:
                    raise BrowserError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            if "method" in reply:
                self.events.append(reply)

    def wait_event(self, method: str, session: str) -> dict:
        k = 0
        while True:
            for event in self.events[k:]:
                if event["method"] == method and event.get("sessionId") == session:
                    return event
            k = len(self.events)
            self.events.append(self._read_message())


# Run in the page after its load event: images, text, widths, and the outermost elements past the right
# (or left) edge of the window, each with the heading of the section it is in.
_PROBE = """(() => {
  // The layout viewport: a phone that zooms out to fit a too-wide page widens innerWidth, not this.
  const vw = document.documentElement.clientWidth, tol = %(tol)d;
  const headings = Array.from(document.querySelectorAll('h1,h2,h3,h4'));
  const section = el => {
    let s = '';
    for (const h of headings) {
      if (h === el || (h.compareDocumentPosition(el) & Node.DOCUMENT_POSITION_FOLLOWING)) s = h.textContent.trim();
      else break;
    }
    return s;
  };
  const describe = el => {
    let d = el.tagName.toLowerCase();
    if (el.id) d += '#' + el.id;
    if (typeof el.className === 'string' && el.className.trim()) d += '.' + el.className.trim().split(/\\s+/).join('.');
    if (el.tagName === 'IMG') d += '[alt="' + el.alt + '"]';
    const r = el.getBoundingClientRect();
    const text = el.tagName === 'IMG' ? '' : (el.innerText || '').trim().replace(/\\s+/g, ' ').slice(0, 80);
    return {element: d, section: section(el), left: r.left, right: r.right, width: r.width, text: text};
  };
  const over = el => {
    const r = el.getBoundingClientRect();
    return r.width > 0 && (r.right > vw + tol || r.left < -tol);
  };
  // Outermost elements wider than the window, then the innermost boxes whose content (a long word, a
  // path) spills past its edge without anything inside them being too wide.
  const overflowing = [];
  const body = document.body;
  if (body) {
    const all = [body, ...body.querySelectorAll('*')];
    const wide = all.filter(el => over(el) && !(el !== body && over(el.parentElement)));
    const spill = all.filter(el => {
      if (over(el) || el.scrollWidth <= el.clientWidth + tol) return false;
      if (getComputedStyle(el).overflowX !== 'visible') return false;  // it scrolls or clips its own content
      return el.getBoundingClientRect().left + el.scrollWidth > vw + tol;
    });
    const inner = spill.filter(el => !wide.some(w => el.contains(w)) && !spill.some(o => o !== el && el.contains(o)));
    for (const el of wide) overflowing.push({...describe(el), kind: 'wider than the window'});
    for (const el of inner) overflowing.push({...describe(el), kind: 'content spills out'});
  }
  return {
    innerWidth: window.innerWidth,
    clientWidth: vw,
    scrollWidth: Math.max(document.documentElement.scrollWidth, body ? body.scrollWidth : 0),
    visibleTextChars: body ? body.innerText.trim().length : 0,
    images: Array.from(document.images).map(i => ({
      src: (i.currentSrc || i.getAttribute('src') || '').slice(0, 100), alt: i.alt,
      ok: i.complete && i.naturalWidth > 0, width: i.naturalWidth, height: i.naturalHeight})),
    overflowing: overflowing.slice(0, 40),
  };
})()""" % {"tol": SIDEWAYS_TOLERANCE_PX}

# After the load event: fonts loaded, a timer turn for late scripts, and two frames painted.
_SETTLE = ("document.fonts.ready.then(() => new Promise(r => setTimeout(r, 50)))"
           ".then(() => new Promise(r => requestAnimationFrame(() => requestAnimationFrame(r))))")


def _high_fd(fd: int) -> int:
    """`fd` moved to a number >= 10, so that bash can put it on 3 or 4 without clobbering the other."""
    high = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10)
    os.close(fd)
    return high


def _background_pixels(png: str) -> tuple[tuple[int, int], int]:
    """(size, number of pixels that differ from the commonest colour) of a PNG."""
    from PIL import Image

    with Image.open(png) as im:
        rgb = im.convert("RGB")
        w, h = rgb.size
        colours = rgb.getcolors(maxcolors=w * h)
    return (w, h), w * h - max(count for count, _ in colours)


def check_page(html_path, out_png, width: int, height: int, *, timeout: float = 30.0,
               mobile: bool = False) -> PageCheck:
    """Open `html_path` (a local file) in headless Chromium with a `width` x `height` CSS-pixel viewport,
    write a screenshot of the viewport to `out_png` and return what was found (PageCheck).

    `mobile=True` emulates a phone's browser, as DevTools' device mode does: the page's
    `<meta name=viewport>` is honoured (without one the page is laid out 980 px wide and shrunk, which
    client_width shows), and a page wider than its layout is zoomed out to fit (innerWidth grows with it;
    scroll_width > client_width still shows it). The default is a plain window of that size. Raises
    BrowserError when Chromium cannot be started or driven, FileNotFoundError when there is no Chromium or
    no such file.
    """
    exe = chromium_path()
    if exe is None:
        raise FileNotFoundError("no chromium on PATH (scripts/setup_env.sh installs Debian's chromium)")
    page = Path(html_path).resolve()
    if not page.is_file():
        raise FileNotFoundError(f"no such page: {page}")
    url = page.as_uri()
    result = PageCheck(url=url, width=width, height=height, screenshot=str(out_png))
    deadline = time.monotonic() + timeout
    tmp = tempfile.mkdtemp(prefix="check-page-")
    stderr_path = os.path.join(tmp, "chromium-stderr.txt")
    to_r, to_w = os.pipe()          # we write commands -> chromium reads fd 3
    from_r, from_w = os.pipe()      # chromium writes fd 4 -> we read replies and events
    to_r, from_w = _high_fd(to_r), _high_fd(from_w)
    # bash (not dash: it takes no fd above 9) moves the pipe ends to fds 3 and 4 and runs chromium.
    move_fds = f'exec "$@" 3<&{to_r} 4>&{from_w} {to_r}<&- {from_w}>&-'
    cmd = [shutil.which("bash") or "/bin/bash", "-c", move_fds, "bash", exe,
           *CHROMIUM_FLAGS, f"--user-data-dir={os.path.join(tmp, 'profile')}",
           f"--window-size={max(width, 500)},{height}",  # headless windows are at least 500 px wide: the
           "about:blank"]                                 # viewport is emulated below, at any size
    proc = None
    try:
        with open(stderr_path, "wb") as err:
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=err, stderr=err,
                                    pass_fds=(to_r, from_w), start_new_session=True)
        os.close(to_r)
        os.close(from_w)
        to_r = from_w = -1
        dt = _DevTools(proc, to_w, from_r, deadline, stderr_path)
        target = dt.call("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = dt.call("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        for domain in ("Page", "Runtime", "Log"):
            dt.call(f"{domain}.enable", session=session)
        dt.call("Emulation.setDeviceMetricsOverride", {
            "width": width, "height": height, "deviceScaleFactor": 1, "mobile": mobile,
            "screenWidth": width, "screenHeight": height}, session=session)
        nav = dt.call("Page.navigate", {"url": url}, session=session)
        if nav.get("errorText"):
            result.load_error = nav["errorText"]
        else:
            dt.wait_event("Page.loadEventFired", session)
            dt.call("Runtime.evaluate", {"expression": _SETTLE, "awaitPromise": True}, session=session)
        probe = dt.call("Runtime.evaluate", {"expression": _PROBE, "returnByValue": True}, session=session)
        if "exceptionDetails" in probe:
            raise BrowserError(f"the page probe failed: {probe['exceptionDetails']}")
        shot = dt.call("Page.captureScreenshot", {"format": "png"}, session=session)
        Path(out_png).write_bytes(base64.b64decode(shot["data"]))
        try:  # the reply may not come back before the pipe closes
            dt.call("Browser.close")
        except BrowserError:
            pass
        events = [e for e in dt.events if e.get("sessionId") == session]
    finally:
        for fd in (to_r, from_w, to_w, from_r):
            if fd >= 0:
                os.close(fd)
        if proc is not None:
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)  # the group we started (start_new_session)
                proc.wait()
        shutil.rmtree(tmp, ignore_errors=True)

    for e in events:
        p = e.get("params", {})
        if e["method"] == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert"):
            text = " ".join(str(a.get("value", a.get("description", ""))) for a in p.get("args", []))
            frames = (p.get("stackTrace") or {}).get("callFrames") or [{}]
            result.console_errors.append(f"{text} ({frames[0].get('url', '')}:{frames[0].get('lineNumber', -1) + 1})")
        elif e["method"] == "Log.entryAdded" and p.get("entry", {}).get("level") == "error":
            entry = p["entry"]
            result.console_errors.append(f"{entry.get('text', '')} ({entry.get('url', '')})")
        elif e["method"] == "Runtime.exceptionThrown":
            d = p.get("exceptionDetails", {})
            desc = (d.get("exception") or {}).get("description") or ""
            result.exceptions.append(f"{d.get('text', '')} {desc.splitlines()[0] if desc else ''} "
                                     f"({d.get('url', '')}:{d.get('lineNumber', -1) + 1})".replace("  ", " "))
    value = probe["result"]["value"]
    result.images = value["images"]
    result.visible_text_chars = value["visibleTextChars"]
    result.inner_width, result.client_width = value["innerWidth"], value["clientWidth"]
    result.scroll_width = value["scrollWidth"]
    result.overflowing = value["overflowing"]
    result.screenshot_size, result.non_background_pixels = _background_pixels(out_png)
    return result
