"""The Gradio chat UI, on the same ChatService as the CLI and the API.

``build_ui(get_pool)`` takes a function rather than a service because, mounted on the API,
the UI exists before the model has finished loading. The pool holds the base model's service
and, when ADAPTERS_DIR has LoRA adapters, one per adapter (a dropdown picks one).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import gradio as gr

from src.chat.adapter_pool import AdapterPool
from src.chat.service import ChatService
from src.config import Settings
from src.errors import MiniClaudeError
from src.params import MAX_NEW_TOKENS, GenerationParams, make_params
from src.web.ui_history import history_to_conversation, history_to_messages, messages_to_history
from src.web.ui_tokens import TOP_ALTERNATIVES, tokens_html

PoolGetter = Callable[[], AdapterPool | None]
History = list[dict[str, Any]]
BASE_MODEL_CHOICE = "(base model)"


def _service_or_error(get_pool: PoolGetter, adapter: str | None) -> ChatService:
    pool = get_pool()
    if pool is None:
        raise gr.Error("The model is still loading. Try again in a few seconds.")
    try:
        return pool.get(None if adapter in (None, "", BASE_MODEL_CHOICE) else adapter)
    except MiniClaudeError as exc:
        raise gr.Error(str(exc)) from None


def stream_reply(
    get_pool: PoolGetter,
    adapter: str | None,
    message: str,
    history: History,
    system_prompt: str,
    temperature: float,
    top_p: float,
    max_new_tokens: float,
    repetition_penalty: float,
    json_mode: bool = False,
    show_tokens: bool = False,
) -> Iterator[tuple[History, str, str, str]]:
    """Yield (chat history, textbox value, status line, token view) as the reply grows."""
    service = _service_or_error(get_pool, adapter)
    conversation = history_to_conversation(history, system_prompt)
    try:
        params = make_params(
            {
                **service.default_params.model_dump(),
                "temperature": temperature,
                "do_sample": temperature > 0,
                "top_p": top_p,
                "max_new_tokens": int(max_new_tokens),
                "repetition_penalty": repetition_penalty,
                "response_format": {"type": "json_object"} if json_mode else None,
                "logprobs": bool(show_tokens),
                "top_logprobs": TOP_ALTERNATIVES if show_tokens else 0,
            }
        )
        stream = service.start_reply(conversation, message, params)
    except MiniClaudeError as exc:
        raise gr.Error(str(exc)) from None
    shown = messages_to_history(conversation.messages) + [
        {"role": "user", "content": message},
        {"role": "assistant", "content": ""},
    ]
    iterator = iter(stream)
    try:
        for delta in iterator:
            shown[-1]["content"] += delta
            yield shown, "", "_writing…_", ""
    except MiniClaudeError as exc:  # e.g. a remote backend that failed mid-reply
        raise gr.Error(str(exc)) from None
    finally:
        if stream.result is None:  # the Stop button (or a closed tab) ended us early
            stream.abandon()
            iterator.close()
    result = stream.result
    status = f"**{service.model_name}** · {result.completion_tokens} tokens · "
    status += f"{result.tokens_per_second:.1f} tokens/s"
    if result.dropped_messages:
        status += f" · {result.dropped_messages} oldest messages left out of the context"
    yield shown, "", status, tokens_html(result.logprobs or [])


def last_user_message(history: History) -> tuple[History, str]:
    """History without its last exchange, and that exchange's user message."""
    messages = history_to_messages(history)
    if not messages:
        raise gr.Error("There is no message to answer again.")
    return messages_to_history(messages[:-2]), messages[-2]["content"]


# Gradio's queue polls for work every 1 ms when idle (10 ms for progress updates): a
# thousand wake-ups a second, about 3% of a core on an idle server. Under load they preempt
# the threads of the model's matrix multiplications, which then wait for each other. Polling
# every 50 ms (Gradio's own interval on Windows) delays a click by at most that.
QUEUE_POLL_SECONDS = 0.05
PROGRESS_POLL_SECONDS = 0.1


def build_chat_page(get_pool: PoolGetter, settings: Settings) -> gr.Blocks:
    """The chat page with its event queue, as every entry point serves it (the API at /ui,
    ``src/web_app.py`` and the Spaces ``app.py``): sliders at the settings' generation
    defaults, at most MAX_BATCH_SIZE replies running at once."""
    page = build_ui(get_pool, settings.generation_defaults(), settings.max_length)
    return enable_queue(page, settings.max_batch_size)


def enable_queue(demo: gr.Blocks, concurrency: int) -> gr.Blocks:
    """Turn on the demo's event queue (needed for streaming) with up to ``concurrency``
    events running at once, polling at a calmer rate than Gradio's default."""
    demo.queue(default_concurrency_limit=concurrency)
    queue = getattr(demo, "_queue", None)  # private in Gradio 6; skip if it ever moves
    if queue is not None and hasattr(queue, "sleep_when_free"):
        queue.sleep_when_free = QUEUE_POLL_SECONDS
        queue.progress_update_sleep_when_free = PROGRESS_POLL_SECONDS
    return demo


def build_ui(
    get_pool: PoolGetter,
    defaults: GenerationParams | None = None,
    max_reply_tokens: int = MAX_NEW_TOKENS,
) -> gr.Blocks:
    """The chat page; sliders start at ``defaults`` (the settings' generation defaults), and
    the reply length goes up to ``max_reply_tokens`` (MAX_LENGTH)."""
    defaults = defaults or GenerationParams()
    with gr.Blocks(title="Mini-Claude") as demo:
        gr.Markdown(
            "# Mini-Claude\nA local chatbot: streaming replies from a model on your machine."
        )
        adapter = gr.Dropdown(
            [BASE_MODEL_CHOICE],
            value=BASE_MODEL_CHOICE,
            label="LoRA adapter",
            visible=False,
            elem_id="adapter",
        )
        chatbot = gr.Chatbot(label="Conversation", height=460, elem_id="chatbot")
        with gr.Row():
            textbox = gr.Textbox(
                placeholder="Type a message and press Enter",
                show_label=False,
                scale=8,
                elem_id="message",
                autofocus=True,
            )
            send = gr.Button("Send", variant="primary", scale=1, elem_id="send")
            stop = gr.Button("Stop", scale=1, elem_id="stop")
        with gr.Row():
            regenerate = gr.Button("Regenerate", size="sm", elem_id="regenerate")
            undo = gr.Button("Undo", size="sm", elem_id="undo")
            clear = gr.Button("Clear", size="sm", elem_id="clear")
        status = gr.Markdown("", elem_id="status")
        token_view = gr.HTML("", elem_id="tokens")
        with gr.Accordion("Settings", open=False, elem_id="settings"):
            system_prompt = gr.Textbox(label="System prompt", lines=2, elem_id="system-prompt")
            temperature = gr.Slider(
                0.0,
                2.0,
                value=defaults.temperature if defaults.do_sample else 0.0,
                step=0.05,
                label="Temperature (0 = greedy)",
            )
            top_p = gr.Slider(0.05, 1.0, value=defaults.top_p, step=0.05, label="Top-p")
            max_new_tokens = gr.Slider(
                1, max_reply_tokens, value=defaults.max_new_tokens, step=1, label="Max new tokens"
            )
            repetition_penalty = gr.Slider(
                1.0, 2.0, value=defaults.repetition_penalty, step=0.05, label="Repetition penalty"
            )
            json_mode = gr.Checkbox(
                False, label="JSON mode: every reply is a JSON object", elem_id="json-mode"
            )
            show_tokens = gr.Checkbox(
                False,
                label="Show token probabilities (a learner's view of sampling)",
                elem_id="show-tokens",
            )
        settings = [
            system_prompt,
            temperature,
            top_p,
            max_new_tokens,
            repetition_penalty,
            json_mode,
            show_tokens,
        ]

        def respond(adapter_name, message, history, *values):
            yield from stream_reply(get_pool, adapter_name, message, history, *values)

        def again(adapter_name, history, *values):
            earlier, message = last_user_message(history)
            yield from stream_reply(get_pool, adapter_name, message, earlier, *values)

        outputs = [chatbot, textbox, status, token_view]
        submit_args = {
            "fn": respond,
            "inputs": [adapter, textbox, chatbot, *settings],
            "outputs": outputs,
        }
        events = [
            textbox.submit(**submit_args),
            send.click(**submit_args),
            regenerate.click(again, [adapter, chatbot, *settings], outputs),
        ]
        stop.click(None, cancels=events)
        undo.click(lambda history: last_user_message(history)[0], chatbot, chatbot)
        clear.click(lambda: ([], "", "", ""), None, outputs)

        def on_page_load():
            pool = get_pool()
            if pool is None:
                return "_model loading…_", gr.Dropdown(visible=False)
            names = pool.names()  # read on each page load: new adapters show up on refresh
            choices = [BASE_MODEL_CHOICE, *names]
            return f"**{pool.base.model_name}**", gr.Dropdown(choices=choices, visible=bool(names))

        demo.load(on_page_load, None, [status, adapter])
    return demo
