"""/dashboard in a real headless Chromium (Debian's), driven by Playwright over loopback.

Needs /usr/bin/chromium (`make browser` installs it) and the `playwright` package (the `dev`
extra); never `playwright install`. Screenshots go to the test's temporary directory, or to
DASHBOARD_SCREENSHOTS when set (`dashboard-<page>.png`).
"""

from __future__ import annotations

import os
import re
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from sqlalchemy.ext.asyncio import AsyncEngine

from service.dispatcher.worker import Dispatcher
from tests.conftest import RunningSimulator
from tests.payloads import track_body
from tests.test_dashboard_changes import listening
from tests.webhook_sender import WebhookSender

CHROMIUM = Path("/usr/bin/chromium")
if not CHROMIUM.exists():
    pytest.skip(
        f"no browser at {CHROMIUM} (`make browser` installs Debian's chromium)",
        allow_module_level=True,
    )
playwright = pytest.importorskip(
    "playwright.async_api", reason="the playwright package is missing (pip install -e '.[dev]')"
)
Page = playwright.Page
expect = playwright.expect

CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]

Client = TestClient[web.Request, web.Application]


@pytest.fixture
async def page() -> AsyncIterator[Page]:
    async with playwright.async_playwright() as driver:
        browser = await driver.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            context = await browser.new_context(viewport={"width": 1280, "height": 900})
            tab = await context.new_page()
            tab.set_default_timeout(10_000)
            yield tab
        finally:
            await browser.close()


@pytest.fixture
def screenshots(tmp_path: Path) -> Callable[[Page, str], object]:
    directory = Path(os.environ.get("DASHBOARD_SCREENSHOTS") or tmp_path)

    async def shoot(tab: Page, name: str) -> None:
        await tab.screenshot(path=str(directory / f"dashboard-{name}.png"), full_page=True)

    return shoot


async def subscribe(api: Client, number: str) -> None:
    body = {"carrier_code": "stamps_com", "tracking_number": number, "reference": f"order-{number}"}
    assert (await api.post("/v1/subscriptions", json=body)).status == 202


async def test_ops_find_a_failed_subscription_retry_it_and_watch_it_start(
    api: Client,
    token: str,
    shipengine: RunningSimulator,
    make_dispatcher: Callable[..., Dispatcher],
    page: Page,
    screenshots: Callable[[Page, str], object],
) -> None:
    refused = "9405511899223197428491"
    shipengine.simulator.script(refused, status=400, error_code="invalid_identifier", times=1)
    for number in ("9405511899223197428490", refused, "9405511899223197428492"):
        await subscribe(api, number)
    dispatcher = make_dispatcher()
    await dispatcher.drain()

    await page.goto(str(api.make_url("/dashboard")))
    await expect(page).to_have_url(re.compile(r"/dashboard/login\?next=/dashboard$"))
    await page.get_by_label("API token").fill(token)
    await page.get_by_role("button", name="Log in").click()
    await expect(page.get_by_text("Dispatching is running")).to_be_visible()
    await expect(page.locator("figure svg").first).to_be_visible()
    await screenshots(page, "summary")

    await page.get_by_role("link", name="Subscriptions", exact=True).click()
    await page.get_by_label("Tracking number").fill(refused)
    await page.get_by_role("button", name="Search").click()
    await expect(page.locator("tbody tr")).to_have_count(1)
    await page.get_by_role("link", name=refused).click()
    await expect(page.locator("#state")).to_have_text("failed")
    await expect(page.get_by_text("invalid_identifier").first).to_be_visible()
    await screenshots(page, "subscription")

    await page.get_by_role("button", name="Retry").click()
    await expect(page.locator("#state")).to_have_text("pending")
    await expect(page.get_by_role("status")).to_contain_text(f"Retried {refused}")
    await expect(page.get_by_role("button", name="Retry")).to_have_count(0)

    assert await dispatcher.drain() == 1
    await page.reload()
    await expect(page.locator("#state")).to_have_text("active")
    await screenshots(page, "subscription-active")

    await page.get_by_role("button", name="Log out").click()
    await expect(page).to_have_url(re.compile(r"/dashboard/login$"))
    await page.goto(str(api.make_url("/dashboard")))
    await expect(page.get_by_label("API token")).to_be_visible()


async def test_a_change_appears_live_on_the_changes_page(
    api: Client,
    token: str,
    hooks: WebhookSender,
    engine: AsyncEngine,
    page: Page,
    screenshots: Callable[[Page, str], object],
) -> None:
    number = "9405511899223197428493"
    await page.goto(str(api.make_url("/dashboard/login")))
    await page.get_by_label("API token").fill(token)
    await page.get_by_role("button", name="Log in").click()
    await page.get_by_role("link", name="Changes", exact=True).click()
    rows = page.locator("#changes tbody tr")
    await expect(rows).to_have_text(["No changes yet."])
    await expect(page.locator("#live")).to_have_text("Live.")
    await listening(engine)  # the page's stream started the broadcaster: it hears the change

    await subscribe(api, number)
    await hooks.deliver(track_body(number, "stamps_com", 2))
    await expect(rows).to_have_count(1)
    await expect(rows.first).to_contain_text("tracking.status_changed")
    await expect(rows.first).to_contain_text("Departed facility")
    await screenshots(page, "changes")
    await rows.first.get_by_role("link", name=number).click()
    await expect(page.locator("#state")).to_be_visible()
