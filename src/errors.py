"""The project's own exceptions.

The core raises these; front ends translate them (the API into status codes, the CLI into a
message, the web UI into ``gr.Error``). Each message names the bad value and what to do.
"""


class MiniClaudeError(Exception):
    """Base class: anything the user can act on."""


class ConfigError(MiniClaudeError):
    """A setting (environment variable or .env entry) has an invalid value."""


class ModelLoadingError(MiniClaudeError):
    """A model could not be found, downloaded, converted or loaded."""


class RemoteBackendError(MiniClaudeError):
    """BACKEND=remote: the generation server could not be reached, refused the request, or
    answered in a format that is not OpenAI's. The message names the URL and the problem."""


class InvalidRequestError(MiniClaudeError):
    """A chat request or generation parameter is invalid (empty message, bad value, ...)."""


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
