"""The chat page at GET / (chat.html), driven in a real headless Chromium through Playwright: a typed prompt gets
the API's greedy answer, streamed; Stop aborts the stream and the server counts the request as cancelled.
Skipped where Playwright's Python package or a Chromium is missing (scripts/setup.sh installs both where it
can)."""
import shutil
import time

import pytest

from conftest import client, raw, running_server

sync_api = pytest.importorskip("playwright.sync_api")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no chromium on this machine (apt-get install chromium)")

# a closed network: no background connections, no first-run work; root (as in CI) needs --no-sandbox
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def smollm2_server(smollm2_dir):
    yield from running_server(smollm2_dir, slots=2)


@pytest.fixture
def page(smollm2_server):
    """The chat page, loaded from the server in a fresh headless Chromium."""
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            page.goto(f"http://127.0.0.1:{smollm2_server[0].server_port}/", timeout=30_000)
            yield page
        finally:
            browser.close()


def send(page, prompt: str, temperature: float, max_tokens: int):
    page.fill("#temperature", str(temperature))
    page.fill("#max_tokens", str(max_tokens))
    page.fill("#prompt", prompt)
    page.click("#send")


def test_a_typed_prompt_gets_the_greedy_answer_of_the_api(smollm2_server, page):
    prompt = "What is the capital of France?"
    expected = client(smollm2_server[0]).chat.completions.create(
        model="m", messages=[{"role": "user", "content": prompt}], temperature=0, max_tokens=24)
    send(page, prompt, 0, 24)
    page.wait_for_function("!document.querySelector('#send').disabled", timeout=60_000)
    assert page.locator(".message.user").inner_text() == prompt
    assert page.locator(".message.assistant").text_content() == expected.choices[0].message.content


def test_stop_aborts_the_stream_and_the_server_cancels_the_request(smollm2_server, page):
    http_server = smollm2_server[0]
    cancelled = 'brisk_requests_total{outcome="cancelled"}'

    def cancelled_count() -> int:
        lines = raw(http_server, "GET", "/metrics")[1].decode().splitlines()
        return sum(int(line.split()[-1]) for line in lines if line.startswith(cancelled))

    before = cancelled_count()
    send(page, "Write a very long story about a dragon and a knight.", 0.7, 1500)
    page.wait_for_function("document.querySelector('.message.assistant').textContent.length > 0", timeout=60_000)
    page.click("#stop")
    page.wait_for_function("document.querySelector('#status').textContent === 'stopped'", timeout=10_000)
    deadline = time.monotonic() + 20
    while cancelled_count() == before and time.monotonic() < deadline:
        time.sleep(0.1)
    assert cancelled_count() == before + 1
    assert not page.locator("#send").is_disabled()
