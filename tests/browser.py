"""Headless Chromium driven through the DevTools protocol over a pipe (no websocket, no extra
package): ``--remote-debugging-pipe`` reads commands on fd 3 and writes replies and events
on fd 4, each one JSON message ended by a NUL byte.

    with Browser() as b:
        page = b.open("file:///tmp/report.html")
        page.eval("document.title")
"""

from __future__ import annotations

import fcntl
import json
import os
import select
import shutil
import subprocess
import tempfile
import time
from typing import Any

__all__ = ["Browser", "Page", "chromium", "BrowserError"]


class BrowserError(RuntimeError):
    pass


def chromium() -> str | None:
    """The system Chromium (Debian's ``chromium``), or None."""
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


class Browser:
    """One headless Chromium process; ``open(url)`` gives a Page (a new tab attached)."""

    def __init__(self, executable: str | None = None, *, width: int = 1280,
                 height: int = 900) -> None:
        exe = executable or chromium()
        if exe is None:
            raise BrowserError("no chromium on PATH: run tools/ensure-chromium (make test "
                               "does) or apt-get install chromium")
        self._profile = tempfile.mkdtemp(prefix="lockstep-chromium-")
        to_child_r, self._to_child = os.pipe()
        self._from_child, from_child_w = os.pipe()

        def fds() -> None:  # in the child: the pipe ends at fd 3 (commands) and 4 (replies)
            high = [fcntl.fcntl(fd, fcntl.F_DUPFD, 10) for fd in (to_child_r, from_child_w)]
            os.dup2(high[0], 3)
            os.dup2(high[1], 4)

        self.proc = subprocess.Popen(
            [exe, "--headless=new", "--remote-debugging-pipe", "--no-sandbox",
             "--disable-gpu", "--no-first-run", "--no-default-browser-check",
             "--disable-extensions", "--disable-background-networking", "--disable-sync",
             "--disable-component-update", "--disable-dev-shm-usage", "--mute-audio",
             f"--user-data-dir={self._profile}", f"--window-size={width},{height}",
             "about:blank"],
            preexec_fn=fds, close_fds=False,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.close(to_child_r)
        os.close(from_child_w)
        self._buf = b""
        self._next = 0
        self.events: list[dict[str, Any]] = []
        self.width, self.height = width, height

    def send(self, method: str, params: dict[str, Any] | None = None, *,
             session: str | None = None, timeout: float = 30.0) -> dict[str, Any]:
        """Send one command and wait for its reply (events that arrive meanwhile are kept)."""
        self._next += 1
        msg: dict[str, Any] = {"id": self._next, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        os.write(self._to_child, json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            for reply in self._read(deadline):
                if reply.get("id") == self._next:
                    if "error" in reply:
                        raise BrowserError(f"{method}: {reply['error']}")
                    return reply.get("result", {})
                self.events.append(reply)

    def _read(self, deadline: float) -> list[dict[str, Any]]:
        left = deadline - time.monotonic()
        if left <= 0:
            raise BrowserError("chromium did not answer in time")
        ready, _, _ = select.select([self._from_child], [], [], left)
        if not ready:
            raise BrowserError("chromium did not answer in time")
        chunk = os.read(self._from_child, 1 << 20)
        if not chunk:
            raise BrowserError(f"chromium exited (code {self.proc.poll()})")
        self._buf += chunk
        *messages, self._buf = self._buf.split(b"\0")
        return [json.loads(m) for m in messages if m]

    def pump(self, seconds: float) -> None:
        """Collect events for ``seconds``."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            try:
                self.events.extend(self._read(deadline))
            except BrowserError:
                if self.proc.poll() is not None:
                    raise
                return

    def open(self, url: str | None = None, *, timeout: float = 30.0) -> Page:
        """A new tab with the console, the log and the network watched, navigated to
        ``url`` (when given) and drawn (until the page sets ``data-ready`` on its body)."""
        target = self.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = self.send("Target.attachToTarget", {"targetId": target,
                                                      "flatten": True})["sessionId"]
        page = Page(self, session)
        for domain in ("Page", "Runtime", "Network", "Log"):
            page.send(f"{domain}.enable")
        page.send("Emulation.setDeviceMetricsOverride", {"width": self.width,
                                                         "height": self.height,
                                                         "deviceScaleFactor": 1,
                                                         "mobile": False})
        if url is not None:
            page.navigate(url, timeout=timeout)
        return page

    def close(self) -> None:
        try:
            self.send("Browser.close", timeout=5)
        except (BrowserError, OSError):
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
        shutil.rmtree(self._profile, ignore_errors=True)

    def __enter__(self) -> Browser:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class Page:
    """One tab, attached with a flat session."""

    def __init__(self, browser: Browser, session: str) -> None:
        self.browser = browser
        self.session = session

    def send(self, method: str, params: dict[str, Any] | None = None, **kw: Any) -> dict[str, Any]:
        return self.browser.send(method, params, session=self.session, **kw)

    def navigate(self, url: str, *, timeout: float = 30.0) -> float:
        """Go to ``url``; wait until the body has ``data-ready``. Returns the seconds from
        the navigation command to that moment."""
        t0 = time.perf_counter()
        self.send("Page.navigate", {"url": url})
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.eval("document.body && document.body.getAttribute('data-ready')") == "1":
                return time.perf_counter() - t0
            time.sleep(0.01)
        raise BrowserError(f"{url} never set data-ready")

    def eval(self, expression: str) -> Any:
        """The value of a JavaScript expression (by value); raises on an exception."""
        reply = self.send("Runtime.evaluate", {"expression": expression,
                                               "returnByValue": True, "awaitPromise": True})
        if "exceptionDetails" in reply:
            raise BrowserError(f"{expression[:80]}: {reply['exceptionDetails']}")
        return reply["result"].get("value")

    def events(self, method: str) -> list[dict[str, Any]]:
        """This tab's events of one kind so far (``Network.requestWillBeSent``...)."""
        self.browser.pump(0.05)
        return [e.get("params", {}) for e in self.browser.events
                if e.get("method") == method and e.get("sessionId") == self.session]

    def console_errors(self) -> list[str]:
        """Console errors, uncaught exceptions and error log entries, as text."""
        out = [str(e.get("exceptionDetails", {}).get("exception", {}).get("description")
                   or e.get("exceptionDetails", {}).get("text"))
               for e in self.events("Runtime.exceptionThrown")]
        out += [" ".join(str(a.get("value", a.get("description", ""))) for a in e.get("args", []))
                for e in self.events("Runtime.consoleAPICalled") if e.get("type") == "error"]
        out += [f"{e['entry'].get('source')}: {e['entry'].get('text')}"
                for e in self.events("Log.entryAdded") if e["entry"].get("level") == "error"]
        return out

    def requests(self) -> list[str]:
        """URLs of every request the tab made."""
        return [e["request"]["url"] for e in self.events("Network.requestWillBeSent")]

    def hover(self, selector: str) -> None:
        """Move the mouse to the middle of the first element matching ``selector``."""
        box = self.eval(f"(() => {{ const e = document.querySelector({json.dumps(selector)});"
                        "e.scrollIntoView({block: 'center', inline: 'center'});"
                        "const r = e.getBoundingClientRect();"
                        "return [r.left + r.width / 2, r.top + r.height / 2]; })()")
        self.send("Input.dispatchMouseEvent", {"type": "mouseMoved", "x": box[0], "y": box[1]})

    def screenshot(self, path: str, *, clip: dict[str, float] | None = None) -> None:
        import base64

        params: dict[str, Any] = {"format": "png"}
        if clip:
            params["clip"] = {**clip, "scale": 1}
        data = self.send("Page.captureScreenshot", params)["data"]
        with open(path, "wb") as f:
            f.write(base64.b64decode(data))
