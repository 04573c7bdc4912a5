"""The playground page in a real headless browser (Debian's chromium driven by Playwright):
type a prompt, generate, watch the streamed tokens arrive, open a token's next-token
probabilities, and check a screenshot of the result."""

from __future__ import annotations

import io
import json
import math

import httpx
import pytest

PROMPT = "ROMEO: What light"
WIDTH, HEIGHT = 1200, 900

sync_api = pytest.importorskip("playwright.sync_api")
expect = sync_api.expect
Image = pytest.importorskip("PIL.Image")


def test_playground_streams_tokens_and_shows_probabilities(browser, live, tmp_path):
    # Only locators and Playwright's own waits are used: the page's Content-Security-Policy
    # (no eval) stays in force, so this also checks that the page runs under it.
    page = browser.new_page(viewport={"width": WIDTH, "height": HEIGHT})
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.goto(live.url + "/")
    expect(page.locator("#model-name")).to_contain_text("model: tiny")

    page.locator("#prompt").fill(PROMPT)
    page.locator("#max-tokens").fill("24")
    page.locator("#temperature").focus()
    page.keyboard.press("Home")  # the slider's minimum: greedy
    expect(page.locator("#temperature-value")).to_have_text("0")
    page.locator("#alternatives").fill("4")
    # What the page shows must be what the API returns for the same request.
    api = httpx.post(live.url + "/v1/completions", json={"prompt": PROMPT, "max_tokens": 24, "temperature": 0,
                                                         "top_k": 40, "top_p": 0.95, "logprobs": 4}).json()
    choice = api["choices"][0]
    n = len(choice["logprobs"]["tokens"])
    assert n >= 3, "the test model should not stop at once"

    page.locator("#generate").click()
    tokens = page.locator("#output .tok")
    expect(page.locator("#status")).to_contain_text(f"finished: {choice['finish_reason']}", timeout=20_000)
    expect(tokens).to_have_count(n)
    expect(page.locator("#generate")).to_be_enabled()
    expect(page.locator("#stop-btn")).to_be_disabled()
    shown = tokens.all_text_contents()
    assert "".join(shown) == choice["text"] and shown == choice["logprobs"]["tokens"]
    expect(page.locator("#output .prompt-text")).to_have_text(PROMPT)
    expect(page.locator("#status")).to_contain_text(f"{n} tokens")

    # Click the third generated token: its alternatives and their probabilities appear.
    expect(page.locator("#token-detail")).to_be_hidden()
    tokens.nth(2).click()
    expect(page.locator("#token-detail")).to_be_visible()
    expect(tokens.nth(2)).to_have_class("tok selected")
    expect(page.locator("#detail-summary")).to_contain_text("Step 3")
    rows = page.locator("#detail-rows tr")
    top = choice["logprobs"]["top_logprobs"][2]
    expect(rows).to_have_count(4)
    assert len(top) == 4
    for i, (token, logprob) in enumerate(sorted(top.items(), key=lambda kv: -kv[1])):
        cells = rows.nth(i).locator("td").all_text_contents()
        shown = token if token.startswith("bytes:") else json.dumps(token, ensure_ascii=False)
        assert cells[:2] == [shown, f"{100 * math.exp(logprob):.2f}%"]
    expect(page.locator("#detail-rows tr.chosen")).to_have_count(1)  # greedy chose one of them
    expect(rows.first).to_have_class("alt chosen")  # ... the most likely one

    shot = tmp_path / "playground.png"
    page.screenshot(path=str(shot))
    image = Image.open(io.BytesIO(shot.read_bytes())).convert("RGB")
    assert image.size == (WIDTH, HEIGHT)
    colours = image.getcolors(maxcolors=1 << 20)
    assert colours is not None and len(colours) > 50  # text, token colours, bars: not a blank page
    # The probability bars are drawn in the accent colour (#2d5bd7).
    assert sum(n for n, (r, g, b) in colours if abs(r - 0x2D) < 8 and abs(g - 0x5B) < 8 and abs(b - 0xD7) < 8) > 100
    assert not errors, errors
    page.close()


def test_playground_reports_errors(browser, live):
    page = browser.new_page(viewport={"width": WIDTH, "height": HEIGHT})
    page.goto(live.url + "/")
    page.locator("#prompt").fill(PROMPT)
    page.locator("#max-tokens").fill("100000")  # over the server's limit: the API's message is shown
    page.locator("#generate").click()
    expect(page.locator("#output .error")).to_contain_text("max_tokens")
    expect(page.locator("#status")).to_have_text("failed")
    page.close()
