"""The CLI as users run it: a real process, the real bundled SmolLM2, a real terminal."""

import signal
import sys
import time
from pathlib import Path

import pexpect
import pytest

from src.config import REPO_ROOT
from tests.integration.conftest import clean_env, run_python

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]


def test_piped_greedy_answers_paris_via_the_offline_fallback(converted_bundled_model):
    # Default MODEL_NAME (DialoGPT-medium) cannot be had offline: one notice, then the bundled
    # model answers.
    result = run_python(
        ["src/mvp_chatbot.py"],
        stdin="What is the capital of France?\n",
        DO_SAMPLE="false",
        MAX_NEW_TOKENS="32",
    )
    assert result.returncode == 0, result.stderr
    assert "Paris" in result.stdout
    assert result.stderr.count("Falling back to the bundled offline model") == 1
    assert "microsoft/DialoGPT-medium" in result.stderr


def test_verbose_reports_the_context_window_and_its_kv_cache(converted_bundled_model):
    """The window is the bundled model's own 8,192 positions (MAX_LENGTH limits a reply), and
    --verbose says how much memory a conversation filling it takes."""
    result = run_python(
        ["src/mvp_chatbot.py", "--model", "smollm2-135m-instruct", "--verbose"],
        stdin="Hi\n",
        DO_SAMPLE="false",
        MAX_NEW_TOKENS="4",
        MAX_BATCH_SIZE="1",  # one full window fits any machine's memory
    )
    assert result.returncode == 0, result.stderr
    assert "context window 8192 tokens (a full one holds 180 MB of keys and values)" in (
        result.stderr
    )


def test_piped_multi_turn_and_commands(converted_bundled_model, tmp_path):
    saved = tmp_path / "chat.json"
    script = f"/set max_new_tokens 12\nHello!\nHow are you?\n/save {saved}\n/quit\nnever sent\n"
    result = run_python(
        ["src/mvp_chatbot.py", "--model", "smollm2-135m-instruct"], stdin=script, DO_SAMPLE="false"
    )
    assert result.returncode == 0, result.stderr
    import json

    messages = json.loads(saved.read_text())["messages"]
    assert [m["content"] for m in messages if m["role"] == "user"] == ["Hello!", "How are you?"]
    assert "never sent" not in saved.read_text()


def test_fallback_none_stops_with_model_loading_error():
    result = run_python(["src/mvp_chatbot.py"], stdin="Hi\n", MODEL_FALLBACK="none")
    assert result.returncode == 2
    assert "Error: Could not get model 'microsoft/DialoGPT-medium'" in result.stderr
    assert "MODEL_FALLBACK=none" in result.stderr
    assert result.stdout == ""


def test_invalid_setting_stops_start_up_with_a_clear_message():
    result = run_python(["src/mvp_chatbot.py"], stdin="Hi\n", MAX_LENGTH="99999")
    assert result.returncode == 2
    assert "Invalid setting: MAX_LENGTH='99999'" in result.stderr
    assert "less than or equal to 1024" in result.stderr


def test_two_turns_keep_the_first_turn_in_the_prompt(bundled_service):
    from src.params import GenerationParams

    params = GenerationParams(do_sample=False, max_new_tokens=16)
    conversation = bundled_service.new_conversation()
    first = bundled_service.reply(conversation, "My name is Ada.", params)
    stream = bundled_service.start_reply(conversation, "What is my name?", params)
    prompt = bundled_service.backend.tokenizer.decode(stream.prompt.input_ids)
    assert "<|im_start|>user\nMy name is Ada.<|im_end|>" in prompt
    assert f"<|im_start|>assistant\n{first.text}<|im_end|>" in prompt
    assert prompt.endswith("<|im_start|>user\nWhat is my name?<|im_end|>\n<|im_start|>assistant\n")


def test_real_model_streams_a_multibyte_reply_cleanly(bundled_service):
    from src.params import GenerationParams

    params = GenerationParams(do_sample=False, max_new_tokens=24)
    stream = bundled_service.start_reply(
        bundled_service.new_conversation(), "Reply with three flower emoji.", params
    )
    deltas = list(stream)
    assert "".join(deltas) == stream.result.text
    assert all("\ufffd" not in delta for delta in deltas)


def wait_until_reading_the_terminal(pid: int, timeout: float = 10) -> None:
    """Until the process sleeps in select/poll on the terminal, as it does at readline's
    prompt: a Ctrl-C sent then is one "at the input prompt", not one during start-up."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        if state == "S" and "poll" in Path(f"/proc/{pid}/wchan").read_text():
            return
        time.sleep(0.01)
    raise AssertionError(f"the CLI (pid {pid}) is not waiting for input after {timeout} s")


@pytest.mark.skipif(sys.platform == "win32", reason="needs a POSIX terminal")
def test_interactive_ctrl_c_stops_the_reply_and_keeps_the_session(converted_bundled_model):
    child = pexpect.spawn(
        sys.executable,
        ["src/mvp_chatbot.py", "--model", "smollm2-135m-instruct"],
        cwd=str(REPO_ROOT),
        env=clean_env(DO_SAMPLE="false", MAX_NEW_TOKENS="400", MAX_LENGTH="1024"),
        encoding="utf-8",
        timeout=120,
    )
    try:
        child.expect("Type /help")
        child.expect("> ")
        child.sendline("Write a very long story about a dragon and a knight.")
        child.expect_exact("knight.\r\n")  # the terminal's echo of what we typed
        child.expect(r"\w+ \w+ \w+")  # the reply has started streaming
        child.kill(signal.SIGINT)  # what Ctrl-C sends
        child.expect(r"\(stopped; the partial reply is kept")
        child.expect("> ")  # the session goes on
        child.sendline("/undo")
        child.expect("removed the last exchange")
        child.sendeof()  # Ctrl-D leaves cleanly
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0


def test_interactive_ctrl_c_while_the_prompt_is_built_keeps_the_session(converted_bundled_model):
    child = pexpect.spawn(
        sys.executable,
        ["src/mvp_chatbot.py", "--model", "smollm2-135m-instruct"],
        cwd=str(REPO_ROOT),
        env=clean_env(DO_SAMPLE="false"),
        encoding="utf-8",
        timeout=120,
    )
    try:
        child.expect("> ")
        wait_until_reading_the_terminal(child.pid)
        # At the input prompt. In about half of full-suite runs (never alone) the first SIGINT
        # left the CLI asleep in readline's select until the next keystroke; a person presses
        # Ctrl-C again, and so does this test, at most twice more.
        for _ in range(3):
            child.kill(signal.SIGINT)
            if child.expect_exact(["(Ctrl-D or /quit to leave)", pexpect.TIMEOUT], timeout=5) == 0:
                break
        else:
            raise AssertionError(f"Ctrl-C at the prompt showed no hint: {child.before!r}")
        child.sendline("/quit")
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0


def test_undecodable_input_bytes_do_not_crash_the_cli(converted_bundled_model):
    import subprocess

    result = subprocess.run(
        [sys.executable, "src/mvp_chatbot.py", "--model", "smollm2-135m-instruct"],
        input=b"\xff\xfe broken bytes\nWhat is the capital of France?\n",
        capture_output=True,
        cwd=REPO_ROOT,
        timeout=150,
        env=clean_env(DO_SAMPLE="false", MAX_NEW_TOKENS="24", LC_ALL="C.UTF-8"),
    )
    assert result.returncode == 0, result.stderr.decode()
    assert "Paris" in result.stdout.decode()
    assert b"Traceback" not in result.stderr


def test_json_replies_from_a_schema_file_and_from_set_json(converted_bundled_model, tmp_path):
    import json

    import jsonschema

    schema = {
        "type": "object",
        "properties": {
            "animal": {"type": "string", "maxLength": 20},
            "legs": {"type": "integer", "minimum": 0, "maximum": 100},
        },
        "required": ["animal", "legs"],
        "additionalProperties": False,
    }
    schema_file = tmp_path / "animal.json"
    schema_file.write_text(json.dumps(schema))
    script = "Describe a cat.\n/set json off\n/set max_new_tokens 6\nHello!\n/quit\n"
    result = run_python(
        [
            "src/mvp_chatbot.py",
            "--model",
            "smollm2-135m-instruct",
            "--json-schema",
            str(schema_file),
        ],
        stdin=script,
        DO_SAMPLE="false",
        MAX_NEW_TOKENS="80",
    )
    assert result.returncode == 0, result.stderr
    first_reply = result.stdout.strip().splitlines()[0]
    jsonschema.validate(json.loads(first_reply), schema)
    assert "(replies are free text)" in result.stderr  # what commands say goes to stderr
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    failed = run_python(["src/mvp_chatbot.py", "--json-schema", str(broken)], stdin="")
    assert failed.returncode == 2 and f"--json-schema {broken}: not valid JSON" in failed.stderr
