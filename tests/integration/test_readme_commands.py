"""The debugging commands of the README's Troubleshooting section run as written."""

import re
import shlex

import pytest

from src.config import REPO_ROOT
from tests.integration.conftest import run_python

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]


def debugging_commands() -> list[str]:
    readme = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
    block = re.search(r"### Debugging commands\n\n```bash\n(.*?)```", readme, flags=re.DOTALL)
    assert block, "README.md has no Debugging commands block"
    return [line for line in block.group(1).splitlines() if line.startswith("python ")]


def test_the_block_has_the_briefs_commands():
    commands = debugging_commands()
    assert any("torch.cuda.is_available()" in c for c in commands)
    assert any("AutoModel.from_pretrained('microsoft/DialoGPT-medium'" in c for c in commands)
    assert 'python scripts/test_tokenizer.py --text "Hello, world!"' in commands


@pytest.mark.parametrize(
    "command",
    # The transformers-only one needs the hub (or a model downloaded before); not here.
    [c for c in debugging_commands() if "microsoft/DialoGPT-medium" not in c],
)
def test_debugging_command_runs(command, converted_bundled_model):
    args = shlex.split(command)
    assert args[0] == "python"
    result = run_python(args[1:])  # offline: MODEL_NAME's hub model falls back to the bundled one
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip()
    if "load_model" in command:
        assert result.stdout.startswith("smollm2-135m-instruct bundled (fallback)")
