"""Drive a headless Chromium over the DevTools protocol on a pipe: open pages, click, read the DOM,
collect console errors and requests, take screenshots. No Python dependency and no driver binary:
Chromium's ``--remote-debugging-pipe`` reads JSON commands (NUL-terminated) on file descriptor 3
and writes replies and events on 4 (the channel Puppeteer and Playwright use).

    with HeadlessChromium() as browser:
        page = browser.open(Path("site/index.html").resolve().as_uri())
        page.click("#list li:nth-child(2)")
        page.evaluate("document.querySelectorAll('.ctx').length")
        page.screenshot("shot.png")
        assert not page.errors

The browser starts with ``--headless --no-sandbox --disable-gpu --disable-quic --no-first-run
--disable-background-networking --disable-component-update --disable-sync`` and a fresh
``--user-data-dir`` (a temporary folder removed at exit), and the page's network is switched to
offline, so a page that needs the network shows it as errors. Install: ``apt-get install
chromium`` (Debian); :func:`find_chromium` finds ``chromium`` / ``chromium-browser`` /
``google-chrome`` on the PATH or ``$CHROMIUM``.
"""

from __future__ import annotations

import base64
import fcntl
import json
import os
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-extensions",
    "--disable-dev-shm-usage",
    "--hide-scrollbars",
    "--mute-audio",
)


def find_chromium() -> str | None:
    """The Chromium executable: ``$CHROMIUM``, else the first of chromium, chromium-browser,
    google-chrome on the PATH; None if there is none."""
    env = os.environ.get("CHROMIUM")
    if env and Path(env).is_file():
        return env
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        path = shutil.which(name)
        if path:
            return path
    return None


class ChromiumError(RuntimeError):
    """The browser failed to start, died, or answered a command with an error."""


class Page:
    """One tab, attached through a flat DevTools session."""

    def __init__(self, browser: HeadlessChromium, session: str) -> None:
        self.browser = browser
        self.session = session
        self.errors: list[str] = []
        self.console: list[str] = []
        self.requests: list[str] = []

    def send(self, method: str, params: dict[str, Any] | None = None, timeout: float = 30) -> Any:
        return self.browser.send(method, params, session=self.session, timeout=timeout)

    def _event(self, msg: dict[str, Any]) -> None:
        method, params = msg.get("method"), msg.get("params", {})
        if method == "Runtime.consoleAPICalled":
            text = " ".join(str(a.get("value", a.get("description", ""))) for a in params["args"])
            self.console.append(f"{params['type']}: {text}")
            if params["type"] in ("error", "assert"):
                self.errors.append(f"console.{params['type']}: {text}")
        elif method == "Runtime.exceptionThrown":
            d = params["exceptionDetails"]
            desc = d.get("exception", {}).get("description") or d.get("text", "")
            self.errors.append(f"exception: {desc} (line {d.get('lineNumber')})")
        elif method == "Log.entryAdded" and params["entry"]["level"] == "error":
            e = params["entry"]
            self.errors.append(f"log: {e.get('text')} {e.get('url', '')}".strip())
        elif method == "Network.requestWillBeSent":
            self.requests.append(params["request"]["url"])
        elif method == "Network.loadingFailed" and not params.get("canceled"):
            self.errors.append(f"network: {params.get('errorText')}")

    def goto(self, url: str, timeout: float = 30) -> None:
        """Navigate and wait for the load event."""
        self.browser.clear_events(self.session, "Page.loadEventFired")
        reply = self.send("Page.navigate", {"url": url}, timeout=timeout)
        if reply.get("errorText"):
            raise ChromiumError(f"cannot open {url}: {reply['errorText']}")
        self.browser.wait_event(self.session, "Page.loadEventFired", timeout)

    def evaluate(self, expression: str, timeout: float = 30) -> Any:
        """The value of a JavaScript expression in the page (JSON-serialisable results)."""
        reply = self.send(
            "Runtime.evaluate",
            {"expression": expression, "returnByValue": True, "awaitPromise": True},
            timeout=timeout,
        )
        if "exceptionDetails" in reply:
            d = reply["exceptionDetails"]
            raise ChromiumError(
                f"{expression!r} threw: {d.get('exception', {}).get('description', d)}"
            )
        return reply.get("result", {}).get("value")

    def click(self, selector: str) -> None:
        """Click the first element matching a CSS selector (a DOM click event)."""
        found = self.evaluate(
            f"(() => {{ const e = document.querySelector({json.dumps(selector)});"
            " if (!e) return false; e.click(); return true; })()"
        )
        if not found:
            raise ChromiumError(f"no element matches {selector!r}")

    def screenshot(self, path: str | Path, full_page: bool = False) -> Path:
        """A PNG of the viewport (or the whole page) written to ``path``."""
        params: dict[str, Any] = {"format": "png"}
        if full_page:
            params["captureBeyondViewport"] = True
        data = self.send("Page.captureScreenshot", params)["data"]
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(data))
        return path


class HeadlessChromium:
    """A headless Chromium process and its DevTools pipe (a context manager)."""

    def __init__(
        self,
        executable: str | None = None,
        *,
        width: int = 1280,
        height: int = 900,
        offline: bool = True,
        extra_flags: tuple[str, ...] = (),
    ) -> None:
        exe = executable or find_chromium()
        if exe is None:
            raise FileNotFoundError(
                "no Chromium found: `apt-get install chromium` (Debian) or set $CHROMIUM"
            )
        self.executable = exe
        self.width, self.height, self.offline = width, height, offline
        self.extra_flags = extra_flags
        self._next = 0
        self._replies: dict[int, dict[str, Any]] = {}
        self._events: list[dict[str, Any]] = []
        self._pages: dict[str, Page] = {}
        self._cond = threading.Condition()
        self._proc: subprocess.Popen[bytes] | None = None
        self._profile: str | None = None

    # --- process -------------------------------------------------------------------------------
    def start(self) -> HeadlessChromium:
        self._profile = tempfile.mkdtemp(prefix="chromium-profile-")
        cmd_r, self._cmd_w = os.pipe()  # we write commands; Chromium reads fd 3
        self._resp_r, resp_w = os.pipe()  # Chromium writes fd 4; we read

        def child() -> None:  # runs in the child before exec: map the pipe ends to fds 3 and 4
            high_r = fcntl.fcntl(cmd_r, fcntl.F_DUPFD, 10)  # out of the way of 3 and 4 first
            high_w = fcntl.fcntl(resp_w, fcntl.F_DUPFD, 10)
            os.dup2(high_r, 3, inheritable=True)
            os.dup2(high_w, 4, inheritable=True)

        args = [
            self.executable,
            *FLAGS,
            *self.extra_flags,
            "--remote-debugging-pipe",
            f"--user-data-dir={self._profile}",
            f"--window-size={self.width},{self.height}",
            "about:blank",
        ]
        self._proc = subprocess.Popen(
            args,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            preexec_fn=child,
            close_fds=False,
        )
        os.close(cmd_r)
        os.close(resp_w)
        self._stderr: list[bytes] = []
        threading.Thread(target=self._read, daemon=True).start()
        threading.Thread(target=self._drain_stderr, daemon=True).start()
        try:
            self.send("Browser.getVersion", timeout=60)
        except ChromiumError:
            self.close()
            raise
        return self

    def _drain_stderr(self) -> None:
        assert self._proc is not None and self._proc.stderr is not None
        for line in self._proc.stderr:
            self._stderr.append(line)
            del self._stderr[:-50]

    def _read(self) -> None:
        buf = b""
        while True:
            try:
                chunk = os.read(self._resp_r, 1 << 16)
            except OSError:
                chunk = b""
            if not chunk:
                with self._cond:
                    self._events.append({"method": "_closed"})
                    self._cond.notify_all()
                return
            buf += chunk
            while b"\0" in buf:
                raw, buf = buf.split(b"\0", 1)
                msg = json.loads(raw)
                with self._cond:
                    if "id" in msg:
                        self._replies[msg["id"]] = msg
                    else:
                        page = self._pages.get(msg.get("sessionId", ""))
                        if page is not None:
                            page._event(msg)
                        self._events.append(msg)
                    self._cond.notify_all()

    def _dead(self) -> str | None:
        if (
            self._proc is None
            or self._proc.poll() is not None
            or any(e.get("method") == "_closed" for e in self._events)
        ):
            tail = b"".join(self._stderr[-10:]).decode(errors="replace")
            return f"Chromium ({self.executable}) is not running. Its last output:\n{tail}"
        return None

    def send(
        self,
        method: str,
        params: dict[str, Any] | None = None,
        *,
        session: str | None = None,
        timeout: float = 30,
    ) -> Any:
        """Send one DevTools command and wait for its reply (``result``)."""
        with self._cond:
            self._next += 1
            mid = self._next
        msg: dict[str, Any] = {"id": mid, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        try:
            os.write(self._cmd_w, json.dumps(msg).encode() + b"\0")
        except OSError as err:
            raise ChromiumError(self._dead() or f"cannot write to Chromium: {err}") from err
        deadline = time.monotonic() + timeout
        with self._cond:
            while mid not in self._replies:
                dead = self._dead()
                if dead:
                    raise ChromiumError(dead)
                left = deadline - time.monotonic()
                if left <= 0:
                    raise ChromiumError(f"Chromium did not answer {method} within {timeout} s")
                self._cond.wait(min(left, 0.5))
            reply = self._replies.pop(mid)
        if "error" in reply:
            raise ChromiumError(f"{method}: {reply['error'].get('message')}")
        return reply.get("result", {})

    def clear_events(self, session: str, method: str) -> None:
        with self._cond:
            self._events = [
                e for e in self._events
                if not (e.get("sessionId") == session and e.get("method") == method)
            ]  # fmt: skip

    def wait_event(self, session: str, method: str, timeout: float = 30) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for e in self._events:
                    if e.get("sessionId") == session and e.get("method") == method:
                        self._events.remove(e)
                        return e
                dead = self._dead()
                if dead:
                    raise ChromiumError(dead)
                left = deadline - time.monotonic()
                if left <= 0:
                    raise ChromiumError(f"no {method} within {timeout} s")
                self._cond.wait(min(left, 0.5))

    # --- pages ---------------------------------------------------------------------------------
    def new_page(self) -> Page:
        """A new tab with Runtime, Log, Page and Network events on (network offline)."""
        target = self.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = self.send("Target.attachToTarget", {"targetId": target, "flatten": True})[
            "sessionId"
        ]
        page = Page(self, session)
        self._pages[session] = page
        for domain in ("Runtime", "Log", "Page", "Network"):
            page.send(f"{domain}.enable")
        page.send(
            "Emulation.setDeviceMetricsOverride",
            {"width": self.width, "height": self.height, "deviceScaleFactor": 1, "mobile": False},
        )
        if self.offline:
            page.send(
                "Network.emulateNetworkConditions",
                {"offline": True, "latency": 0, "downloadThroughput": -1, "uploadThroughput": -1},
            )
        return page

    def open(self, url: str, timeout: float = 30) -> Page:
        """A new tab at ``url``, after its load event."""
        page = self.new_page()
        page.goto(url, timeout=timeout)
        return page

    def close(self) -> None:
        """Close the browser (politely, then by force) and remove its profile folder."""
        if self._proc is not None and self._proc.poll() is None:
            try:
                os.write(
                    self._cmd_w, json.dumps({"id": 0, "method": "Browser.close"}).encode() + b"\0"
                )
                self._proc.wait(timeout=10)
            except (OSError, subprocess.TimeoutExpired):
                self._proc.kill()
                self._proc.wait(timeout=10)
        for fd in (getattr(self, "_cmd_w", None), getattr(self, "_resp_r", None)):
            if fd is not None:
                try:
                    os.close(fd)
                except OSError:
                    pass
        self._cmd_w = self._resp_r = None  # type: ignore[assignment]
        if self._profile:
            shutil.rmtree(self._profile, ignore_errors=True)
            self._profile = None

    def __enter__(self) -> HeadlessChromium:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()
