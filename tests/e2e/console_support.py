"""The admin console as a process, and the headless browser that drives it.

Shared by tests/e2e/test_console.py and the screenshot script (``make screenshots``). The
browser is Debian's chromium driven through /usr/bin/chromedriver by Selenium, so nothing is
downloaded: ``apt-get install chromium chromium-driver`` (.ci/run does it).
"""

import http.client
import shutil
import ssl
import subprocess
import time
import urllib.parse
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webelement import WebElement
from selenium.webdriver.support import expected_conditions
from selenium.webdriver.support.ui import WebDriverWait

from tests.e2e.conftest import clean_env, free_port, server_command

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
READY_SECONDS = 20.0
WAIT_SECONDS = 10.0
INSTALL_HINT = "apt-get install chromium chromium-driver (see .ci/run)"


@dataclass
class ConsoleProcess:
    process: "subprocess.Popen[bytes]"
    port: int
    log_path: Path
    # Set for a console serving HTTPS: how to trust its certificate.
    https: ssl.SSLContext | None = None

    @property
    def url(self) -> str:
        return f"{'https' if self.https else 'http'}://127.0.0.1:{self.port}"

    def log(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.terminate()
        try:
            return self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait()

    def request(
        self,
        method: str,
        path: str,
        form: Mapping[str, str] | Sequence[tuple[str, str]] | None = None,
        cookie: str = "",
    ) -> tuple[int, dict[str, str], str]:
        """One HTTP request outside the browser (no redirects followed): status, headers, body."""
        connection = (
            http.client.HTTPSConnection("127.0.0.1", self.port, timeout=15, context=self.https)
            if self.https is not None
            else http.client.HTTPConnection("127.0.0.1", self.port, timeout=15)
        )
        headers = {"cookie": cookie} if cookie else {}
        body = None
        if form is not None:
            body = urllib.parse.urlencode(form)
            headers["content-type"] = "application/x-www-form-urlencoded"
        try:
            connection.request(method, path, body=body, headers=headers)
            response = connection.getresponse()
            text = response.read().decode("utf-8", errors="replace")
            found = {name.lower(): value for name, value in response.getheaders()}
            return response.status, found, text
        finally:
            connection.close()


def start_console(
    target: str, log_dir: Path, *args: str, https: ssl.SSLContext | None = None
) -> ConsoleProcess:
    """``apikeys-server console`` on a free port, for the service at ``target``; waits for it."""
    port = free_port()
    log_path = log_dir / f"console-{port}.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [
                *server_command(),
                "console",
                "--listen",
                f"127.0.0.1:{port}",
                "--target",
                target,
                "--timeout",
                "3",
                *args,
            ],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=clean_env(),
        )
    console = ConsoleProcess(process, port, log_path, https)
    deadline = time.monotonic() + READY_SECONDS
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"console exited with {process.returncode}:\n{console.log()}")
        try:
            if console.request("GET", "/healthz")[0] == 200:
                return console
        except OSError:
            time.sleep(0.1)
    console.stop()
    raise RuntimeError(f"console not answering within {READY_SECONDS}s:\n{console.log()}")


def missing_browser() -> str | None:
    """Why the browser cannot run here, or None."""
    for path in (CHROMIUM, CHROMEDRIVER):
        if not path.exists() and shutil.which(path.name) is None:
            return f"{path} not found: {INSTALL_HINT}"
    return None


def chromium(width: int = 1280, height: int = 900) -> webdriver.Chrome:
    """Headless chromium with its console log readable (CSP violations land there)."""
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM if CHROMIUM.exists() else shutil.which("chromium"))
    for argument in (
        "--headless=new",
        "--no-sandbox",  # CI runs as root in a container
        "--disable-dev-shm-usage",
        "--disable-gpu",
        "--no-first-run",
        "--hide-scrollbars",
        f"--window-size={width},{height}",
        "--lang=en-US",
    ):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver_path = CHROMEDRIVER if CHROMEDRIVER.exists() else Path(str(shutil.which("chromedriver")))
    return webdriver.Chrome(service=Service(str(driver_path)), options=options)


def wait_for(driver: webdriver.Chrome, css: str, seconds: float = WAIT_SECONDS) -> WebElement:
    found: WebElement = WebDriverWait(driver, seconds).until(
        expected_conditions.presence_of_element_located((By.CSS_SELECTOR, css))
    )
    return found


def accept_confirmation(driver: webdriver.Chrome) -> str:
    """Accepts the page's confirm() dialog; returns its question."""
    WebDriverWait(driver, WAIT_SECONDS).until(expected_conditions.alert_is_present())
    alert = driver.switch_to.alert
    question = alert.text
    alert.accept()
    return question


def sign_in(driver: webdriver.Chrome, console: ConsoleProcess, key: str, tenant: str = "") -> None:
    """Signs in (picking ``tenant`` for a platform key) and waits for the keys page."""
    driver.get(console.url + "/signin")
    wait_for(driver, "#api_key").send_keys(key)
    driver.find_element(By.CSS_SELECTOR, "form[action='/signin'] button").click()
    if tenant:
        wait_for(driver, "#tenant").send_keys(tenant)
        driver.find_element(By.CSS_SELECTOR, "form[action='/tenant'] button").click()
    wait_for(driver, "#add-new")


def create_key(driver: webdriver.Chrome, console: ConsoleProcess, name: str, *scopes: str) -> str:
    """Adds a key through the form; returns the secret from the dialog (closed, confirmed)."""
    driver.get(console.url + "/keys/new")
    wait_for(driver, "#name").send_keys(name)
    for scope in scopes:
        driver.find_element(By.ID, "scope-" + scope.replace(":", "-")).click()
    driver.find_element(By.ID, "create").click()
    secret = wait_for(driver, "#secret").get_attribute("value") or ""
    close_secret_dialog(driver)
    return secret


def close_secret_dialog(driver: webdriver.Chrome) -> None:
    driver.find_element(By.ID, "close-secret").click()
    accept_confirmation(driver)
    wait_for(driver, "dl.facts")
