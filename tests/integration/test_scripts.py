"""The scripts in scripts/, run as users run them."""

import pytest

from tests.integration.conftest import run_python

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]


def test_test_tokenizer_prints_tokens_and_ids(converted_bundled_model):
    result = run_python(
        ["scripts/test_tokenizer.py", "--text", "Hello, world!", "--model", "smollm2-135m-instruct"]
    )
    assert result.returncode == 0, result.stderr
    assert "4 tokens" in result.stdout
    assert "ids: [19556, 28, 905, 17]" in result.stdout
    assert "decoded back: 'Hello, world!'" in result.stdout


def test_download_offline_reports_cache_state(converted_bundled_model, tmp_path):
    ready = run_python(
        ["scripts/download_models.py", "--offline", "--model", "smollm2-135m-instruct"]
    )
    assert ready.returncode == 0 and "cached and complete" in ready.stdout
    missing = run_python(["scripts/download_models.py", "--offline"], MODEL_CACHE_DIR=str(tmp_path))
    assert missing.returncode == 1
    assert "microsoft/DialoGPT-medium: not in the cache" in missing.stdout


def test_download_list_shows_the_cached_models_and_their_prepared_copies(
    tiny_family_paths, tmp_path
):
    """A hub model in the cache's own layout (as a download leaves it), served once as int4:
    the listing names it with its family, stored precision, size and the prepared copy."""
    import shutil

    from src.config import load_settings
    from src.models.inference import load_for_inference

    commit = "0123456789abcdef0123456789abcdef01234567"
    repository = tmp_path / "models--test--tiny-qwen2"
    shutil.copytree(tiny_family_paths["qwen2"], repository / "snapshots" / commit)
    (repository / "refs").mkdir()
    (repository / "refs" / "main").write_text(commit)
    settings = load_settings(
        _env_file=None,
        model_name="test/tiny-qwen2",
        model_cache_dir=tmp_path,
        precision="bf16",
        quantize="int4",
    )
    assert load_for_inference(settings).engine == "scratch"  # from the cache, no network
    empty = run_python(
        ["scripts/download_models.py", "--list"], MODEL_CACHE_DIR=str(tmp_path / "x")
    )
    assert empty.returncode == 0 and "no models yet" in empty.stdout
    listed = run_python(["scripts/download_models.py", "--list"], MODEL_CACHE_DIR=str(tmp_path))
    assert listed.returncode == 0, listed.stderr
    row = next(line for line in listed.stdout.splitlines() if "test/tiny-qwen2" in line)
    assert row.split()[:4] == ["test/tiny-qwen2", "qwen2", "float32", "none"]
    assert "bf16 int4 (" in row


def test_download_reports_an_unreachable_hub(tmp_path):
    result = run_python(
        ["scripts/download_models.py", "--model", "microsoft/DialoGPT-medium"],
        MODEL_CACHE_DIR=str(tmp_path),
    )
    assert result.returncode == 1
    assert "Could not get model 'microsoft/DialoGPT-medium'" in result.stderr


def test_download_offline_flags_an_incomplete_cached_model(tmp_path):
    snapshot = tmp_path / "models--org--name" / "snapshots" / "abc"
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    (tmp_path / "models--org--name" / "refs").mkdir()
    (tmp_path / "models--org--name" / "refs" / "main").write_text("abc")
    result = run_python(
        ["scripts/download_models.py", "--offline", "--model", "org/name"],
        MODEL_CACHE_DIR=str(tmp_path),
    )
    assert result.returncode == 1
    assert "INCOMPLETE" in result.stdout and "has no tokenizer" in result.stdout


def test_clean_cache_lists_deletes_only_with_yes_and_never_outside(tmp_path):
    cache = tmp_path / "cache"
    (cache / "some-model").mkdir(parents=True)
    (cache / "some-model" / "weights.bin").write_bytes(b"x" * 2048)
    outside = tmp_path / "precious.txt"
    outside.write_text("keep me")

    listing = run_python(["scripts/clean_cache.py"], MODEL_CACHE_DIR=str(cache))
    assert listing.returncode == 0
    assert "2.0 KB  some-model" in listing.stdout and "Nothing deleted" in listing.stdout
    assert (cache / "some-model").exists()

    for name in ("../precious.txt", "..", "/etc"):
        refused = run_python(["scripts/clean_cache.py", name, "--yes"], MODEL_CACHE_DIR=str(cache))
        assert refused.returncode == 2 and "outside the cache" in refused.stderr
    assert outside.read_text() == "keep me"

    deleted = run_python(["scripts/clean_cache.py", "--yes"], MODEL_CACHE_DIR=str(cache))
    assert deleted.returncode == 0 and "Deleted 1 entries" in deleted.stdout
    assert not (cache / "some-model").exists() and outside.exists()


def test_inspect_model_writes_a_heatmap_and_a_passing_parity_report(
    converted_bundled_model, tmp_path
):
    from PIL import Image

    output = tmp_path / "attention.png"
    prompt = "The cat sat on the mat."
    result = run_python(
        [
            "scripts/inspect_model.py",
            "--model",
            "smollm2-135m-instruct",
            "--prompt",
            prompt,
            "--layer",
            "3",
            "--head",
            "2",
            "--output",
            str(output),
        ]
    )
    assert result.returncode == 0, result.stderr
    with Image.open(output) as image:
        image.verify()  # a complete, valid PNG
    with Image.open(output) as image:
        tokens = int(result.stdout.split("Attention map (")[1].split(" tokens")[0])
        side = int(max(4.0, 0.45 * tokens + 2) * 100)  # figure inches x 100 dpi
        assert image.format == "PNG" and image.size == (side, side)
    rows = [
        line.split()
        for line in result.stdout.splitlines()
        if line.startswith(("block", "embeddings", "final", "logits"))
    ]
    # embeddings, the outputs of blocks 1..29, block 30 after the final norm, and the logits
    assert len(rows) == 1 + 29 + 1 + 1
    assert all(float(row[-1]) <= 1e-4 for row in rows)
    assert "PASS" in result.stdout


def test_inspect_model_names_a_bad_layer(converted_bundled_model, tmp_path):
    result = run_python(
        [
            "scripts/inspect_model.py",
            "--model",
            "smollm2-135m-instruct",
            "--layer",
            "99",
            "--output",
            str(tmp_path / "x.png"),
        ]
    )
    assert result.returncode == 2
    assert "layer=99: the model has layers 0..29" in result.stderr
