"""`molt inference --gradio` in a real headless Chromium: two typed turns are answered on the page
exactly as piped `--chat` answers them (same model, greedy), nothing is fetched from outside the
server, and a screenshot of the chat is saved; without gradio installed the option is refused.

Chromium and chromedriver come from the system (Debian: `apt-get install chromium chromium-driver`);
a missing browser fails the test rather than skipping it: the page is only tested here."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from urllib.parse import urlparse

import pytest

from conftest import REPO
from test_inference import run_inference

TURNS = ["Convert 3 km to m.", "Say hi."]
SHORT = ["--max-new-tokens", "8"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_http(url: str, proc: subprocess.Popen, stderr_path, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"molt inference --gradio exited {proc.returncode}:\n{stderr_path.read_text()[-4000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(0.5)
    pytest.fail(f"{url} did not answer within {timeout} s:\n{stderr_path.read_text()[-4000:]}")


def chrome():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    binary = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    driver_path = shutil.which("chromedriver")
    if not (binary and driver_path):
        pytest.fail("this test needs headless Chromium and chromedriver on PATH: apt-get install chromium chromium-driver")
    options = webdriver.ChromeOptions()
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1200,900"):
        options.add_argument(flag)
    options.binary_location = binary
    options.set_capability("goog:loggingPrefs", {"performance": "ALL"})  # every request the page makes
    # an explicit driver path: selenium-manager downloads nothing
    return webdriver.Chrome(options=options, service=Service(executable_path=driver_path))


def unescape(line: str) -> str:
    """A piped answer line as the answer it encodes (`\\n` a newline, `\\\\` a backslash)."""
    out, chars = [], iter(line)
    for c in chars:
        out.append({"n": "\n", "\\": "\\"}.get(next(chars, ""), "") if c == "\\" else c)
    return "".join(out)


def words(text: str) -> str:
    return " ".join(text.split())


def test_gradio_chat_page_answers_as_piped_chat_does(make_config, molt, workdir, tmp_path):
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    config = make_config()
    assert molt("train", config).exit_code == 0
    code, out, err = run_inference(config, "--chat", *SHORT, input="\n".join(TURNS) + "\n")
    assert code == 0 and len(out.splitlines()) == 2, err
    expected = [words(unescape(line)) for line in out.splitlines()]

    port = free_port()
    url = f"http://127.0.0.1:{port}/"
    stderr_path = tmp_path / "server.err"
    with stderr_path.open("w") as stderr_file:
        server = subprocess.Popen([str(REPO / ".venv" / "bin" / "molt"), "inference", str(config), "--gradio", "--server-port", str(port),
                                   "--cache-dir", str(workdir / "cache"), *SHORT], cwd=workdir, stdin=subprocess.DEVNULL,
                                  stdout=subprocess.DEVNULL, stderr=stderr_file)
    driver = None
    try:
        wait_for_http(url, server, stderr_path)
        driver = chrome()
        driver.get(url)
        wait = WebDriverWait(driver, 120, ignored_exceptions=[StaleElementReferenceException])
        box = (By.CSS_SELECTOR, "textarea[data-testid='textbox']")
        for n, turn in enumerate(TURNS, 1):
            wait.until(lambda d: d.find_element(*box).is_enabled())
            driver.find_element(*box).send_keys(turn, Keys.ENTER)

            def answered(d):
                # the answer streams in; gradio enables the textbox again once the last piece is shown
                bots = d.find_elements(By.CSS_SELECTOR, "[data-testid='bot']")
                done = len(bots) == n and bots[-1].text.strip() and d.find_element(*box).is_enabled()
                return bots[-1].text if done else False

            try:
                shown = wait.until(answered)
            except Exception:
                pytest.fail(f"no answer {n} on the page; server stderr:\n{stderr_path.read_text()[-4000:]}")
            # the page renders the answer as markdown; the random tiny model's text survives that
            # unchanged (it is deterministic), so whitespace is all that differs from the piped line
            assert words(shown) == expected[n - 1], (shown, expected)
        shot = tmp_path / "chat.png"
        assert driver.save_screenshot(str(shot))
        assert shot.read_bytes().startswith(b"\x89PNG\r\n\x1a\n") and shot.stat().st_size > 1000
        requested = {json.loads(e["message"])["message"].get("params", {}).get("request", {}).get("url", "") for e in driver.get_log("performance")}
        remote = {u for u in requested if urlparse(u).scheme in ("http", "https", "ws", "wss") and urlparse(u).hostname != "127.0.0.1"}
        assert url in requested and not remote, f"the page fetched from outside its server: {sorted(remote)}"
    finally:
        if driver is not None:
            driver.quit()
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()


def test_gradio_missing_is_refused_before_anything_loads(make_config, monkeypatch):
    monkeypatch.setitem(sys.modules, "gradio", None)  # `import gradio` raises ImportError
    code, _, err = run_inference(make_config(), "--gradio")
    assert code == 2 and "pip install gradio" in err and "loading" not in err, err
