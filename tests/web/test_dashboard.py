"""The dashboard in a real browser: headless Chromium driven by Playwright against a control
plane served by uvicorn.  Every page visited is screenshotted to artifacts/web/."""

from __future__ import annotations

import csv
import io
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor

import pytest
from playwright.sync_api import Browser, BrowserContext, Page, expect

from offload.cli.device_login import device_login
from offload.core import schemas as s
from offload.core.api_client import UserClient
from offload.core.errors import NotAuthenticated, PermissionDenied
from offload.core.waiting import wait_until
from offload.server.context import ServerContext
from offload.server.services import device_codes, lifecycle
from offload.server.services.org_activity import CSV_COLUMNS
from tests.unit.server.support import stand_in_gpu

from .conftest import TIMEOUT_MS, WebUser, sign_in, submit_sign_in
from .support import LiveClock, LiveServer, report_session, run

Shot = Callable[[Page, str], None]


def api(server: LiveServer, user: WebUser) -> UserClient:
    return UserClient(server.url, user.token)


async def _settings(server: LiveServer, user: WebUser) -> s.UserSettings:
    async with api(server, user) as client:
        return await client.my_settings()


# ---- sign in ------------------------------------------------------------------------------------


def test_sign_in_refuses_a_wrong_password_then_signs_in_and_out(
    page: Page, server: LiveServer, make_user: Callable[..., WebUser], shot: Shot
) -> None:
    user = make_user()
    page.goto(server.url + "/")
    expect(page).to_have_url(f"{server.url}/login?next=/")
    page.get_by_label("Username").fill(user.username)
    page.get_by_label("Password").fill("not the password")
    page.get_by_role("button", name="Sign in").click()
    expect(page.get_by_role("alert")).to_contain_text("Wrong username or password")
    expect(page.get_by_role("heading", name="Sign in to Offload")).to_be_visible()
    shot(page, "login-refused")

    page.get_by_label("Password").fill(user.password)
    page.get_by_role("button", name="Sign in").click()
    expect(page.get_by_role("heading", name="Overview")).to_be_visible()
    expect(page.get_by_role("button", name="Sign out")).to_be_visible()

    page.get_by_role("button", name="Sign out").click()
    expect(page.get_by_role("status")).to_contain_text("You are signed out")
    page.goto(server.url + "/settings")  # the old session is gone on the server too
    expect(page).to_have_url(f"{server.url}/login?next=/settings")
    shot(page, "login")


# ---- device login -------------------------------------------------------------------------------


class PendingLogin:
    """A real `device_login()` running in another thread, as `offload login` would run it."""

    def __init__(self, server: LiveServer, pool: ThreadPoolExecutor) -> None:
        self.shown = threading.Event()
        self.uri = self.code = ""
        self.future: Future[str] = pool.submit(
            run, device_login(server.url, self._show, poll_interval=1.0, client_name="laptop-1")
        )

    def _show(self, uri: str, code: str) -> None:
        self.uri, self.code = uri, code
        self.shown.set()

    def wait_shown(self) -> None:
        wait_until(lambda: self.shown.is_set() or self.future.done(), 15, "the device code")
        if self.future.done():
            self.future.result()  # raises what went wrong


@pytest.fixture
def start_login(server: LiveServer, clock: LiveClock) -> Iterator[Callable[[], PendingLogin]]:
    """`start_login()`: a device login running as the CLI runs it.  A test that failed half-way
    leaves one polling: its code is expired then, so it ends at its next poll instead of
    holding the teardown for 10 minutes."""
    with ThreadPoolExecutor(max_workers=2) as pool:
        started: list[PendingLogin] = []

        def _start() -> PendingLogin:
            started.append(PendingLogin(server, pool))
            return started[-1]

        yield _start
        if any(not login.future.done() for login in started):
            clock.advance(device_codes.LIFETIME.total_seconds() + 1)


def test_device_login_approved_in_the_browser_gives_the_cli_a_token(
    page: Page,
    server: LiveServer,
    make_user: Callable[..., WebUser],
    start_login: Callable[[], PendingLogin],
    shot: Shot,
) -> None:
    user = make_user()
    login = start_login()
    login.wait_shown()
    assert login.uri == f"{server.url}/device"

    page.goto(login.uri)  # not signed in yet: sign in first, then back to /device
    expect(page).to_have_url(f"{server.url}/login?next=/device")
    submit_sign_in(page, user)
    expect(page.get_by_role("heading", name="Sign in a device")).to_be_visible()
    shot(page, "device-enter-code")
    page.get_by_label("Code").fill(login.code.lower().replace("-", ""))  # forgiving input
    page.get_by_role("button", name="Continue").click()
    expect(page.locator("#confirm-code")).to_have_text(login.code)
    expect(page.get_by_text("laptop-1")).to_be_visible()
    shot(page, "device-confirm")
    page.get_by_role("button", name="Approve").click()
    expect(page.get_by_role("heading", name="Device approved")).to_be_visible()
    shot(page, "device-approved")

    token = login.future.result(timeout=30)
    assert token.startswith("off_u_")

    async def whoami() -> str:
        async with UserClient(server.url, token) as client:
            return (await client.me()).username

    assert run(whoami()) == user.username


def test_device_login_denied_in_the_browser_tells_the_cli(
    page: Page,
    server: LiveServer,
    make_user: Callable[..., WebUser],
    start_login: Callable[[], PendingLogin],
    shot: Shot,
) -> None:
    user = make_user()
    login = start_login()
    login.wait_shown()
    sign_in(page, server.url, user)
    page.goto(f"{login.uri}?code={login.code}")  # verification_uri_complete
    page.get_by_role("button", name="Deny").click()
    expect(page.get_by_role("heading", name="Device denied")).to_be_visible()
    shot(page, "device-denied")
    with pytest.raises(PermissionDenied, match="denied in the browser") as caught:
        login.future.result(timeout=30)
    assert "offload login" in caught.value.fix


def test_an_expired_device_code_tells_the_cli_and_the_browser(
    page: Page,
    server: LiveServer,
    clock: LiveClock,
    make_user: Callable[..., WebUser],
    start_login: Callable[[], PendingLogin],
    shot: Shot,
) -> None:
    user = make_user()
    login = start_login()
    login.wait_shown()
    clock.advance(11 * 60)  # codes live 10 minutes on the control plane's clock
    with pytest.raises(NotAuthenticated, match="expired") as caught:
        login.future.result(timeout=30)
    assert "offload login" in caught.value.fix

    sign_in(page, server.url, user)
    response = page.goto(f"{login.uri}?code={login.code}")
    assert response is not None and response.status == 404
    expect(page.get_by_role("alert")).to_contain_text("No sign-in request")
    shot(page, "device-expired")


# ---- sessions, prompts --------------------------------------------------------------------------


def test_a_reported_session_appears_with_a_live_duration(
    page: Page,
    server: LiveServer,
    make_user: Callable[..., WebUser],
    runner_token: str,
    shot: Shot,
) -> None:
    user = make_user()
    sign_in(page, server.url, user)
    expect(page.get_by_text("No active session")).to_be_visible()
    info = run(
        report_session(server.url, user.token, runner_token, ("busybox:latest", "alpine:3"), 3)
    )
    page.reload()
    row = page.locator("#active-sessions tbody tr", has_text=info.id)
    expect(row).to_contain_text("active")
    ticking = row.locator("[data-tick-from]")
    first = ticking.inner_text()
    page.wait_for_function(
        "([el, first]) => el.textContent !== first",
        arg=[ticking.element_handle(), first],
        timeout=TIMEOUT_MS,
    )
    expect(page.locator("#top-images")).to_contain_text("busybox:latest")
    expect(page.locator("#recent-sessions")).to_contain_text(info.id)
    expect(row.locator('[data-label="GPU"]')).to_have_text("-")
    shot(page, "overview")

    page.get_by_role("link", name="Activity", exact=True).click()
    activity_row = page.locator("#activity tbody tr", has_text=info.id)
    expect(activity_row.locator("td").nth(2)).to_have_text("3")  # containers
    expect(page.get_by_text("Page 1 of 1")).to_be_visible()
    shot(page, "activity")


def test_a_gpu_session_shows_its_gpu(
    page: Page, server: LiveServer, make_user: Callable[..., WebUser], runner_token: str
) -> None:
    user = make_user()
    busy = stand_in_gpu("web-gpu", 0).model_copy(update={"utilization_percent": 41})
    info = run(report_session(server.url, user.token, runner_token, gpu=busy))
    sign_in(page, server.url, user)
    row = page.locator("#active-sessions tbody tr", has_text=info.id)
    expect(row.locator('[data-label="GPU"]')).to_have_text(
        "NVIDIA H200 (stand-in), 141 GiB, 41% busy"
    )


def test_the_still_active_prompt_is_a_banner_that_keeps_the_session(
    page: Page,
    server: LiveServer,
    ctx: ServerContext,
    clock: LiveClock,
    make_user: Callable[..., WebUser],
    runner_token: str,
    shot: Shot,
) -> None:
    user = make_user()
    info = run(report_session(server.url, user.token, runner_token))
    clock.advance(200)  # quiet for over 3 minutes of its 5-minute idle timeout
    run(lifecycle.tick(ctx))

    sign_in(page, server.url, user)
    banner = page.get_by_role("alert")
    expect(banner).to_contain_text("Are you still using Offload?")
    expect(banner).to_contain_text(info.id)
    shot(page, "prompt-banner")
    banner.get_by_role("button", name="Keep going").click()
    expect(page.get_by_role("status")).to_contain_text("Keeping your session going")
    expect(page.get_by_role("alert")).to_have_count(0)

    async def current() -> s.SessionInfo:
        async with api(server, user) as client:
            return await client.get_session(info.id)

    after = run(current())
    assert after.state is s.SessionState.ACTIVE and after.prompt is None


# ---- settings -----------------------------------------------------------------------------------


def test_personal_idle_timeout_and_tokens(
    page: Page, server: LiveServer, make_user: Callable[..., WebUser], shot: Shot
) -> None:
    user = make_user()
    sign_in(page, server.url, user, "/settings")
    page.get_by_label("Idle timeout in seconds").fill("900")
    page.get_by_role("button", name="Save settings").click()
    expect(page.get_by_role("status")).to_have_text("Saved.")
    expect(page.get_by_label("Idle timeout in seconds")).to_have_value("900")
    assert run(_settings(server, user)).idle_timeout_s == 900

    page.get_by_label("Name").fill("laptop")
    page.get_by_role("button", name="Create token").click()
    new_token = page.locator("#new-token code.secret").inner_text()
    assert new_token.startswith("off_u_")
    shot(page, "settings-token-created")
    page.goto(server.url + "/settings")  # shown once: gone on the next visit
    expect(page.locator("#new-token")).to_have_count(0)
    expect(page.get_by_text(new_token)).to_have_count(0)

    page.once("dialog", lambda dialog: dialog.accept())
    page.get_by_role("button", name="Revoke laptop").click()
    expect(page.get_by_role("status")).to_have_text("Token revoked.")
    expect(page.locator("#tokens tbody tr", has_text="laptop")).to_contain_text("revoked")
    shot(page, "settings")


def test_a_member_is_refused_the_billing_page(
    page: Page, server: LiveServer, make_user: Callable[..., WebUser], shot: Shot
) -> None:
    owner = make_user(role=s.Role.OWNER)
    member = make_user(org=owner.org)
    sign_in(page, server.url, member)
    expect(page.get_by_role("link", name=f"Organisation {owner.org}")).to_have_count(0)
    response = page.goto(f"{server.url}/orgs/{owner.org}/billing")
    assert response is not None and response.status == 403
    expect(page.get_by_role("heading", name="Not allowed")).to_be_visible()
    expect(page.get_by_role("alert")).to_contain_text(f"Only owners of {owner.org}")
    expect(page.get_by_role("alert")).to_contain_text(owner.username)
    shot(page, "billing-member-403")


def test_an_owner_changes_the_monthly_limit(
    page: Page, server: LiveServer, make_user: Callable[..., WebUser], shot: Shot
) -> None:
    owner = make_user(role=s.Role.OWNER)
    sign_in(page, server.url, owner)
    page.get_by_role("link", name=f"Organisation {owner.org}").click()
    page.get_by_role("link", name="Billing").click()
    page.get_by_label("Committed minutes per month").fill("600")
    page.get_by_label("On-demand usage beyond the committed minutes").check()
    page.get_by_label("Monthly on-demand limit in dollars").fill("250.50")
    page.get_by_role("button", name="Save billing").click()
    expect(page.get_by_role("status")).to_have_text("Saved.")
    expect(page.get_by_label("Monthly on-demand limit in dollars")).to_have_value("250.50")
    expect(page.locator("#billing-month")).to_contain_text("of 600 min")

    async def terms() -> s.OrgBilling:
        async with api(server, owner) as client:
            return await client.org_billing(owner.org)

    saved = run(terms())
    assert saved.on_demand_limit_cents == 25050
    assert saved.committed_minutes_per_month == 600 and saved.on_demand_enabled
    shot(page, "billing")


def test_organisation_activity_csv_and_settings(
    page: Page,
    context: BrowserContext,
    server: LiveServer,
    make_user: Callable[..., WebUser],
    runner_token: str,
    shot: Shot,
) -> None:
    owner = make_user(role=s.Role.OWNER)
    member = make_user(org=owner.org)
    mine = run(report_session(server.url, owner.token, runner_token, ("busybox:latest",), 1))
    theirs = run(report_session(server.url, member.token, runner_token, ("alpine:3",), 2))

    sign_in(page, server.url, owner, f"/orgs/{owner.org}/activity")
    totals = page.locator("#org-totals")
    expect(totals).to_contain_text("2 sessions")
    expect(totals).to_contain_text("2 unique users")
    expect(totals).to_contain_text("2 unique images")
    expect(page.locator("svg.chart")).to_be_visible()
    shot(page, "org-activity")

    href = page.locator("#csv-link").get_attribute("href")
    assert href is not None
    response = context.request.get(server.url + href)
    assert response.status == 200 and response.headers["content-type"].startswith("text/csv")
    rows = list(csv.reader(io.StringIO(response.text())))
    assert tuple(rows[0]) == CSV_COLUMNS
    by_id = {row[0]: dict(zip(CSV_COLUMNS, row, strict=True)) for row in rows[1:]}
    assert by_id[mine.id]["user"] == owner.username
    assert by_id[mine.id]["images"] == "busybox:latest"
    assert by_id[theirs.id]["user"] == member.username
    assert by_id[theirs.id]["containers"] == "2"
    assert by_id[theirs.id]["status"] == "active" and by_id[theirs.id]["end"] == ""
    assert by_id[theirs.id]["start"].endswith("Z")

    page.get_by_role("link", name="Settings and members").click()
    page.get_by_label("Disabled: off, unless a member turns it on").check()
    page.get_by_label("Members may start GPU sessions").select_option("deny")
    page.get_by_label("GPU sessions at once").fill("2")
    page.get_by_role("button", name="Save settings").click()
    expect(page.get_by_role("status")).to_have_text("Saved.")

    async def org_settings() -> s.OrgSettings:
        async with api(server, owner) as client:
            return await client.org_settings(owner.org)

    saved = run(org_settings())
    assert saved.offload_access is s.OffloadAccess.DISABLED
    assert (saved.gpu_sessions_allowed, saved.gpu_session_limit) == (False, 2)
    page.get_by_label("GPU sessions at once").fill("")  # empty: no limit again
    page.get_by_role("button", name="Save settings").click()
    expect(page.get_by_role("status")).to_have_text("Saved.")
    assert run(org_settings()).gpu_session_limit is None
    expect(page.get_by_label("Members may start GPU sessions")).to_have_value("deny")
    invite = page.locator("#invite-form")
    invite.get_by_label("Username").fill(f"new-{owner.username}")
    invite.get_by_role("button", name="Invite").click()
    expect(page.locator("#invited")).to_contain_text("A new account was created")
    expect(page.locator("#members")).to_contain_text(f"new-{owner.username}")
    shot(page, "org-settings")


def test_a_narrow_screen_and_the_keyboard(
    browser: Browser,
    server: LiveServer,
    make_user: Callable[..., WebUser],
    runner_token: str,
    shot: Shot,
) -> None:
    user = make_user(role=s.Role.OWNER)
    run(report_session(server.url, user.token, runner_token))
    narrow = browser.new_context(viewport={"width": 360, "height": 740}, is_mobile=True)
    try:
        page = narrow.new_page()
        page.set_default_timeout(TIMEOUT_MS)
        sign_in(page, server.url, user)
        page.keyboard.press("Tab")
        assert page.evaluate("document.activeElement.textContent") == "Skip to content"
        # Nothing but the tables' own scroll boxes is wider than the screen.
        assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")
        shot(page, "overview-narrow")
        page.goto(f"{server.url}/orgs/{user.org}/billing")
        assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")
        shot(page, "billing-narrow")
    finally:
        narrow.close()
