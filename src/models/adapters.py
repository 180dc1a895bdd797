"""LoRA adapters offered to users by name, from one configured folder (ADAPTERS_DIR).

Requests name an adapter; they never give a path. A name is accepted only if it is one of
the folders listed here, so ``../../etc`` and absolute paths cannot reach the disk; an
adapter whose files link outside the folder is refused.
"""

from __future__ import annotations

from pathlib import Path

from src.errors import InvalidRequestError
from src.models.folder_check import check_inside
from src.models.lora_wrapper import ADAPTER_CONFIG


def list_adapters(adapters_dir: Path) -> list[str]:
    """Names of the adapter folders (those holding an adapter_config.json), sorted."""
    folder = Path(adapters_dir)
    if not folder.is_dir():
        return []
    return sorted(
        entry.name
        for entry in folder.iterdir()
        if entry.is_dir() and not entry.is_symlink() and (entry / ADAPTER_CONFIG).is_file()
    )


def resolve_adapter(adapters_dir: Path, name: str) -> Path:
    available = list_adapters(adapters_dir)
    if name not in available:
        raise InvalidRequestError(
            f"adapter: no adapter named {name!r} in {adapters_dir} "
            f"(available: {', '.join(available) or 'none'})",
            "adapter",
        )
    folder = Path(adapters_dir) / name
    check_inside(folder, Path(adapters_dir), "ADAPTERS_DIR")
    return folder
