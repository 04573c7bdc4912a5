"""The arena page in headless Chromium, two raters at once (two browser contexts, so two
rater ids and two localStorages): both studies stream their answers side by side at the
same time, votes by keyboard shortcut and by button (with a reason), the models revealed
after each vote; what the pages showed is what the database holds, in each rater's
balanced order; a screenshot shows the two answers side by side."""

from __future__ import annotations

import io
import json

import pytest

from lmforge.api import LM
from lmforge.eval.arena_store import read_votes
from lmforge.serve import create_app
from lmforge.serve.study import rater_order

from .conftest import LiveServer, tiny_gpt

sync_api = pytest.importorskip("playwright.sync_api")
expect = sync_api.expect
Image = pytest.importorskip("PIL.Image")

WIDTH, HEIGHT = 1200, 800
PROMPTS = ["ROMEO: What light", "JULIET: O Romeo", "HAMLET: To be"]
KEYS = {"alice": ["1", "2", "3"], "bob": [None, "t", "x"]}  # bob's first vote is a click, with a reason
CHOICE_OF_KEY = {"1": "a", "2": "b", "3": "tie", "t": "tie", "x": "both_bad"}


@pytest.fixture(scope="module")
def arena(tokenizer, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("arena")
    study = tmp / "study.jsonl"
    study.write_text("".join(json.dumps({"prompt": p, "id": f"q{k}", "max_tokens": 24}) + "\n"
                             for k, p in enumerate(PROMPTS)))
    models = {"alpha": LM(tiny_gpt(tokenizer.vocab_size, seed=1), tokenizer),
              "beta": LM(tiny_gpt(tokenizer.vocab_size, seed=2), tokenizer)}
    with LiveServer(create_app(models, arena_db=tmp / "arena.db", study=study)) as server:
        server.db = tmp / "arena.db"
        yield server


def open_page(browser, url: str, errors: list[str]):
    context = browser.new_context(viewport={"width": WIDTH, "height": HEIGHT})
    page = context.new_page()
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.goto(url)
    return page


def check_screenshot(page, path) -> None:
    """The two answers side by side, each under its coloured header, text inside."""
    a, b = page.locator("#side-a").bounding_box(), page.locator("#side-b").bounding_box()
    assert a["x"] + a["width"] <= b["x"] and abs(a["y"] - b["y"]) < 2 and min(a["height"], b["height"]) > 100
    page.screenshot(path=str(path))
    image = Image.open(io.BytesIO(path.read_bytes())).convert("RGB")
    assert image.size == (WIDTH, HEIGHT)
    colours = image.getcolors(maxcolors=1 << 20)
    assert colours is not None and len(colours) > 50  # text, buttons, headers: not a blank page

    def pixels(rgb) -> int:
        return sum(n for n, c in colours if all(abs(x - y) < 8 for x, y in zip(c, rgb)))

    assert pixels((0x2D, 0x5B, 0xD7)) > 2000 and pixels((0xC2, 0x57, 0x1A)) > 2000  # header A blue, header B orange
    left = image.crop((int(a["x"]) + 5, int(a["y"]) + 40, int(a["x"] + a["width"]) - 5, int(a["y"] + a["height"]) - 5))
    assert len(left.getcolors(maxcolors=1 << 16) or []) > 2  # the left answer's text was drawn


def test_two_raters_rate_a_study_at_once(browser, arena, tmp_path):
    errors: list[str] = []
    pages = {rater: open_page(browser, arena.url + "/arena", errors) for rater in KEYS}
    for rater, page in pages.items():
        expect(page.locator("#arena-mode")).to_contain_text("study of 3 items, 2 models")
        page.locator("#rater").fill(rater)
        page.locator("#rater").press("Enter")  # starts; the first battle streams at once
    shown: dict[str, list[dict]] = {rater: [] for rater in KEYS}
    for step in range(3):
        for page in pages.values():  # both raters' answers stream at the same time
            expect(page.locator("button.vote").first).to_be_enabled(timeout=30_000)
            expect(page.locator("#status")).to_have_text("Which answer is better?")
        if step == 0:
            check_screenshot(pages["alice"], tmp_path / "arena.png")
        for rater, page in pages.items():
            seen = {"prompt": page.locator("#shown-prompt").text_content(),
                    "a": page.locator("#answer-a").text_content(), "b": page.locator("#answer-b").text_content()}
            key = KEYS[rater][step]
            if key is None:
                page.locator("#reason").fill("B sounds more like Shakespeare")
                page.locator("button.vote[data-choice=b]").click()
                seen["choice"] = "b"
            else:
                page.locator("#shown-prompt").click()  # out of any text field
                page.keyboard.press(key)
                seen["choice"] = CHOICE_OF_KEY[key]
            result = page.locator("#result")
            expect(result).to_be_visible()
            expect(result).to_contain_text("A was ")
            seen["result"] = result.text_content()
            expect(page.locator("#progress")).to_have_text(f"{step + 1} of 3 rated")
            shown[rater].append(seen)
        for page in pages.values():
            if step < 2:
                page.keyboard.press("n")
    for page in pages.values():
        expect(page.locator("#status")).to_contain_text("You have rated all 3 items of this study")
        expect(page.locator("#next")).to_be_hidden()

    votes = read_votes(arena.db)
    digest = arena.app.state.arena.study.digest
    for ordinal, rater in enumerate(KEYS):  # alice started first: ordinal 0
        mine = [v for v in votes if v["rater"] == rater]
        assert [v["prompt"] for v in mine] == [PROMPTS[p] for p in rater_order(3, ordinal, digest)]
        for v, seen in zip(mine, shown[rater]):
            assert (v["prompt"], v["answer_a"], v["answer_b"], v["choice"]) == \
                (seen["prompt"], seen["a"], seen["b"], seen["choice"])
            assert f"A was {v['model_a']}, B was {v['model_b']}." in seen["result"]
            assert {v["model_a"], v["model_b"]} == {"alpha", "beta"} and seen["a"] and seen["b"]
    assert [v["reason"] for v in votes if v["rater"] == "bob"][0] == "B sounds more like Shakespeare"
    assert not errors, errors


def test_the_playground_lists_the_models_and_links_the_arena(browser, arena):
    errors: list[str] = []
    page = open_page(browser, arena.url + "/", errors)
    select = page.locator("#model-select")
    expect(select).to_be_visible()
    expect(select.locator("option")).to_have_count(2)
    select.select_option("beta")
    expect(page.locator("#model-name")).to_contain_text("model: beta")
    expect(page.locator("#arena-link")).to_be_visible()
    page.locator("#arena-link").click()
    expect(page.locator("h1")).to_have_text("lmforge arena")
    assert not errors, errors
