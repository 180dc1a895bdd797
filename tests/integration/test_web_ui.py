"""The Gradio UI in a real browser: headless Chromium (Debian's chromium + chromium-driver,
installed by `make test`) drives the page served by the API at /ui on 127.0.0.1."""

import os
import shutil
import time
from pathlib import Path

import pytest

from src.config import REPO_ROOT
from src.models.bundled import BUNDLED_MODEL_NAME
from src.web.api import create_app
from tests.conftest import bundled_settings
from tests.live_server import LiveServer

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

CHROMEDRIVER = shutil.which("chromedriver")
README_SCREENSHOT = REPO_ROOT / "docs" / "images" / "web_ui.png"


@pytest.fixture(scope="module")
def browser(server):
    # Depends on the server so that it quits first: a page left open holds Gradio's streams,
    # and the server would wait for them when it stops.
    if CHROMEDRIVER is None:
        pytest.skip("chromedriver not installed (make test installs chromium-driver)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    for argument in (
        "--headless=new",
        "--no-sandbox",
        "--disable-dev-shm-usage",
        "--window-size=1200,1050",
    ):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def server(tmp_path_factory, bundled_model_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    adapters_dir = tmp_path_factory.mktemp("adapters")
    lora = LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    base = AutoModelForCausalLM.from_pretrained(bundled_model_path)
    get_peft_model(base, lora).save_pretrained(adapters_dir / "demo-lora")
    settings = bundled_settings(
        data_dir=tmp_path_factory.mktemp("data"),
        adapters_dir=adapters_dir,
        do_sample=False,
        max_new_tokens=40,
    )
    with LiveServer(create_app(settings)) as live:
        yield live


def wait_for(condition, timeout: float = 60, interval: float = 0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError("timed out waiting for the page")


def bot_messages(driver) -> list[str]:
    return driver.execute_script(
        "return Array.from(document.querySelectorAll('#chatbot .bot.message'))"
        ".map(e => e.innerText.trim())"
    )


def as_shown(markdown: str) -> str:
    """A reply's text as the browser shows it: emphasis and code marks drawn rather than
    written, whitespace collapsed."""
    return " ".join(markdown.replace("*", "").replace("`", "").split())


def send(driver, text: str) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    box = wait_for(lambda: driver.find_elements(By.CSS_SELECTOR, "#message textarea"))[0]
    box.send_keys(text)
    box.send_keys(Keys.ENTER)


def click(driver, element_id: str) -> None:
    driver.execute_script(f"document.getElementById('{element_id}').click()")


def test_a_message_gets_a_streamed_reply(browser, server, tmp_path):
    browser.get(f"{server.url}/ui/")
    send(browser, "What is the capital of France?")
    # Sample the reply as it grows: streaming means several different partial texts.
    versions: list[str] = []
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        messages = bot_messages(browser)
        if messages and messages[-1] and (not versions or versions[-1] != messages[-1]):
            versions.append(messages[-1])
        status = browser.execute_script("return document.getElementById('status').innerText")
        if "tokens/s" in status:
            break
        time.sleep(0.02)
    assert "Paris" in versions[-1]
    assert len(versions) >= 2, f"the reply did not stream: {versions}"
    assert all(versions[-1].startswith(partial.rstrip()) for partial in versions)
    assert BUNDLED_MODEL_NAME in status and "tokens/s" in status
    target = README_SCREENSHOT if os.environ.get("UPDATE_DOCS_IMAGES") else tmp_path / "ui.png"
    target.parent.mkdir(parents=True, exist_ok=True)
    browser.save_screenshot(str(target))
    assert target.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def status_text(driver) -> str:
    return driver.execute_script("return document.getElementById('status').innerText")


def wait_for_status(driver, text: str) -> str:
    return wait_for(lambda: text in (line := status_text(driver)) and line)


def conversation_labels(driver) -> list[str]:
    return driver.execute_script(
        "return Array.from(document.querySelectorAll('#conversations label'))"
        ".map(e => e.innerText.trim())"
    )


def test_another_reply_undo_new_conversation_and_errors(browser, server):
    browser.get(f"{server.url}/ui/")
    send(browser, "Name a planet.")
    wait_for_status(browser, "tokens/s")
    first = bot_messages(browser)
    click(browser, "regenerate")  # another reply, beside the first: greedy would repeat it
    wait_for_status(browser, "Which reply is better?")
    assert "sampled at temperature" in status_text(browser)
    assert browser.execute_script("return document.getElementById('candidate').innerText")
    click(browser, "keep-shown")
    wait_for_status(browser, "the first reply is preferred")
    assert bot_messages(browser) == first
    click(browser, "undo")  # the only exchange: the conversation is gone
    wait_for(lambda: bot_messages(browser) == [])
    send(browser, "Name a planet.")
    wait_for(lambda: len(bot_messages(browser)) == 1)
    click(browser, "new-conversation")
    wait_for(lambda: bot_messages(browser) == [])
    send(browser, "   ")  # an empty message: a readable error, not a stack trace
    error = wait_for(
        lambda: "must not be empty" in browser.execute_script("return document.body.innerText")
    )
    assert error
    assert "Traceback" not in browser.execute_script("return document.body.innerText")


def test_replies_are_rated_edited_chosen_and_kept_across_a_reload(browser, server):
    import sqlite3

    from selenium.webdriver.common.by import By

    browser.get(f"{server.url}/ui/")
    send(browser, "Tell me a fact about the moon.")
    wait_for_status(browser, "tokens/s")
    original = bot_messages(browser)[-1]

    def chatbot_button(label: str):
        return wait_for(
            lambda: browser.find_elements(By.CSS_SELECTOR, f"#chatbot button[aria-label='{label}']")
        )[-1]

    comment = browser.find_element(By.CSS_SELECTOR, "#feedback-comment textarea")
    comment.send_keys("true but dull")
    chatbot_button("Dislike").click()
    wait_for_status(browser, "Saved: a bad reply. With your comment.")
    chatbot_button("Edit").click()
    editor = wait_for(lambda: browser.find_elements(By.CSS_SELECTOR, "#chatbot textarea"))[0]
    editor.clear()
    editor.send_keys("The Moon is **slowly** drifting away from the `Earth`.")
    chatbot_button("Submit").click()
    wait_for_status(browser, "your edit is the preferred reply")
    # Markdown is rendered: the reply reads as text, with bold and code elements.
    assert bot_messages(browser)[-1] == "The Moon is slowly drifting away from the Earth."
    assert browser.find_elements(By.CSS_SELECTOR, "#chatbot .bot strong, #chatbot strong")
    assert browser.find_elements(By.CSS_SELECTOR, "#chatbot code")

    send(browser, "Another one?")
    wait_for(lambda: len(bot_messages(browser)) == 2 and "tokens/s" in status_text(browser))
    click(browser, "regenerate")
    wait_for_status(browser, "Which reply is better?")
    candidate = browser.execute_script("return document.getElementById('candidate').innerText")
    click(browser, "keep-candidate")
    wait_for_status(browser, "the new reply is preferred")
    assert bot_messages(browser)[-1] == candidate.strip()

    # A reload keeps the conversation: it is listed under its first message, and opens.
    browser.get(f"{server.url}/ui/")
    label = wait_for(
        lambda: [x for x in conversation_labels(browser) if x.startswith("Tell me a fact")]
    )[0]
    assert bot_messages(browser) == []
    browser.find_element(
        By.XPATH, f"//*[@id='conversations']//label[contains(., '{label[:20]}')]"
    ).click()
    wait_for(lambda: len(bot_messages(browser)) == 2)
    assert bot_messages(browser)[0] == "The Moon is slowly drifting away from the Earth."
    assert bot_messages(browser)[1] == candidate.strip()

    title = browser.find_element(By.CSS_SELECTOR, "#title textarea, #title input")
    title.clear()
    title.send_keys("Moon facts")
    click(browser, "rename")
    wait_for(lambda: any(x.startswith("Moon facts") for x in conversation_labels(browser)))
    chatbot_button("Like").click()  # the kept candidate, rated good
    wait_for_status(browser, "Saved: a good reply.")

    # The judgements are in the database, with the reply's context.
    with sqlite3.connect(server.app.state.settings.sessions_db) as db:
        rows = db.execute(
            "SELECT f.rating, f.comment, f.source, r.content, p.content, p.origin "
            "FROM feedback f JOIN replies r ON r.id = f.reply_id "
            "LEFT JOIN replies p ON p.id = f.preferred_id ORDER BY f.id"
        ).fetchall()
    # The store keeps replies exactly as generated, Markdown included; the browser draws
    # that Markdown and trims whitespace, so the generated replies are compared as shown.
    assert rows[0][:3] == ("bad", "true but dull", "ui") and rows[3][0] == "good"
    assert [row[2] for row in rows] == ["ui"] * 4
    assert as_shown(rows[0][3]) == as_shown(original) and rows[0][4:] == (None, None)
    edit = "The Moon is **slowly** drifting away from the `Earth`."  # stored as typed
    assert as_shown(rows[1][3]) == as_shown(original) and rows[1][4:] == (edit, "edit")
    assert as_shown(rows[2][4]) == as_shown(candidate) and rows[2][5] == "candidate"
    assert as_shown(rows[3][3]) == as_shown(candidate)

    click(browser, "delete")
    wait_for(lambda: not any(x.startswith("Moon facts") for x in conversation_labels(browser)))
    assert bot_messages(browser) == []


def test_json_mode_and_the_token_view(browser, server):
    import json

    browser.get(f"{server.url}/ui/")
    # Open the Settings accordion (its content is drawn when it opens), then tick both boxes.
    toggle = wait_for(lambda: browser.find_elements("css selector", "#settings > button"))
    toggle[0].click()
    for box in ("json-mode", "show-tokens"):
        wait_for(lambda box=box: browser.find_elements("css selector", f"#{box} input"))[0].click()
    send(browser, "Describe a dog.")
    try:
        wait_for(
            lambda: (
                "tokens/s"
                in browser.execute_script("return document.getElementById('status').innerText")
            )
        )
    except AssertionError:
        raise AssertionError(browser.execute_script("return document.body.innerText")) from None
    assert isinstance(json.loads(bot_messages(browser)[-1]), dict)
    tokens = browser.execute_script(
        "return Array.from(document.querySelectorAll('#tokens .token')).map(e => e.title)"
    )
    assert tokens and all("%" in title for title in tokens)  # probability and alternatives


def test_an_adapter_can_be_chosen_when_adapters_exist(browser, server):
    from selenium.webdriver.common.by import By

    browser.get(f"{server.url}/ui/")
    dropdown = wait_for(
        lambda: [
            e for e in browser.find_elements(By.CSS_SELECTOR, "#adapter input") if e.is_displayed()
        ]
    )[0]
    dropdown.click()
    option = wait_for(
        lambda: [
            e for e in browser.find_elements(By.CSS_SELECTOR, "li") if e.text.strip() == "demo-lora"
        ]
    )[0]
    option.click()
    send(browser, "Name a planet.")
    status = wait_for(
        lambda: (
            (text := browser.execute_script("return document.getElementById('status').innerText"))
            and "tokens/s" in text
            and text
        )
    )
    assert f"{BUNDLED_MODEL_NAME}+demo-lora" in status
    assert bot_messages(browser)[-1]


def test_readme_screenshot_exists():
    assert Path(README_SCREENSHOT).is_file(), "run `make docs-images` to create it"
