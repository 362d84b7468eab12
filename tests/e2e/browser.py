"""Headless Debian Chromium driven by Playwright (never a downloaded browser), with what a UI test
needs around it: a screenshot of each view it checked, and the screenshot plus the page's HTML of
the view it failed on, under tests/artifacts/ (ignored by git)."""

import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from playwright.sync_api import BrowserContext, Page, sync_playwright

CHROMIUM = "/usr/bin/chromium"  # Debian package `chromium` (scripts/system-packages)
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]
ARTIFACTS = Path(__file__).resolve().parents[1] / "artifacts"
VIEWPORT = {"width": 1600, "height": 1000}
# On localhost the Dagster UI opens a "Join the Dagster community" dialog over the first page of a
# fresh instance; a user dismisses it once and the UI remembers it in localStorage.
DISMISS_COMMUNITY_DIALOG = "localStorage.setItem('communityNux', '\"1\"')"


@contextmanager
def chromium(profile_dir: Path) -> Iterator[BrowserContext]:
    if not Path(CHROMIUM).exists():
        raise FileNotFoundError(f"{CHROMIUM} is missing: install the Debian package `chromium` (scripts/system-packages)")
    with sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            str(profile_dir), executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS, viewport=VIEWPORT,
        )
        context.set_default_timeout(30_000)
        context.add_init_script(DISMISS_COMMUNITY_DIALOG)
        try:
            yield context
        finally:
            context.close()


def clear_artifacts(prefix: str) -> None:
    """Drops a previous run's files of this test so what is left describes this run only."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    for path in ARTIFACTS.glob(f"{prefix}*"):
        path.unlink() if path.is_file() else shutil.rmtree(path)


@contextmanager
def recorded_view(page: Page, name: str) -> Iterator[None]:
    """Screenshots the view once its assertions pass; on failure saves the screenshot and the HTML."""
    try:
        yield
    except BaseException:
        page.screenshot(path=ARTIFACTS / f"{name}-failure.png", full_page=True)
        (ARTIFACTS / f"{name}-failure.html").write_text(page.content())
        raise
    page.screenshot(path=ARTIFACTS / f"{name}.png", full_page=True)


def table_rows(page: Page) -> dict[str, str]:
    """The first two cells of each row of the page's tables: label -> value as displayed."""
    rows = page.locator("table tr").evaluate_all(
        "rows => rows.map(r => Array.from(r.cells).slice(0, 2).map(c => c.innerText.trim()))"
    )
    return {row[0]: row[1] for row in rows if len(row) == 2}
