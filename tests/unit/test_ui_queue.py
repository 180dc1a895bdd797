"""The UI's event queue polls at a calm rate (Gradio's default, 1 ms, keeps an idle server
busy and slows the model's threads under load)."""

import pytest

from src.web.ui import PROGRESS_POLL_SECONDS, QUEUE_POLL_SECONDS, build_ui, enable_queue

pytestmark = pytest.mark.unit


def test_enable_queue_sets_the_poll_intervals_on_gradios_queue():
    demo = enable_queue(build_ui(lambda: None), concurrency=3)
    # If a Gradio upgrade moves these attributes, enable_queue silently does nothing: this
    # test is what notices.
    assert demo._queue.sleep_when_free == QUEUE_POLL_SECONDS
    assert demo._queue.progress_update_sleep_when_free == PROGRESS_POLL_SECONDS
    assert demo._queue.default_concurrency_limit == 3
