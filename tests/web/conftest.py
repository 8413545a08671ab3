"""Dashboard tests: one control plane served by uvicorn and one headless Chromium (Debian's
/usr/bin/chromium, driven by Playwright) for the whole package; each test gets its own
organisation and users, and its own browser context (cookies).

Screenshots of the pages go to artifacts/web/ (gitignored).
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from playwright.sync_api import Browser, BrowserContext, Page, sync_playwright

from offload.core import schemas as s
from offload.core.config import ServerSettings
from offload.server.app import create_app
from offload.server.context import ServerContext
from offload.server.services import accounts, tokens

from .support import LiveClock, LiveServer

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",  # the tests run as root
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
PASSWORD = "correct horse battery staple"
ARTIFACTS = Path(__file__).resolve().parents[2] / "artifacts" / "web"
TIMEOUT_MS = 15_000

_names = itertools.count(1)


def unique(prefix: str) -> str:
    return f"{prefix}-{os.getpid()}-{next(_names)}"


@dataclass
class WebUser:
    username: str
    password: str
    org: str
    token: str


@pytest.fixture(scope="package")
def clock() -> LiveClock:
    return LiveClock()


@pytest.fixture(scope="package")
def server(tmp_path_factory: pytest.TempPathFactory, clock: LiveClock) -> Iterator[LiveServer]:
    # The lifecycle clock stays off: tests run `lifecycle.tick` when they want it.
    settings = ServerSettings(data_dir=tmp_path_factory.mktemp("web-server"), tick_interval_s=0)
    live = LiveServer(create_app(settings, clock)).start()
    yield live
    live.stop()


@pytest.fixture(scope="package")
def ctx(server: LiveServer) -> ServerContext:
    context: ServerContext = server.app.state.context
    return context


@pytest.fixture(scope="package")
def runner_token(ctx: ServerContext) -> str:
    return ctx.db.call(tokens.issue_runner_token, "web-tests", ctx.now())


@pytest.fixture
def make_user(ctx: ServerContext) -> Callable[..., WebUser]:
    """`make_user(org=None, role=member)`: a user with a password and an API token; a new
    organisation unless one is named."""

    def _make(org: str | None = None, role: s.Role = s.Role.MEMBER) -> WebUser:
        org_name = org or unique("org")
        username = unique("user")
        with ctx.db.transaction() as db:
            organisation = accounts.get_or_create_org(db, org_name, ctx.now())
            user = accounts.create_user(db, username, PASSWORD, ctx.now())
            accounts.add_member(db, user, organisation, role, ctx.now())
            token = tokens.issue_api_token(db, user.id, "test", ctx.now())
        return WebUser(username, PASSWORD, org_name, token)

    return _make


@pytest.fixture(scope="package")
def browser() -> Iterator[Browser]:
    if not os.path.exists(CHROMIUM):
        pytest.fail(f"{CHROMIUM} is missing: `apt-get install chromium` (scripts/test.sh does it).")
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(
            executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS
        )
        yield launched
        launched.close()


@pytest.fixture
def context(browser: Browser) -> Iterator[BrowserContext]:
    made = browser.new_context(viewport={"width": 1280, "height": 900})
    made.set_default_timeout(TIMEOUT_MS)
    yield made
    made.close()


@pytest.fixture
def page(context: BrowserContext) -> Iterator[Page]:
    """A tab whose console must stay free of errors (a CSP violation or a script error would
    show there); refused pages (403/404) are expected and not counted."""
    opened = context.new_page()
    errors: list[str] = []
    opened.on(
        "console",
        lambda message: (
            errors.append(message.text)
            if message.type == "error" and "Failed to load resource" not in message.text
            else None
        ),
    )
    opened.on("pageerror", lambda error: errors.append(str(error)))
    yield opened
    assert errors == [], f"browser console errors: {errors}"


@pytest.fixture
def shot() -> Callable[[Page, str], None]:
    """`shot(page, name)`: a full-page screenshot at artifacts/web/<name>.png."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)

    def _shot(target: Page, name: str) -> None:
        target.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)

    return _shot


def submit_sign_in(page: Page, user: WebUser) -> None:
    """Fill and send the sign-in form the page shows."""
    page.get_by_label("Username").fill(user.username)
    page.get_by_label("Password").fill(user.password)
    page.get_by_role("button", name="Sign in").click()


def sign_in(page: Page, base_url: str, user: WebUser, path: str = "/") -> None:
    page.goto(f"{base_url}/login?next={path}")
    submit_sign_in(page, user)
    page.wait_for_url(f"{base_url}{path}")
