"""Headless Chromium for the page tests: Debian's ``/usr/bin/chromium`` driven by Playwright.

Playwright's own browser download cannot run on the project's machines, so the tests launch the
system Chromium with ``executable_path``. The fixture ``browser_page`` (registered in conftest)
yields a fresh page and collects console errors in ``page.console_errors``.
"""

from __future__ import annotations

import os
import shutil

import pytest

CHROMIUM = os.environ.get("DIFFALIGN_CHROMIUM", "/usr/bin/chromium")
# The closed network of the build machines refuses Chromium's background connections; these
# flags keep it from trying, and --no-sandbox is needed when the tests run as root (CI does).
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]  # fmt: skip


@pytest.fixture
def browser_page():
    """A Playwright page in headless Chromium; ``page.console_errors`` lists console errors."""
    sync_api = pytest.importorskip("playwright.sync_api", reason="install the test extra: pip install -e '.[test]'")
    if not (os.path.exists(CHROMIUM) or shutil.which(CHROMIUM)):
        pytest.fail(f"Chromium not found at {CHROMIUM}: apt-get install chromium (or set DIFFALIGN_CHROMIUM)")
    # Playwright gives every launch a fresh empty profile of its own.
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            page.console_errors = []
            page.on("console", lambda message: message.type == "error" and page.console_errors.append(message.text))
            page.on("pageerror", lambda error: page.console_errors.append(str(error)))
            yield page
        finally:
            browser.close()
