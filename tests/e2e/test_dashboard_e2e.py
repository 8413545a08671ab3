"""The dashboard against the real thing: a real `offload login` waiting on a device code that is
approved in Chromium, a session made by a real `docker run` through Offload shown on the
overview, and an idle timeout changed in the browser that the running session picks up."""

from __future__ import annotations

import json
import os
import re
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.sync_api import Browser, Page, expect, sync_playwright

from offload.core.schemas import Role
from offload.core.waiting import wait_until
from tests.e2e.conftest import VENV_BIN, Deployment, User, _user_env

CHROMIUM = "/usr/bin/chromium"
ARTIFACTS = Path(__file__).resolve().parents[2] / "artifacts" / "e2e"
PASSWORD = "a long and honest password"


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    if not os.path.exists(CHROMIUM):
        pytest.fail(f"{CHROMIUM} is missing: `apt-get install chromium` (scripts/test.sh does it).")
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(
            executable_path=CHROMIUM,
            headless=True,
            args=[
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--no-first-run",
            ],
        )
        yield launched
        launched.close()


@pytest.fixture
def page(browser: Browser) -> Iterator[Page]:
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    context.set_default_timeout(15_000)
    yield context.new_page()
    context.close()


def _shot(page: Page, name: str) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


def test_device_login_then_session_on_the_dashboard_and_idle_timeout_applied(
    deployment: Deployment, page: Page, tmp_path: Path, hello_context: Path
) -> None:
    from offload.server.bootstrap import create_user

    name = f"web-{uuid.uuid4().hex[:6]}"
    create_user(deployment.server_settings, name, PASSWORD, "default", Role.MEMBER)
    user = User(name, tmp_path, _user_env(tmp_path))

    # A real `offload login` with neither token nor user: it prints a URL and a code and waits.
    login = subprocess.Popen(
        [str(VENV_BIN / "offload"), "login", "--server", deployment.server_url],
        env=user.env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert login.stderr is not None
        shown = ""
        for line in login.stderr:
            shown += line
            if "confirm the code" in line:
                break
        code = re.search(r"confirm the code (\S+)\.", shown)
        assert code, shown
        page.goto(f"{deployment.server_url}/device")
        page.get_by_label("Username").fill(name)
        page.get_by_label("Password").fill(PASSWORD)
        page.get_by_role("button", name="Sign in").click()
        page.get_by_label("Code").fill(code.group(1))
        page.get_by_role("button", name="Continue").click()
        expect(page.locator("#confirm-code")).to_have_text(code.group(1))
        page.get_by_role("button", name="Approve").click()
        expect(page.get_by_role("heading", name="Device approved")).to_be_visible()
        assert login.wait(timeout=60) == 0
    finally:
        if login.poll() is None:
            login.kill()
    assert (user.offload_home / "config.json").exists()

    # A real session and container through Offload...
    user.docker("offload", "start", "--timeout", "60s")
    user.docker("build", "-q", "-t", "hello", str(hello_context))
    assert user.docker("run", "--rm", "hello").stdout.strip() == "hello from offload"
    session_id = json.loads(user.offload("status", "-f", "json").stdout)["session_id"]

    # ...shows on the overview, with its one container and its image: the `--rm` container
    # lived less than one runner survey, the engine's event stream counted it.
    page.goto(f"{deployment.server_url}/")
    expect(page.get_by_text(session_id).first).to_be_visible()

    def counted() -> bool:
        page.goto(f"{deployment.server_url}/")
        row = page.locator("#recent-sessions tr", has_text=session_id)
        containers = row.locator('td[data-label="Containers"]').inner_text().strip()
        images = page.locator("#top-images").all_inner_texts() if containers == "1" else []
        return any("hello:latest" in text for text in images)

    wait_until(counted, 30, "the overview to show 1 container and the hello image", interval=0.5)
    _shot(page, "overview-real-session")

    # The idle timeout changed in the browser reaches the running session and its status.
    page.goto(f"{deployment.server_url}/settings")
    page.get_by_label("Idle timeout in seconds").fill("900")
    page.get_by_role("button", name="Save settings").click()
    expect(page.get_by_role("status")).to_have_text("Saved.")
    _shot(page, "settings-idle-timeout")

    def applied() -> bool:
        status = json.loads(user.offload("status", "-f", "json").stdout)
        return status["idle_timeout_s"] == 900

    wait_until(applied, 30, "the session's idle timeout to become 15 minutes", interval=0.5)
    user.offload("stop", "--force")
