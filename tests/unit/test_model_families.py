"""The families the from-scratch transformer builds (Qwen2, Qwen3, Mistral, Llama 3 rope
scaling; GPT-2 and Llama have their own tests), through the code users run: ENGINE=auto picks
our engine for them, batches decode as alone, and the inspection script reports parity."""

import json

import pytest

from src.config import load_settings
from src.engine.batching import BatchingEngine
from src.models.inference import load_for_inference
from src.models.model_info import eos_token_ids
from src.models.transformer import Transformer
from tests.batching_helpers import arrive_together
from tests.conftest import GREEDY, TINY_FAMILIES
from tests.integration.conftest import run_python

pytestmark = [pytest.mark.unit, pytest.mark.timeout(300)]


def settings_for(folder, **overrides):
    """The settings for the model in ``folder``, exact, its prepared copy kept beside it
    (never in the repository's cache)."""
    values = {"model_name": str(folder), "precision": "fp32", "quantize": "none"}
    values["model_cache_dir"] = folder.parent / f"{folder.name}-cache"
    return load_settings(_env_file=None, **values | overrides)


@pytest.mark.parametrize("kind", sorted(TINY_FAMILIES))
def test_engine_auto_takes_the_scratch_engine_for_every_family(tiny_family_paths, kind):
    folder = tiny_family_paths[kind]
    loaded = load_for_inference(settings_for(folder))
    assert loaded.engine == "scratch" and isinstance(loaded.model, Transformer)
    assert loaded.description.startswith("scratch engine, fp32")
    model_type = json.loads((folder / "config.json").read_text())["model_type"]
    assert f"ENGINE=auto: our transformer builds {model_type};" in loaded.description


def test_the_start_up_line_says_why_transformers_runs_a_model(tiny_family_paths, tmp_path):
    import shutil

    folder = tmp_path / "yarn-llama"  # a rope scaling our transformer does not compute
    shutil.copytree(tiny_family_paths["llama3"], folder)
    config = json.loads((folder / "config.json").read_text())
    yarn = {"rope_type": "yarn", "rope_theta": 10_000.0, "factor": 4.0}
    (folder / "config.json").write_text(json.dumps(config | {"rope_parameters": yarn}))
    loaded = load_for_inference(settings_for(folder))
    assert loaded.engine == "hf"
    assert "our transformer cannot read it (unsupported rope scaling 'yarn')" in loaded.description
    assert "PRECISION=fp32; QUANTIZE=none" in loaded.description


@pytest.mark.parametrize("kind", sorted(TINY_FAMILIES))
def test_each_family_batches_as_alone(tiny_family_paths, kind):
    """Left-padded batches with rotary positions counted per row (and Qwen3's per-head norms,
    Qwen2's biases) give every request the reply it gets alone."""
    loaded = load_for_inference(settings_for(tiny_family_paths[kind]))
    eos = eos_token_ids(loaded.model, loaded.tokenizer)
    prompts = [loaded.tokenizer.encode(text) for text in ("hi", "a longer question, padded", "3")]
    alone_engine = BatchingEngine(loaded.model, eos)
    alone = [list(alone_engine.generate_token_ids(p, GREEDY)) for p in prompts]
    alone_engine.close()
    engine = BatchingEngine(loaded.model, eos)
    assert arrive_together(engine, prompts, GREEDY) == alone
    assert engine.stats.prefill_passes == 1
    engine.close()


# Each run of the script is a process that imports torch and transformers (about 7 s here);
# the families' parity itself is checked in process by tests/unit/test_transformer.py, so
# two families run in every suite and the rest with the slow tests.
INSPECTED_EVERY_RUN = {"llama3", "qwen2-window"}


@pytest.mark.parametrize(
    "kind",
    [
        kind if kind in INSPECTED_EVERY_RUN else pytest.param(kind, marks=pytest.mark.slow)
        for kind in sorted(TINY_FAMILIES)
    ],
)
def test_the_inspection_script_reports_parity(tiny_family_paths, kind, tmp_path):
    result = run_python(
        [
            "scripts/inspect_model.py",
            *("--model", str(tiny_family_paths[kind]), "--output", str(tmp_path / "map.png")),
        ]
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert (tmp_path / "map.png").is_file()


@pytest.mark.parametrize("kind", ["qwen3", "gemma2", "phi3"])
def test_int4_families_are_prepared_once_and_read_back_the_same(tiny_family_paths, kind, tmp_path):
    """QUANTIZE=int4 PRECISION=bf16 on each family: the prepared model saved on the first
    start gives the same greedy reply as the freshly quantised one."""
    settings = settings_for(
        tiny_family_paths[kind], precision="bf16", quantize="int4", model_cache_dir=tmp_path
    )
    replies = []
    for _ in range(2):  # quantised and saved, then read back
        loaded = load_for_inference(settings)
        engine = BatchingEngine(loaded.model, frozenset(), background=False)
        replies.append(list(engine.generate_token_ids([5, 17, 30, 42], GREEDY)))
        engine.close()
    assert replies[0] == replies[1] and len(replies[0]) == GREEDY.max_new_tokens
    assert any((tmp_path / "prepared").iterdir())
