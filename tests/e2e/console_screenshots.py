"""``make screenshots``: the console's main pages as PNG files under docs/console/.

A real server (SQLite in a temporary directory) with a few keys of tenant ``acme``, the
console, and the same headless chromium as tests/e2e/test_console.py. Secrets shown in the
pictures are of that throw-away database only.
"""

import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

from selenium.webdriver.common.by import By

from tests.e2e.conftest import start_server
from tests.e2e.console_support import (
    chromium,
    close_secret_dialog,
    missing_browser,
    sign_in,
    start_console,
    wait_for,
)

OUT = Path(__file__).resolve().parents[2] / "docs" / "console"
TENANT = "acme"
WIDTH = 1280


def main() -> int:
    if (why := missing_browser()) is not None:
        print(why, file=sys.stderr)
        return 1
    OUT.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as scratch:
        directory = Path(scratch)
        server = start_server(
            f"sqlite:///{directory / 'apikeys.db'}",
            directory,
            env={"APIKEYS_LAST_USED_FLUSH_SECONDS": "0.2"},
        )
        console = start_console(server.target, directory)
        browser = chromium(WIDTH, 800)
        try:
            admin_secret = _seed(server)
            time.sleep(1.0)  # last-used and tripwire batches reach the database
            sign_in(browser, console, admin_secret)
            shots = {
                "keys": ("/keys?revoked=1", "#keys-table"),
                "add-new": ("/keys/new", "#name"),
                "activity": ("/activity", "table.events"),
            }
            for name, (path, css) in shots.items():
                browser.get(console.url + path)
                wait_for(browser, css)
                _shoot(browser, name)
            browser.get(console.url + "/keys/new")
            wait_for(browser, "#name").send_keys("billing-export-prod")
            browser.find_element(By.ID, "scope-customers-read").click()
            browser.find_element(By.ID, "scope-passes-read").click()
            browser.find_element(By.ID, "create").click()
            wait_for(browser, "#secret")
            _shoot(browser, "secret", full=False)
            close_secret_dialog(browser)
            _shoot(browser, "key")
            browser.find_element(By.CSS_SELECTOR, "form.signout button").click()
            wait_for(browser, ".notice")
            browser.get(console.url + "/signin")  # the "Signed out." notice shown once, gone
            wait_for(browser, "#api_key")
            _shoot(browser, "sign-in", full=False)
        finally:
            browser.quit()
            console.stop()
            server.terminate()
    print(f"screenshots in {OUT}", file=sys.stderr)
    return 0


def _seed(server: object) -> str:
    """A tenant admin and a handful of keys in every state; returns the admin's secret."""
    from tests.e2e.conftest import ServerProcess

    assert isinstance(server, ServerProcess)
    with server.client() as client:
        admin = client.create_key(
            "ops-console", ["apikeys:manage", "apikeys:read"], tenant_id=TENANT
        )
        soon = datetime.now(UTC) + timedelta(days=3)
        crm = client.create_key(
            "crm-sync-prod", ["customers:read", "passes:read"], tenant_id=TENANT
        )
        client.create_key("wallet-push-prod", ["passes:write"], tenant_id=TENANT)
        client.create_key(
            "loyalty-import-staging", ["customers:write"], tenant_id=TENANT, expire_time=soon
        )
        old = client.create_key("crm-sync-prod-legacy", ["customers:read"], tenant_id=TENANT)
        client.revoke_key(old.key.id, tenant_id=TENANT, reason="replaced by crm-sync-prod")
        client.rotate_key(crm.key.id, timedelta(hours=24), tenant_id=TENANT)
        for secret, scope in ((crm.secret, "passes:read"), (old.secret, "customers:read")):
            client.verify(secret, [scope], tenant_id=TENANT)  # last used; the tripwire
    return admin.secret


def _shoot(browser: object, name: str, full: bool = True) -> None:
    from selenium.webdriver.remote.webdriver import WebDriver

    assert isinstance(browser, WebDriver)
    if full:
        for _ in range(2):  # the page reflows at the new size; measure again
            height = browser.execute_script("return document.documentElement.scrollHeight")
            browser.set_window_size(WIDTH, min(int(height) + 140, 2400))
    browser.save_screenshot(str(OUT / f"{name}.png"))
    browser.set_window_size(WIDTH, 800)


if __name__ == "__main__":
    sys.exit(main())
