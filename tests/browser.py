"""A real headless Chromium for the tests, driven over the DevTools protocol on a pipe.

`--remote-debugging-pipe` makes Chromium read protocol messages (JSON, each ended by a NUL
byte) on its fd 3 and write its answers and events on fd 4: no port, no websocket library.
`Browser.open(url)` loads a page and returns what it saw: every request, every failed one,
console errors, and (via `Page.evaluate`) anything the page's DOM can tell.
"""
from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

CANDIDATES = ("/usr/bin/chromium", "/usr/bin/chromium-browser", "/usr/bin/google-chrome")
FLAGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-extensions", "--disable-sync", "--disable-default-apps", "--no-first-run",
         "--no-default-browser-check", "--mute-audio", "--hide-scrollbars",
         "--disable-dev-shm-usage", "--remote-debugging-pipe"]


def find_chromium() -> str | None:
    """The path of a Chromium that starts here, or None."""
    for path in (os.environ.get("CHROMIUM"), *CANDIDATES, shutil.which("chromium")):
        if path and os.path.isfile(path) and os.access(path, os.X_OK):
            try:
                subprocess.run([path, "--version"], capture_output=True, timeout=30, check=True)
            except (OSError, subprocess.SubprocessError):
                continue
            return path
    return None


class BrowserError(RuntimeError):
    pass


class Page:
    """One tab: what it requested, what failed, what it logged."""

    def __init__(self, browser: "Browser", session: str):
        self.browser, self.session = browser, session
        self.requests: list[str] = []
        self.failed: list[tuple[str, str]] = []
        self.errors: list[str] = []

    def send(self, method: str, **params) -> dict:
        return self.browser.send(method, session=self.session, **params)

    def evaluate(self, expression: str):
        """The JSON value of a JavaScript expression evaluated in the page."""
        result = self.send("Runtime.evaluate", expression=expression, returnByValue=True,
                           awaitPromise=True)
        if "exceptionDetails" in result:
            raise BrowserError(f"{expression!r} threw: {result['exceptionDetails']}")
        return result["result"].get("value")

    def screenshot(self, path: Path, width: int = 1200, height: int | None = None) -> Path:
        """A PNG of the page at `width` CSS pixels, `height` tall (default: the whole page)."""
        full = self.evaluate("document.documentElement.scrollHeight")
        height = min(height or full, full)
        self.send("Emulation.setDeviceMetricsOverride", width=width, height=height,
                  deviceScaleFactor=1, mobile=False)
        data = self.send("Page.captureScreenshot", format="png", captureBeyondViewport=True,
                         clip={"x": 0, "y": 0, "width": width, "height": height, "scale": 1})
        path.write_bytes(base64.b64decode(data["data"]))
        return path

    def _event(self, method: str, params: dict) -> None:
        if method == "Network.requestWillBeSent":
            self.requests.append(params["request"]["url"])
        elif method == "Network.loadingFailed":
            self.failed.append((params.get("requestId", ""), params.get("errorText", "")))
        elif method == "Log.entryAdded" and params["entry"]["level"] == "error":
            self.errors.append(f"{params['entry'].get('url', '')}: {params['entry']['text']}")
        elif method == "Runtime.exceptionThrown":
            self.errors.append(json.dumps(params["exceptionDetails"])[:500])


class Browser:
    """A headless Chromium process; `with Browser(path) as b: page = b.open(url)`."""

    def __init__(self, executable: str, timeout: float = 60):
        self.timeout = timeout
        self.profile = tempfile.mkdtemp(prefix="align-chromium-")
        to_child_r, self._to_child = os.pipe()
        self._from_child, from_child_w = os.pipe()

        def pipes_on_3_and_4():     # in the child: dup first, as a pipe may already be fd 3
            read, write = os.dup(to_child_r), os.dup(from_child_w)
            os.dup2(read, 3)
            os.dup2(write, 4)

        self.proc = subprocess.Popen(
            [executable, *FLAGS, f"--user-data-dir={self.profile}", "about:blank"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            # close_fds would close 3 and 4 after preexec_fn made them; what else this process
            # has open is non-inheritable (PEP 446), so nothing else leaks into the browser
            preexec_fn=pipes_on_3_and_4, close_fds=False)
        os.close(to_child_r)
        os.close(from_child_w)
        self._buffer = b""
        self._id = 0
        self.pages: dict[str, Page] = {}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self) -> None:
        try:
            self.send("Browser.close")
        except Exception:
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        for fd in (self._to_child, self._from_child):
            try:
                os.close(fd)
            except OSError:
                pass
        if self.proc.stderr:
            self.proc.stderr.close()
        shutil.rmtree(self.profile, ignore_errors=True)

    def _read_message(self, deadline: float) -> dict:
        while b"\0" not in self._buffer:
            if time.monotonic() > deadline:
                raise BrowserError("Chromium did not answer in time")
            chunk = os.read(self._from_child, 1 << 20)
            if not chunk:
                err = self.proc.stderr.read().decode(errors="replace")[-2000:] if self.proc.stderr else ""
                raise BrowserError(f"Chromium closed its pipe (exit {self.proc.poll()}): {err}")
            self._buffer += chunk
        message, self._buffer = self._buffer.split(b"\0", 1)
        return json.loads(message)

    def _dispatch(self, message: dict) -> None:
        page = self.pages.get(message.get("sessionId"))
        if page and "method" in message:
            page._event(message["method"], message.get("params", {}))

    def send(self, method: str, session: str | None = None, **params) -> dict:
        self._id += 1
        message = {"id": self._id, "method": method, "params": params}
        if session:
            message["sessionId"] = session
        os.write(self._to_child, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + self.timeout
        while True:
            reply = self._read_message(deadline)
            if reply.get("id") == self._id:
                if "error" in reply:
                    raise BrowserError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            self._dispatch(reply)

    def wait_for(self, page: Page, method: str) -> dict:
        deadline = time.monotonic() + self.timeout
        while True:
            message = self._read_message(deadline)
            self._dispatch(message)
            if message.get("sessionId") == page.session and message.get("method") == method:
                return message.get("params", {})

    def open(self, url: str, width: int = 1200, height: int = 900) -> Page:
        """A new tab that has loaded `url` (its load event fired, then the network idle)."""
        target = self.send("Target.createTarget", url="about:blank")["targetId"]
        session = self.send("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        page = self.pages[session] = Page(self, session)
        for domain in ("Page", "Network", "Runtime", "Log"):
            page.send(f"{domain}.enable")
        page.send("Emulation.setDeviceMetricsOverride", width=width, height=height,
                  deviceScaleFactor=1, mobile=False)
        page.send("Page.navigate", url=url)
        self.wait_for(page, "Page.loadEventFired")
        # every <img> has loaded or failed by the load event; give late events a moment
        page.evaluate("new Promise(r => setTimeout(r, 200))")
        return page
