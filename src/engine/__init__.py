"""The one decode loop of the project (``BatchingEngine``): token ids in, token ids out.

It knows nothing of tokenizers, prompts or chat: the chat layer above turns text into ids and
ids back into text. Below it are the models (``src/models``)."""
