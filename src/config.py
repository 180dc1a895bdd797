"""Settings from the environment and ``.env``: one place, validated at start-up.

Every variable of the product brief is here, plus the generation defaults. An invalid value
stops start-up with a ``ConfigError`` naming the variable, the value and what is allowed.
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from src.errors import ConfigError
from src.params import GenerationParams, make_params
from src.validation import describe_validation_error, first_field

REPO_ROOT = Path(__file__).resolve().parent.parent

# Generation defaults that may be set from the environment (e.g. TEMPERATURE=0.2). Unset ones
# keep GenerationParams' own defaults, so each default lives in exactly one place.
GENERATION_FIELDS = (
    "max_new_tokens",
    "temperature",
    "top_p",
    "top_k",
    "repetition_penalty",
    "do_sample",
    "seed",
)


# Settings that were renamed: set under the old name they would be silently ignored.
RENAMED_SETTINGS = {"MAX_NEW_TOKENS_LIMIT": "MAX_LENGTH"}


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_file=".env",
        env_file_encoding="utf-8",
        extra="ignore",
        case_sensitive=False,
        env_ignore_empty=True,  # `ADAPTER_PATH=` in .env means "not set", not Path(".")
    )

    # Model
    model_name: str = Field("microsoft/DialoGPT-medium", min_length=1)
    model_cache_dir: Path = Path("./models")
    model_fallback: Literal["bundled", "none"] = "bundled"
    # MAX_LENGTH: the most tokens one reply may have (max_new_tokens, OpenAI's max_tokens), in
    # the CLI, the UI and the API alike. The context window (prompt and reply) is the model's
    # own limit, bounded by memory (src/models/model_info.py).
    max_length: int = Field(512, ge=1, le=1024)
    adapter_path: Path | None = None
    adapters_dir: Path = Path("./outputs/adapters")  # adapters users may pick by name
    trust_remote_code: bool = False
    # Pickle weights (pytorch_model.bin, adapter_model.bin) can run code when loaded: refused,
    # and never downloaded, unless the operator opts in. Safetensors are always preferred.
    allow_pickle: bool = False
    # "hf": transformers' model; "scratch": our own src/models/transformer.py on the same
    # weights; "auto": scratch for the GPT-2 and Llama families (adapters too), else hf.
    engine: Literal["auto", "hf", "scratch"] = "auto"
    # Inference speed and memory (README "Performance" has the measurements behind these).
    # PRECISION: fp32 (exact) or bf16 (half the memory, faster here; perplexity within 0.1%).
    # QUANTIZE: weight-only none, int8 or int4 (src/models/quantize.py).
    # "auto": bf16 + int4 for the bundled model, whose weights come from a 4-bit (Q4_1) file,
    # so int4 stores them exactly; fp32 + none (exact) for every other model.
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    quantize: Literal["auto", "none", "int8", "int4"] = "auto"
    # INT4_KERNEL: "auto" multiplies int4 layers with our C kernels (AVX-512 BF16 or AVX2,
    # built once with gcc; src/models/int4_kernel.py) where this CPU and a compiler allow,
    # else PyTorch's; "pytorch" always uses PyTorch's. Same numbers up to rounding below
    # bf16's.
    int4_kernel: Literal["auto", "pytorch"] = "auto"
    # INT8_KERNEL: "auto" multiplies int8 layers (the output layer of int4 and int8 models
    # included) with our C kernel (src/models/int8_kernel.py) where PyTorch runs its AVX2 one
    # and a compiler allows, else PyTorch's; "pytorch" always uses PyTorch's. Same numbers up
    # to rounding below bf16's.
    int8_kernel: Literal["auto", "pytorch"] = "auto"
    # NORM_KERNEL: "auto" computes the RMSNorms of a bf16 model in C when decoding, one call
    # each or inside the call of our int4/int8 product after it (src/models/norm_kernel.py;
    # any CPU, a compiler once), "pytorch" in PyTorch's operations. The same steps in the
    # same precision.
    norm_kernel: Literal["auto", "pytorch"] = "auto"
    # ROPE_KERNEL: "auto" rotates q and k and writes the KV cache of a bf16 decoding step in
    # one C call per layer (src/models/rope_kernel.py; any CPU, a compiler once), "pytorch" in
    # PyTorch's operations. The same numbers, bit for bit.
    rope_kernel: Literal["auto", "pytorch"] = "auto"
    huggingface_token: SecretStr | None = None

    # Backend: "local" runs the model above on this machine; "remote" sends generation to an
    # OpenAI-compatible server (vLLM, TGI, another Mini-Claude) and loads no model here.
    backend: Literal["local", "remote"] = "local"
    remote_base_url: str | None = None  # e.g. http://gpu-box:8000/v1 (required for remote)
    remote_model: str | None = None  # unset: the first id from GET {REMOTE_BASE_URL}/models
    remote_api_key: SecretStr | None = None  # sent as "Authorization: Bearer ..."
    remote_timeout: float = Field(60.0, gt=0, le=3600)  # seconds to connect, and between chunks

    # Chat
    system_prompt: str | None = None
    response_cache_size: int = Field(256, ge=0, le=100_000)
    max_new_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    repetition_penalty: float | None = None
    do_sample: bool | None = None
    seed: int | None = None

    max_message_chars: int = Field(16_000, ge=1, le=1_000_000)
    # API request limits (README "Security"): user and assistant messages one request may send
    # to the model, the new one included (a full session gets 409); replies being generated
    # at once for one client (by IP address).
    max_history_messages: int = Field(200, ge=1, le=100_000)
    max_streams_per_client: int = Field(16, ge=1, le=10_000)
    # Choices one OpenAI request may ask for (``n``): each is a row of the batch.
    max_choices: int = Field(8, ge=1, le=64)

    # API
    api_host: str = "0.0.0.0"
    api_port: int = Field(8000, ge=1, le=65535)
    debug: bool = False
    api_key: SecretStr | None = None  # when set, every route but /health needs it
    cors_origins: str = ""  # comma-separated origins allowed to call the API from a browser
    # Observability (README "Operating"): /metrics without the key (for a scraper on a private
    # network), and the request log's format (one line per request: text, or JSON).
    metrics_public: bool = False
    log_format: Literal["text", "json"] = "text"
    data_dir: Path = Path("./data")  # the sessions database lives here
    max_body_bytes: int = Field(1_000_000, ge=1_000, le=100_000_000)
    # Connections (src/web/server.py, served by `python -m src.web`): the request line and
    # headers of one request, their count, how long a client may take to send them and its
    # body, how long an idle keep-alive connection stays open, and connections per address.
    max_header_bytes: int = Field(16_384, ge=1_024, le=1_048_576)
    max_header_count: int = Field(100, ge=8, le=10_000)
    header_timeout_seconds: float = Field(10.0, gt=0.0, le=3600.0)
    body_timeout_seconds: float = Field(30.0, gt=0.0, le=3600.0)
    keep_alive_seconds: float = Field(5.0, gt=0.0, le=3600.0)
    max_connections_per_client: int = Field(64, ge=1, le=100_000)
    max_batch_size: int = Field(16, ge=1, le=256)  # requests decoded together
    # Requests waiting for a row of the batch; more get 503 with Retry-After at once.
    max_queued_requests: int = Field(64, ge=1, le=100_000)
    # While replies are generated, memory the engine freed goes back to the system at most
    # this often (glibc's malloc keeps it otherwise; src/engine/memory.py); 0: only when idle.
    memory_release_seconds: float = Field(5.0, ge=0.0, le=3600.0)
    # Keys and values all decoding batches may hold (the base model's and each adapter's,
    # rows grown to their longest reply); a request that does not fit waits for rows to end.
    kv_cache_mb: int = Field(160, ge=1, le=1_000_000)
    # Prompt tokens (padding included) prefilled together in one pass; one prompt may be longer.
    max_prefill_tokens: int = Field(2048, ge=16, le=1_000_000)
    # While other replies decode, a longer prompt is prefilled this many tokens at a time,
    # a decoding step between two chunks, so they do not stall for all of it; 0: in one pass.
    prefill_chunk_tokens: int = Field(256, ge=0, le=1_000_000)
    # A single stream drafts up to this many tokens a step from earlier text (speculative
    # decoding by prompt lookup: src/engine/prompt_lookup.py); replies are unchanged. 0: off.
    prompt_lookup_tokens: int = Field(0, ge=0, le=64)
    # LoRA adapters kept loaded (each adds its LoRA matrices; the base weights are shared);
    # the least recently used idle one is closed to make room.
    max_loaded_adapters: int = Field(2, ge=1, le=64)
    prefix_cache_mb: int = Field(32, ge=0, le=1_000_000)  # reused keys/values; 0 disables
    # On SIGTERM, replies in flight may finish for this long before they are interrupted;
    # under `docker stop` (SIGKILL 10 s after SIGTERM) the interruption still gets out.
    shutdown_grace_seconds: float = Field(8.0, ge=0.0, le=3600.0)

    # Training: BATCH_SIZE, LEARNING_RATE and LORA_RANK override configs/lora_default.yaml's
    # keys when set (src/training/config.py). No default here: unset (None), the YAML's apply.
    batch_size: int | None = Field(None, ge=1, le=4096)
    learning_rate: float | None = Field(None, gt=0.0, le=1.0)
    lora_rank: int | None = Field(None, ge=1, le=1024)

    @field_validator("api_key")
    @classmethod
    def _key_not_blank(cls, value: SecretStr | None) -> SecretStr | None:
        # A blank key would accept "Authorization: Bearer " (an empty key): refuse it.
        if value is not None and not value.get_secret_value().strip():
            raise ValueError("must not be blank (unset API_KEY to turn authentication off)")
        # HTTP headers arrive as Latin-1: a non-ASCII key could only ever match as HTTP Basic.
        if value is not None and not value.get_secret_value().isascii():
            raise ValueError(
                "must be ASCII (letters, digits, punctuation): headers cannot carry it"
            )
        return value

    @field_validator("remote_base_url")
    @classmethod
    def _http_url(cls, value: str | None) -> str | None:
        if value is None:
            return None
        try:
            url = urlsplit(value.strip())
            valid = url.scheme in ("http", "https") and bool(url.hostname) and url.port != 0
        except ValueError:  # e.g. a port that is not a number
            valid = False
        if not valid:
            raise ValueError("must be an http(s) URL such as http://gpu-box:8000/v1")
        return value.strip().rstrip("/")

    @property
    def cors_origin_list(self) -> list[str]:
        return [origin.strip() for origin in self.cors_origins.split(",") if origin.strip()]

    @property
    def sessions_db(self) -> Path:
        return Path(self.data_dir) / "sessions.sqlite3"

    def generation_values(self) -> dict[str, object]:
        """The generation defaults set in the environment (unset ones are left out)."""
        values = {name: getattr(self, name) for name in GENERATION_FIELDS}
        return {name: value for name, value in values.items() if value is not None}

    def generation_defaults(self) -> GenerationParams:
        return make_params(self.generation_values())


def load_settings(**overrides: object) -> Settings:
    """Read and validate the settings; raise ``ConfigError`` naming any bad variable, or the
    settings file (.env) when it cannot be read."""
    env_files = overrides.get("_env_file", Settings.model_config.get("env_file"))
    if isinstance(env_files, str | Path):
        env_files = [env_files]
    for env_file in env_files or []:
        if Path(env_file).is_dir():
            raise ConfigError(f"Cannot read the settings file {env_file}: it is a folder")
    try:
        settings = Settings(**overrides)
        GenerationParams.model_validate(settings.generation_values())
    except ValidationError as exc:
        message = describe_validation_error(exc, name_of=str.upper)
        field = first_field(exc)
        raise ConfigError(f"Invalid setting: {message}", field and field.upper()) from None
    except (OSError, UnicodeDecodeError) as exc:  # .env unreadable or not UTF-8 text
        where = getattr(exc, "filename", None) or ", ".join(map(str, env_files or []))
        reason = exc.strerror if isinstance(exc, OSError) else f"not UTF-8 text: {exc.reason}"
        raise ConfigError(f"Cannot read the settings file {where}: {reason}") from None
    default_tokens = settings.generation_defaults().max_new_tokens
    if default_tokens > settings.max_length:
        raise ConfigError(
            f"Invalid setting: MAX_NEW_TOKENS={default_tokens} is over MAX_LENGTH="
            f"{settings.max_length} (the most tokens one reply may have); lower MAX_NEW_TOKENS "
            "or raise MAX_LENGTH",
            "MAX_NEW_TOKENS",
        )
    check_renamed_settings(env_files or [])
    check_backend(settings)
    return settings


def check_renamed_settings(env_files: list) -> None:
    """A setting under its old name would be silently ignored: refuse it, naming the new one
    (in the environment or a settings file, as pydantic-settings reads both)."""
    from dotenv import dotenv_values

    found = {name.upper() for name, value in os.environ.items() if value}
    for env_file in env_files:
        if Path(env_file).is_file():
            found |= {name.upper() for name, value in dotenv_values(env_file).items() if value}
    for old, new in RENAMED_SETTINGS.items():
        if old in found:
            raise ConfigError(
                f"Invalid setting: {old} is now {new}; rename it in your environment or .env",
                old,
            )


def check_backend(settings: Settings) -> None:
    """BACKEND=remote needs REMOTE_BASE_URL, and loads no model: settings that only a local
    model can honour are refused rather than silently ignored."""
    if settings.backend != "remote":
        return
    if settings.remote_base_url is None:
        raise ConfigError(
            "Invalid setting: REMOTE_BASE_URL is required when BACKEND=remote (the server's "
            "OpenAI-compatible base URL, e.g. http://gpu-box:8000/v1)"
        )
    # Only what the operator set to something other than the default (e.g. ENGINE=auto
    # copied from .env.example is harmless).
    for name in ("ENGINE", "PRECISION", "QUANTIZE", "ADAPTER_PATH"):
        field = name.lower()
        value = getattr(settings, field)
        if field in settings.model_fields_set and value != Settings.model_fields[field].default:
            raise ConfigError(
                f"Invalid setting: {name}={str(value)!r} needs a local model, but BACKEND=remote "
                f"loads none (the server chooses its own); unset {name} or use BACKEND=local"
            )


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings (front ends call this once at start-up)."""
    return load_settings()
