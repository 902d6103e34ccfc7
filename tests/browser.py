"""Helpers for app tests: start the real app on a free port, drive headless Chromium offline.

Not a test module (no ``test_`` prefix); imported by tests/test_app*.py.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent

__all__ = ["free_port", "running_app", "chromium_paths", "offline_chromium", "wait_for"]


def free_port() -> int:
    """A TCP port that was free a moment ago on 127.0.0.1."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def running_app(args: Sequence[str], log_path: Path, timeout_s: float = 180.0,
                env: dict[str, str] | None = None) -> Iterator[str]:
    """Run ``python app.py ARGS --port N`` (extra environment ``env``) until the block ends; yields its URL.

    Raises:
        RuntimeError: the app exited or did not answer within ``timeout_s`` (its log is quoted).
    """
    port = free_port()
    env = dict(os.environ, HF_HUB_OFFLINE="1", GRADIO_ANALYTICS_ENABLED="False", PYTHONUNBUFFERED="1",
               **(env or {}))
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, str(REPO_ROOT / "app.py"), *args, "--port", str(port)],
                                cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"app exited with {proc.returncode}:\n{log_path.read_text()[-4000:]}")
            try:
                with urllib.request.urlopen(url + "/config", timeout=5):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"app did not answer in {timeout_s} s:\n{log_path.read_text()[-4000:]}")
                time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def chromium_paths() -> tuple[str, str] | None:
    """``(chromium, chromedriver)`` executables, or None when either is missing."""
    browser = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    driver = shutil.which("chromedriver")
    return (browser, driver) if browser and driver else None


@contextlib.contextmanager
def offline_chromium(width: int = 1500, height: int = 1000) -> Iterator[object]:
    """A headless Chromium (selenium) that can reach only 127.0.0.1: every other request goes to a
    dead proxy (127.0.0.1:9) and every other host name resolves to nothing."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    paths = chromium_paths()
    if paths is None:
        raise RuntimeError("chromium / chromedriver not installed")
    profile = tempfile.mkdtemp(prefix="skymoe-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = paths[0]
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run", "--disable-dev-shm-usage",
                 f"--user-data-dir={profile}", f"--window-size={width},{height}",
                 "--proxy-server=127.0.0.1:9", "--proxy-bypass-list=127.0.0.1;localhost",
                 "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1, EXCLUDE localhost"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(paths[1]), options=options)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def wait_for(predicate, timeout_s: float = 60.0, interval_s: float = 0.5, what: str = "condition"):
    """Poll ``predicate()`` until it returns a truthy value; returns it.

    Raises:
        TimeoutError: not true within ``timeout_s``.
    """
    deadline = time.monotonic() + timeout_s
    last_err: Exception | None = None
    while time.monotonic() < deadline:
        try:
            value = predicate()
            if value:
                return value
        except Exception as err:  # the page may be mid-render
            last_err = err
        time.sleep(interval_s)
    raise TimeoutError(f"timed out after {timeout_s} s waiting for {what} (last error: {last_err})")
