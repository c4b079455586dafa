"""The admin console (``apikeys-server console``) in a real headless browser, against a real
server: sign-in, Add new (keyboard only), the secret dialog, Verify of that secret over gRPC,
edit, rotate, revoke, Activity; tenant isolation, CSRF, labels, no secret in any later page.

One server (SQLite), one console and one browser for the module; the tests run in order and
share them, as an operator's session would (about 15 s here).
"""

import re
import ssl
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.remote.webdriver import WebDriver

from apikeys.v1 import key_verifier_pb2
from tests.certs import Certificates
from tests.e2e.conftest import ServerProcess, assert_no_secrets, free_port, start_server
from tests.e2e.console_support import (
    ConsoleProcess,
    accept_confirmation,
    chromium,
    close_secret_dialog,
    missing_browser,
    sign_in,
    start_console,
    wait_for,
)

pytestmark = pytest.mark.e2e

TENANT = "acme"
OTHER_TENANT = "globex"
ADMIN_SCOPES = ["apikeys:manage", "apikeys:read"]
MAX_TABS = 60
PAGE_SIZE = 20  # the console's keys per page
# Form controls without a label (or aria-label/-labelledby), and buttons without words.
UNLABELLED = """
return Array.from(document.querySelectorAll("input, select, textarea, button"))
  .filter(el => el.type !== "hidden")
  .filter(el => el.tagName === "BUTTON"
    ? !el.textContent.trim() && !el.getAttribute("aria-label")
    : !(el.labels && el.labels.length) && !el.getAttribute("aria-label")
      && !el.getAttribute("aria-labelledby"))
  .map(el => el.outerHTML);
"""


@dataclass
class World:
    server: ServerProcess
    console: ConsoleProcess
    browser: WebDriver
    tenant_admin: str
    other_key_id: str
    other_key_name: str
    secrets: list[str] = field(default_factory=list)  # shown by the console's dialogs
    later_pages: list[str] = field(default_factory=list)  # HTML seen after a secret was shown
    key_id: str = ""
    successor_id: str = ""

    def visit(self, path: str, css: str = "main") -> str:
        self.browser.get(self.console.url + path)
        wait_for(self.browser, css)
        return self.page()

    def page(self) -> str:
        """The current page's HTML, kept to check for secrets at the end."""
        html = self.browser.page_source
        if self.secrets:
            self.later_pages.append(html)
        return html

    def cookie(self) -> str:
        found = self.browser.get_cookie("apikeys_console")
        assert found is not None
        return f"apikeys_console={found['value']}"


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    if (why := missing_browser()) is not None:
        pytest.fail(why)  # CI installs it (.ci/run): never skipped silently
    directory = tmp_path_factory.mktemp("console")
    server = start_server(f"sqlite:///{directory / 'apikeys.db'}", directory)
    console = None
    browser = None
    try:
        with server.client() as client:
            tenant_admin = client.create_key("console-admin", ADMIN_SCOPES, tenant_id=TENANT)
            client.create_key("globex-admin", ADMIN_SCOPES, tenant_id=OTHER_TENANT)
            other = client.create_key("globex-billing", ["passes:read"], tenant_id=OTHER_TENANT)
        console = start_console(server.target, directory)
        browser = chromium()
        yield World(
            server,
            console,
            browser,
            server.remember(tenant_admin.secret),
            other.key.id,
            other.key.name,
        )
    finally:
        if browser is not None:
            browser.quit()
        if console is not None:
            status = console.stop()
            log = console.log()
            assert status == 0, log
            assert "Traceback" not in log, log
            assert_no_secrets(log, server.secrets, "the console log")
        server.check_stopped_cleanly()


def tab_to(world: World, element_id: str) -> None:
    """Presses Tab until the element has the focus (keyboard only)."""
    browser = world.browser
    for _ in range(MAX_TABS):
        if browser.switch_to.active_element.get_attribute("id") == element_id:
            return
        browser.switch_to.active_element.send_keys(Keys.TAB)
    pytest.fail(f"#{element_id} is not reachable with Tab")


def press(world: World, key: str) -> None:
    world.browser.switch_to.active_element.send_keys(key)


def verify(world: World, secret: str, scope: str) -> key_verifier_pb2.VerifyResponse:
    with world.server.client() as client:
        return client.verify(secret, [scope], tenant_id=TENANT)


def test_sign_in_with_a_tenant_admin_key(world: World) -> None:
    """A tenant admin key signs in to its own tenant, straight to the keys page."""
    sign_in(world.browser, world.console, world.tenant_admin)
    assert world.browser.find_element(By.ID, "current-tenant").text == TENANT
    assert "console-admin" in world.page()
    cookie = world.browser.get_cookie("apikeys_console")
    assert cookie is not None
    assert cookie["httpOnly"] is True and cookie["sameSite"] == "Strict"


def test_add_new_with_the_keyboard_only(world: World) -> None:
    """Add new, a bad name refused next to the field, two scopes, save: all with the keyboard;
    the dialog shows the secret, and closing it asks first."""
    browser = world.browser
    tab_to(world, "add-new")
    press(world, Keys.ENTER)
    wait_for(browser, "form[action='/keys/new']")
    assert browser.switch_to.active_element.get_attribute("id") == "name"  # autofocus
    press(world, "crm <b>prod</b>")
    tab_to(world, "scope-passes-read")
    press(world, Keys.SPACE)
    tab_to(world, "scope-customers-read")
    press(world, Keys.SPACE)
    tab_to(world, "create")
    press(world, Keys.ENTER)

    error = wait_for(browser, "#name-error")
    assert "name" in error.text.lower() and "letters" in error.text  # the service's words
    assert (
        browser.find_element(By.ID, "name").get_attribute("aria-describedby").endswith("name-error")
    )
    assert browser.find_element(By.ID, "scope-passes-read").is_selected()  # kept
    assert browser.find_element(By.ID, "name").get_attribute("value") == "crm <b>prod</b>"
    assert not browser.find_elements(By.CSS_SELECTOR, "main b")  # escaped, never markup
    assert browser.switch_to.active_element.get_attribute("id") == "name"
    press(world, Keys.CONTROL + "a")
    press(world, "crm-sync-prod")
    tab_to(world, "create")
    press(world, Keys.ENTER)

    secret = wait_for(browser, "#secret").get_attribute("value") or ""
    assert re.fullmatch(r"ak_[A-Za-z0-9]{38}", secret)
    world.secrets.append(world.server.remember(secret))
    dialog = browser.find_element(By.ID, "secret-dialog")
    assert browser.execute_script("return arguments[0].matches(':modal')", dialog)
    assert "only time the secret is shown" in dialog.text
    assert browser.switch_to.active_element.get_attribute("id") == "copy"
    tab_to(world, "close-secret")
    press(world, Keys.ENTER)
    assert "cannot be shown again" in accept_confirmation(browser)
    wait_for(browser, "dl.facts")
    world.key_id = browser.current_url.rsplit("/", 1)[-1]
    assert world.key_id.startswith("key_")
    html = world.page()
    assert "passes:read" in html and "customers:read" in html


def test_the_secret_verifies_over_grpc(world: World) -> None:
    """The secret from the dialog is VALID for its scopes and 403 for another."""
    assert verify(world, world.secrets[0], "passes:read").code == key_verifier_pb2.VERIFY_CODE_VALID
    refused = verify(world, world.secrets[0], "passes:write")
    assert refused.code == key_verifier_pb2.VERIFY_CODE_INSUFFICIENT_SCOPE
    assert refused.http_status == 403


def test_pages_are_not_stored_and_allow_no_inline_code(world: World) -> None:
    """Every page (the secret's dialog included) says no-store; the CSP allows no inline code."""
    status, headers, _ = world.console.request("GET", "/keys", cookie=world.cookie())
    assert status == 200
    assert headers["cache-control"] == "no-store"
    assert "script-src 'self'" in headers["content-security-policy"]
    assert "'unsafe-inline'" not in headers["content-security-policy"]


def test_edit_name_and_scopes(world: World) -> None:
    browser = world.browser
    world.visit(f"/keys/{world.key_id}", "#save")
    name = browser.find_element(By.ID, "name")
    name.clear()
    name.send_keys("crm-sync-prod-eu")
    browser.find_element(By.ID, "scope-customers-read").click()  # off
    browser.find_element(By.ID, "scope-passes-write").click()  # on
    browser.find_element(By.ID, "save").click()
    assert "Saved." in wait_for(browser, ".notice").text
    facts = browser.find_element(By.CSS_SELECTOR, "dl.facts").text
    assert "passes:write" in facts and "customers:read" not in facts
    assert browser.find_element(By.TAG_NAME, "h1").text.startswith("crm-sync-prod-eu")
    assert verify(world, world.secrets[0], "passes:write").code == (
        key_verifier_pb2.VERIFY_CODE_VALID
    )
    world.page()


def test_rotate_with_an_overlap(world: World) -> None:
    """Rotate (1 hour): a new secret shown once; the old key is 'rotated', with its successor."""
    browser = world.browser
    world.visit(f"/keys/{world.key_id}", "#rotate")
    browser.find_element(By.CSS_SELECTOR, "#overlap option[value='3600']").click()
    browser.find_element(By.ID, "rotate").click()
    accept_confirmation(browser)
    secret = wait_for(browser, "#secret").get_attribute("value") or ""
    assert secret and secret not in world.secrets
    world.secrets.append(world.server.remember(secret))
    assert "works until" in browser.find_element(By.ID, "secret-dialog").text
    close_secret_dialog(browser)
    html = world.page()
    assert "rotated" in browser.find_element(By.TAG_NAME, "h1").text
    world.successor_id = re.search(r"replaced by (key_[a-z0-9]+)", html).group(1)  # type: ignore[union-attr]
    for each in world.secrets:  # both work during the overlap
        assert verify(world, each, "passes:read").code == key_verifier_pb2.VERIFY_CODE_VALID


def test_revoke_with_reason_and_confirmation(world: World) -> None:
    browser = world.browser
    world.visit(f"/keys/{world.successor_id}", "#revoke")
    browser.find_element(By.ID, "reason").send_keys("console test")
    browser.find_element(By.ID, "revoke").click()
    accept_confirmation(browser)
    assert "Tick the box" in wait_for(browser, "#confirm-error").text  # not revoked yet
    assert verify(world, world.secrets[1], "passes:read").valid
    browser.find_element(By.ID, "reason").send_keys("console test")
    browser.find_element(By.ID, "confirm").click()
    browser.find_element(By.ID, "revoke").click()
    accept_confirmation(browser)
    assert "Revoked" in wait_for(browser, ".notice").text
    assert "revoked" in browser.find_element(By.TAG_NAME, "h1").text
    world.page()
    refused = verify(world, world.secrets[1], "passes:read")
    assert refused.code == key_verifier_pb2.VERIFY_CODE_REVOKED


def test_keys_table_filters_and_shows_revoked(world: World) -> None:
    """Filter by name prefix (htmx swaps the table), 'Show revoked' brings revoked keys back."""
    browser = world.browser
    world.visit("/keys", "#keys-table")
    browser.find_element(By.ID, "prefix").send_keys("crm")
    wait_for(browser, "#keys-table")
    rows = lambda: browser.find_elements(By.CSS_SELECTOR, "#keys-table tbody tr")  # noqa: E731
    _wait(lambda: len(rows()) == 1 and "crm-sync-prod-eu" in rows()[0].text)
    assert "rotated" in rows()[0].text
    assert rows()[0].find_element(By.TAG_NAME, "time").get_attribute("title").endswith("UTC")
    browser.find_element(By.ID, "revoked").click()
    _wait(lambda: len(rows()) == 2)
    assert "prefix=crm" in browser.current_url and "revoked=1" in browser.current_url
    world.page()


def _wait(condition: Callable[[], bool], seconds: float = 10.0) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            if condition():
                return
        except Exception:  # the table being swapped under the lookup
            pass
        time.sleep(0.1)
    pytest.fail("condition not met in time")


def test_activity_shows_each_step_newest_first(world: World) -> None:
    world.visit("/activity", "table.events")
    actions = [
        row.get_attribute("class")
        for row in world.browser.find_elements(By.CSS_SELECTOR, "table.events tbody tr")
    ]
    ours = [a for a in actions if a != "event-created"][:3]
    assert ours == ["event-revoked", "event-rotated", "event-edited"]
    assert "event-created" in actions
    world.page()
    html = world.visit(f"/keys/{world.key_id}", "table.events")
    assert "event-created" in html and "event-edited" in html and "event-rotated" in html


def test_tenant_admin_cannot_see_another_tenant(world: World) -> None:
    """Another tenant's key is 'no such key', never listed; the tenant picker is not offered."""
    html = world.visit(f"/keys/{world.other_key_id}")
    assert "No such key" in html and world.other_key_name not in html
    html = world.visit("/keys?revoked=1", "#keys-table")
    assert world.other_key_name not in html and "globex-admin" not in html
    world.visit("/tenant", "#keys-table")
    assert world.browser.current_url.endswith("/keys")


def test_post_without_csrf_token_is_refused(world: World) -> None:
    """A signed-in session's POST without the form's token: 403, and nothing is made."""
    form = {"name": "csrf-probe", "scopes": "passes:read"}
    status, _, body = world.console.request("POST", "/keys/new", form, cookie=world.cookie())
    assert status == 403 and "security token" in body
    status, _, _ = world.console.request(
        "POST", "/keys/new", {**form, "csrf_token": "forged"}, cookie=world.cookie()
    )
    assert status == 403
    with world.server.client() as client:
        assert not list(client.list_keys(tenant_id=TENANT, name_prefix="csrf-probe"))


def test_every_form_control_is_labelled(world: World) -> None:
    for path, css in [
        ("/keys", "#prefix"),
        ("/keys/new", "#name"),
        (f"/keys/{world.key_id}", "#name"),
        (f"/keys/{world.successor_id}", "dl.facts"),
        ("/activity", "main"),
    ]:
        world.visit(path, css)
        assert world.browser.execute_script(UNLABELLED) == [], path


def test_no_csp_violation_in_the_browser(world: World) -> None:
    """No inline script or style was refused (the browser logs each CSP violation)."""
    messages = [entry["message"] for entry in world.browser.get_log("browser")]
    assert not [m for m in messages if "Content Security Policy" in m], messages


def test_sign_out_then_pages_need_sign_in(world: World) -> None:
    browser = world.browser
    world.visit("/keys", "#add-new")
    browser.find_element(By.CSS_SELECTOR, "form.signout button").click()
    assert "Signed out." in wait_for(browser, ".notice").text
    world.visit("/keys", "#api_key")
    assert browser.current_url.endswith("/signin")


def test_a_platform_key_picks_the_tenant(world: World) -> None:
    """The platform key asks for a tenant; a malformed one is refused next to the field."""
    browser = world.browser
    world.visit("/signin", "#api_key")
    browser.find_element(By.ID, "api_key").send_keys(world.server.admin_key)
    browser.find_element(By.CSS_SELECTOR, "form[action='/signin'] button").click()
    wait_for(browser, "#tenant").send_keys("not a tenant!")
    browser.find_element(By.CSS_SELECTOR, "form[action='/tenant'] button").click()
    assert "tenant_id" in wait_for(browser, "#tenant-error").text
    field_ = browser.find_element(By.ID, "tenant")
    field_.clear()
    field_.send_keys(OTHER_TENANT)
    browser.find_element(By.CSS_SELECTOR, "form[action='/tenant'] button").click()
    wait_for(browser, "#keys-table")
    assert world.other_key_name in world.page()


def test_pages_of_keys(world: World) -> None:
    """More keys than a page: Next page (ListKeys' page token), then back to the first."""
    with world.server.client() as client:
        for number in range(PAGE_SIZE + 1):
            client.create_key(f"bulk-{number:02}", ["passes:read"], tenant_id=OTHER_TENANT)
    browser = world.browser
    world.visit("/keys?prefix=bulk-", "#keys-table")
    rows = browser.find_elements(By.CSS_SELECTOR, "#keys-table tbody tr")
    assert len(rows) == PAGE_SIZE and "bulk-20" in rows[0].text  # newest first
    browser.find_element(By.CSS_SELECTOR, "a[rel='next']").click()
    wait_for(browser, "#keys-table")
    _wait(lambda: "page=" in browser.current_url)
    rows = browser.find_elements(By.CSS_SELECTOR, "#keys-table tbody tr")
    assert [row.find_element(By.TAG_NAME, "a").text for row in rows] == ["bulk-00"]
    assert not browser.find_elements(By.CSS_SELECTOR, "a[rel='next']")
    browser.find_element(By.LINK_TEXT, "First page").click()
    _wait(lambda: "page=" not in browser.current_url)
    world.page()


def test_an_operator_key_revoked_meanwhile_signs_out(world: World) -> None:
    """The operator's own key stops working mid-session: the next page is sign-in, saying why."""
    browser = world.browser
    with world.server.client() as client:
        made = client.create_key("short-lived-admin", ADMIN_SCOPES, tenant_id=TENANT)
    world.server.remember(made.secret)
    world.visit("/keys", "#add-new")
    browser.find_element(By.CSS_SELECTOR, "form.signout button").click()
    wait_for(browser, "#api_key")
    sign_in(browser, world.console, made.secret)
    with world.server.client() as client:
        client.revoke_key(made.key.id, tenant_id=TENANT, reason="console test")
    world.visit("/activity", "#api_key")
    assert browser.current_url.endswith("/signin")
    assert "no longer works" in browser.find_element(By.CSS_SELECTOR, ".notice").text


def test_over_https_the_cookie_is_secure(tmp_path: Path, certificates: Certificates) -> None:
    """Served over HTTPS, the session cookie is Secure (and still HttpOnly, SameSite=Strict)."""
    context = ssl.create_default_context(cafile=str(certificates.ca))
    console = start_console(
        f"127.0.0.1:{free_port()}",
        tmp_path,
        "--https-cert-file",
        str(certificates.server_cert),
        "--https-key-file",
        str(certificates.server_key),
        https=context,
    )
    try:
        status, headers, _ = console.request("GET", "/signin")
    finally:
        assert console.stop() == 0
    assert status == 200
    cookie = headers["set-cookie"].lower()
    assert "; secure" in cookie and "; httponly" in cookie and "samesite=strict" in cookie


def anonymous(console: ConsoleProcess) -> tuple[str, str]:
    """A new visitor's session cookie and its sign-in form's CSRF token."""
    _, headers, body = console.request("GET", "/signin")
    cookie = headers["set-cookie"].split(";", 1)[0]
    found = re.search(r'name="csrf_token" value="([^"]+)"', body)
    assert found is not None
    return cookie, found.group(1)


def test_a_bad_key_is_refused_at_sign_in(world: World) -> None:
    cookie, token = anonymous(world.console)
    status, _, body = world.console.request(
        "POST", "/signin", {"api_key": "ak_nonsense", "csrf_token": token}, cookie=cookie
    )
    assert status == 403 and "not accepted by the service" in body
    assert "ak_nonsense" not in body  # the pasted key is never shown back


def test_no_secret_in_any_later_page(world: World) -> None:
    """After its dialog, no page (list, key, activity, errors) holds a secret."""
    assert len(world.secrets) == 2 and len(world.later_pages) > 10
    for html in world.later_pages:
        assert_no_secrets(html, world.secrets, "a later page")


def test_the_service_being_down_is_shown_as_such(tmp_path: Path) -> None:
    """A console whose service does not answer says so (503), never a traceback."""
    console = start_console(f"127.0.0.1:{free_port()}", tmp_path)
    try:
        cookie, token = anonymous(console)
        status, _, body = console.request(
            "POST", "/signin", {"api_key": "ak_whatever", "csrf_token": token}, cookie=cookie
        )
        assert status == 503 and "is not answering" in body and "Traceback" not in body
    finally:
        assert console.stop() == 0
    assert "Traceback" not in console.log()
