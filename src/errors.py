"""The project's own exceptions.

The core raises these; front ends translate them (the API into status codes, the CLI into a
message, the web UI into ``gr.Error``). Each message names the bad value and what to do.
"""


class MiniClaudeError(Exception):
    """Base class: anything the user can act on.

    ``field`` names the offending field, setting or parameter when there is one (``message``,
    ``temperature``, ``MAX_LENGTH``), as data: front ends point at it without parsing the
    message."""

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


class ConfigError(MiniClaudeError):
    """A setting (environment variable or .env entry) has an invalid value."""


class ModelLoadingError(MiniClaudeError):
    """A model could not be found, downloaded, converted or loaded."""


class RemoteBackendError(MiniClaudeError):
    """BACKEND=remote: the generation server could not be reached, refused the request, or
    answered in a format that is not OpenAI's. The message names the URL and the problem."""


class InvalidRequestError(MiniClaudeError):
    """A chat request or generation parameter is invalid (empty message, bad value, ...)."""


class ServerShuttingDownError(MiniClaudeError):
    """The server is shutting down: a reply still running when the grace period ended was
    stopped, and nothing of it was saved."""


class SessionBusyError(MiniClaudeError):
    """A reply to this session is already being generated: one at a time per session, so no
    exchange is generated without seeing the one before it (the API answers 409)."""


class ServerBusyError(MiniClaudeError):
    """Too many requests are already waiting for the model (MAX_QUEUED_REQUESTS): the API
    answers 503 with Retry-After, and the client may try again shortly."""


class EngineClosedError(ServerShuttingDownError):
    """The decode engine was closed (the server is shutting down) before a reply ended."""


class SessionNotFoundError(InvalidRequestError):
    """No stored session has this id (the API answers 404)."""


class ContextOverflowError(InvalidRequestError):
    """The prompt cannot fit the context window even after dropping all earlier turns."""


class ConversationFileError(MiniClaudeError):
    """A saved conversation file is missing, unreadable or malformed."""


class DatasetError(MiniClaudeError):
    """A training dataset is missing or has a malformed record (file, line and field named)."""


class TrainingConfigError(MiniClaudeError):
    """A training configuration file or override is invalid."""


class StorageError(MiniClaudeError):
    """Saving to disk failed (a full disk, a read-only or damaged file). The message names the
    file; what was saved before is left as it was."""


class CheckpointError(StorageError):
    """A training checkpoint could not be written (the previous checkpoints are intact)."""
