"""The Gradio chat UI, on the same ChatService and session store as the CLI and the API.

``build_ui(get_pool)`` takes a function rather than a service because, mounted on the API,
the UI exists before the model has finished loading. The pool holds the base model's service
and, when ADAPTERS_DIR has LoRA adapters, one per adapter (a dropdown picks one).

Conversations live in the store (a reload or a restart loses nothing): the sidebar lists them
(``ui_conversations.py``); replies stream into the open one (``ui_replies.py``); each reply
can be rated, edited, or compared with another candidate (``ui_feedback.py``).
"""

from __future__ import annotations

import gradio as gr
from pydantic import SecretStr

from src.config import Settings
from src.params import MAX_NEW_TOKENS, GenerationParams
from src.web import ui_conversations as conversations
from src.web import ui_feedback as feedback
from src.web.ui_context import BASE_MODEL_CHOICE, Controls, PoolGetter, store_or_error
from src.web.ui_replies import stream_candidate, stream_reply

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
    page = build_ui(get_pool, settings.generation_defaults(), settings.max_length, settings.api_key)
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
    api_key: SecretStr | None = None,
) -> gr.Blocks:
    """The chat page; sliders start at ``defaults`` (the settings' generation defaults), and
    the reply length goes up to ``max_reply_tokens`` (MAX_LENGTH). ``api_key`` decides who
    sees the whole list of conversations (see ``ui_conversations``)."""
    defaults = defaults or GenerationParams()
    with gr.Blocks(title="Mini-Claude") as demo:
        session_id = gr.State(None)  # the open conversation's (None: a new one)
        candidate_id = gr.State(None)  # the candidate shown beside the last reply
        mine = gr.BrowserState([], storage_key="mini-claude-conversations")

        with gr.Sidebar(label="Conversations", elem_id="sidebar"):
            new = gr.Button("New conversation", variant="primary", elem_id="new-conversation")
            listed = gr.Radio([], label="Conversations", elem_id="conversations")
            title = gr.Textbox(label="Title", elem_id="title", max_lines=1)
            with gr.Row():
                rename = gr.Button("Rename", size="sm", elem_id="rename")
                delete = gr.Button("Delete", size="sm", variant="stop", elem_id="delete")

        gr.Markdown(
            "# Mini-Claude\nA local chatbot: streaming replies from a model on your machine. "
            "Rate a reply with the thumbs under it, edit it with the pencil, or ask for another "
            "reply and keep the better one: your judgements are saved for preference tuning."
        )
        adapter = gr.Dropdown(
            [BASE_MODEL_CHOICE],
            value=BASE_MODEL_CHOICE,
            label="LoRA adapter",
            visible=False,
            elem_id="adapter",
        )
        chatbot = gr.Chatbot(
            label="Conversation",
            height=460,
            elem_id="chatbot",
            editable="all",
            feedback_options=["Like", "Dislike"],
            buttons=["copy", "copy_all"],
        )
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
            regenerate = gr.Button("Another reply", size="sm", elem_id="regenerate")
            undo = gr.Button("Undo", size="sm", elem_id="undo")
        comment = gr.Textbox(
            label="Comment (optional): saved with your next rating, edit or choice",
            max_lines=3,
            elem_id="feedback-comment",
        )
        with gr.Group(visible=False, elem_id="candidate-panel") as candidate_panel:
            gr.Markdown("**Another reply** to your last message:")
            candidate = gr.Markdown(elem_id="candidate")
            with gr.Row():
                keep_candidate = gr.Button("Keep this one", size="sm", elem_id="keep-candidate")
                keep_shown = gr.Button("Keep the first", size="sm", elem_id="keep-shown")
        status = gr.Markdown("", elem_id="status")
        token_view = gr.HTML("", elem_id="tokens")
        with gr.Accordion("Settings", open=False, elem_id="settings"):
            system_prompt = gr.Textbox(
                label="System prompt (for new conversations)", lines=2, elem_id="system-prompt"
            )
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
        controls = [
            system_prompt,
            temperature,
            top_p,
            max_new_tokens,
            repetition_penalty,
            json_mode,
            show_tokens,
        ]

        def listing(mine_ids, current, request: gr.Request):
            store = store_or_error(get_pool)
            return conversations.conversation_list(store, request, api_key, mine_ids, current)

        # ---- replies -------------------------------------------------------------------------

        def respond(adapter_name, message, history, current, mine_ids, *values):
            opened = current
            for shown, box, line, tokens, opened in stream_reply(
                get_pool, adapter_name, current, message, history, Controls(*values)
            ):
                yield shown, box, line, tokens, opened, gr.skip()
            yield (
                gr.skip(),
                gr.skip(),
                gr.skip(),
                gr.skip(),
                opened,
                (conversations.remembered(mine_ids, opened)),
            )

        def locked_system_prompt(current):
            """A conversation keeps the system prompt it started with."""
            store = store_or_error(get_pool)
            conversation = store.get(current) if current else None
            if conversation is None:
                return gr.Textbox(interactive=True)
            return gr.Textbox(value=conversation.system_prompt or "", interactive=False)

        reply_outputs = [chatbot, textbox, status, token_view, session_id, mine]
        submit = {
            "fn": respond,
            "inputs": [adapter, textbox, chatbot, session_id, mine, *controls],
            "outputs": reply_outputs,
        }
        replies = [textbox.submit(**submit), send.click(**submit)]

        def no_candidate():
            """A candidate answers the last message: a new exchange leaves it behind."""
            return gr.Group(visible=False), None

        for event in replies:
            event.then(listing, [mine, session_id], listed).then(
                locked_system_prompt, session_id, system_prompt
            ).then(no_candidate, None, [candidate_panel, candidate_id])

        def another(adapter_name, current, *values):
            for text, made, line in stream_candidate(
                get_pool, adapter_name, current, Controls(*values)
            ):
                yield text, made, gr.Group(visible=True), line

        candidate_outputs = [candidate, candidate_id, candidate_panel, status]
        replies.append(
            regenerate.click(another, [adapter, session_id, *controls], candidate_outputs)
        )
        stop.click(None, cancels=replies)

        # ---- feedback ------------------------------------------------------------------------

        def rate(current, text, data: gr.LikeData):
            return feedback.rate(get_pool, current, text, data)

        def edit(current, text, data: gr.EditData):
            return feedback.edit(get_pool, current, text, data)

        chatbot.like(rate, [session_id, comment], [status, comment])
        chatbot.edit(edit, [session_id, comment], [chatbot, status, comment])
        choice_outputs = [chatbot, candidate_panel, candidate_id, status, comment]
        keep_candidate.click(
            lambda current, made, text: feedback.choose(get_pool, current, made, text, True),
            [session_id, candidate_id, comment],
            choice_outputs,
        )
        keep_shown.click(
            lambda current, made, text: feedback.choose(get_pool, current, made, text, False),
            [session_id, candidate_id, comment],
            choice_outputs,
        )

        # ---- conversations -------------------------------------------------------------------

        fresh = [session_id, chatbot, status, token_view, title, candidate_panel]

        def start_new():
            return None, [], "", "", "", gr.Group(visible=False)

        def open_one(chosen):
            history, prompt, name = conversations.opened(store_or_error(get_pool), chosen)
            locked = gr.Textbox(value=prompt or "", interactive=False)
            return chosen, history, "", "", name, gr.Group(visible=False), locked

        def rename_one(current, name, mine_ids, request: gr.Request):
            if not current:
                raise gr.Error("Send a message first: a new conversation has nothing to rename.")
            if not name.strip():
                raise gr.Error("A title must not be empty.")
            store = store_or_error(get_pool)
            store.rename(current, name.strip()[:200])
            return conversations.conversation_list(store, request, api_key, mine_ids, current)

        def delete_one(current, mine_ids, request: gr.Request):
            if not current:
                raise gr.Error("Nothing to delete: this conversation was never saved.")
            store = store_or_error(get_pool)
            store.delete(current)
            kept = [sid for sid in mine_ids or [] if sid != current]
            listing_now = conversations.conversation_list(store, request, api_key, kept, None)
            return (*start_new(), listing_now, kept, gr.Textbox(value="", interactive=True))

        def undo_one(current):
            history = conversations.undo_last_exchange(store_or_error(get_pool), current)
            return history, None if not history else current

        def new_one():
            return (*start_new(), gr.Textbox(value="", interactive=True), gr.Radio(value=None))

        new.click(new_one, None, [*fresh, system_prompt, listed])
        chatbot.clear(new_one, None, [*fresh, system_prompt, listed])  # its own trash button
        listed.input(open_one, listed, [*fresh, system_prompt])
        rename.click(rename_one, [session_id, title, mine], listed)
        delete.click(delete_one, [session_id, mine], [*fresh, listed, mine, system_prompt])
        undo.click(undo_one, session_id, [chatbot, session_id]).then(
            listing, [mine, session_id], listed
        ).then(no_candidate, None, [candidate_panel, candidate_id])

        def on_page_load(mine_ids, request: gr.Request):
            pool = get_pool()
            if pool is None:
                return "_model loading…_", gr.Dropdown(visible=False), gr.skip()
            names = pool.names()  # read on each page load: new adapters show up on refresh
            choices = [BASE_MODEL_CHOICE, *names]
            store = pool.base.store
            listing_now = (
                conversations.conversation_list(store, request, api_key, mine_ids, None)
                if store is not None
                else gr.skip()
            )
            status_line = f"**{pool.base.model_name}**"
            return status_line, gr.Dropdown(choices=choices, visible=bool(names)), listing_now

        demo.load(on_page_load, mine, [status, adapter, listed])
    return demo
