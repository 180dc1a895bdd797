"""QUANTIZE=auto for a checkpoint that was not quantised: held-out perplexity measured once,
the fastest method within 2% of fp32 served, the measurement kept and explained."""

import json

import pytest

import src.models.auto_quantization as auto_quantization
from src.config import load_settings
from src.models.auto_quantization import choice_path
from src.models.inference import load_for_inference
from src.training.calibration import calibration_examples

pytestmark = [pytest.mark.unit, pytest.mark.timeout(300)]


def load_auto(settings):
    """As the server loads a model: with the calibration conversations."""
    return load_for_inference(settings, calibration=calibration_examples)


def settings_for(folder, cache):
    return load_settings(_env_file=None, model_name=str(folder), model_cache_dir=cache)


def test_the_measured_choice_is_the_fastest_within_2_percent_and_is_kept(
    tiny_family_paths, tmp_path, monkeypatch
):
    """A real measurement (a random tiny model: which method passes is up to its weights):
    the method served is the first of int4, int8 whose perplexity is within 2% of fp32's,
    the start-up line says so, and the next start reads the measurement back."""
    folder = tiny_family_paths["qwen2"]
    loaded = load_auto(settings_for(folder, tmp_path))
    saved = json.loads(choice_path(folder, tmp_path).read_text())
    perplexities = saved["perplexities"]
    within = [
        method
        for method in ("int4", "int8")
        if method in perplexities and perplexities[method] <= perplexities["fp32"] * 1.02
    ]
    expected = within[0] if within else "none"
    assert saved["method"] == expected
    assert list(perplexities) == ["fp32", *("int4", "int8")[: 1 + (expected != "int4")]]
    if expected == "none":
        assert loaded.description.startswith("scratch engine, fp32;")
    else:
        assert loaded.description.startswith(f"scratch engine, bf16, {expected} weights")
        assert f"QUANTIZE=auto: {expected}, within 2% of fp32's perplexity" in loaded.description
    monkeypatch.setattr(auto_quantization, "measure", pytest.fail)
    assert load_auto(settings_for(folder, tmp_path)).description == loaded.description


def test_int4_is_served_when_it_keeps_perplexity(tiny_family_paths, tmp_path, monkeypatch):
    scripted_perplexities(monkeypatch, [10.0, 10.1])  # int4 +1%: int8 is not even tried
    loaded = load_auto(settings_for(tiny_family_paths["qwen2"], tmp_path))
    assert loaded.description.startswith("scratch engine, bf16, int4 weights")
    assert "PRECISION=auto: bf16 for quantised weights" in loaded.description
    assert "QUANTIZE=auto: int4, within 2% of fp32's perplexity (int4 +1.0%;" in (
        loaded.description
    )


def scripted_perplexities(monkeypatch, values):
    """held_out_perplexity returns ``values`` in turn (fp32, int4, int8)."""
    import src.models.perplexity as perplexity

    answers = iter(values)
    monkeypatch.setattr(perplexity, "held_out_perplexity", lambda model, examples: next(answers))


def test_int8_is_served_when_int4_costs_too_much(tiny_family_paths, tmp_path, monkeypatch):
    scripted_perplexities(monkeypatch, [10.0, 10.5, 10.1])  # int4 +5%, int8 +1%
    loaded = load_auto(settings_for(tiny_family_paths["qwen2"], tmp_path))
    assert loaded.description.startswith("scratch engine, bf16, int8 weights")
    assert "QUANTIZE=auto: int8, within 2% of fp32's perplexity (int4 +5.0%, int8 +1.0%;" in (
        loaded.description
    )


def test_the_model_stays_exact_when_both_cost_too_much(tiny_family_paths, tmp_path, monkeypatch):
    scripted_perplexities(monkeypatch, [10.0, 10.5, 10.3])
    loaded = load_auto(settings_for(tiny_family_paths["qwen2"], tmp_path))
    assert loaded.description.startswith("scratch engine, fp32;")
    assert "PRECISION=auto: fp32, exact" in loaded.description
    assert "none, as quantising cost more than 2% perplexity (int4 +5.0%, int8 +3.0%" in (
        loaded.description
    )


def test_a_damaged_measurement_is_measured_again(tiny_family_paths, tmp_path, monkeypatch):
    folder = tiny_family_paths["qwen2"]
    path = choice_path(folder, tmp_path)
    path.parent.mkdir(parents=True)
    path.write_text("{not json")
    scripted_perplexities(monkeypatch, [10.0, 10.1])
    loaded = load_auto(settings_for(folder, tmp_path))
    assert "int4 +1.0%" in loaded.description
    assert json.loads(path.read_text())["perplexities"] == {"fp32": 10.0, "int4": 10.1}


def test_a_setting_is_never_overruled(tiny_family_paths, tmp_path, monkeypatch):
    monkeypatch.setattr(auto_quantization, "measure", pytest.fail)
    settings = load_settings(
        _env_file=None,
        model_name=str(tiny_family_paths["qwen2"]),
        model_cache_dir=tmp_path,
        quantize="none",
    )
    assert "QUANTIZE=none" in load_auto(settings).description
