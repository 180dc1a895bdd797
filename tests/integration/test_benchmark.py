"""The benchmark script runs and writes its three reports. It asserts no timing: speed is
reported by the benchmark, never checked by tests."""

import json

import pytest
from PIL import Image

from tests.integration.conftest import run_python

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]


def test_decode_section_writes_json_markdown_and_chart(converted_bundled_model, tmp_path):
    result = run_python(
        [
            "scripts/benchmark.py",
            "--sections",
            "decode",
            "--new-tokens",
            "4",
            "--repetitions",
            "1",
            "--perplexity-examples",
            "3",
            "--output",
            str(tmp_path),
        ],
        timeout=500,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    data = json.loads((tmp_path / "benchmark.json").read_text())
    names = [row["name"] for row in data["decode"]["rows"]]
    assert names[0] == "transformers generate fp32 (baseline)" and len(names) == 5
    fp32_rows = [row for row in data["decode"]["rows"] if "fp32" in row["name"]]
    assert all(row["same_tokens"] for row in fp32_rows)  # fp32 engines: identical greedy tokens
    assert all(row["tokens_per_second"] > 0 and row["perplexity"] > 1 for row in fp32_rows)
    table = (tmp_path / "benchmark.md").read_text()
    assert "| transformers generate fp32 (baseline) |" in table and "1.00x" in table
    with Image.open(tmp_path / "benchmark.png") as chart:
        assert chart.format == "PNG"


def test_unknown_sections_are_refused(tmp_path):
    result = run_python(
        ["scripts/benchmark.py", "--sections", "decode,speedy", "--output", str(tmp_path)]
    )
    assert result.returncode == 2 and "unknown sections ['speedy']" in result.stderr
