"""The bundled YAML recipes, shipped inside the package: `--config digits` finds
configs/digits.yaml wherever the project is installed, from a wheel as from a checkout."""

from __future__ import annotations

from importlib.resources import files
from importlib.resources.abc import Traversable

SUFFIX = ".yaml"


def names() -> list[str]:
    """The bundled recipes, by name (the file name without .yaml)."""
    return sorted(
        entry.name.removesuffix(SUFFIX)
        for entry in files(__name__).iterdir()
        if entry.name.endswith(SUFFIX)
    )


def bundled(name: str) -> Traversable | None:
    """The bundled recipe called `name` (`digits` or `digits.yaml`), or None. Only names
    listed by `names()` are looked up, so no argument reaches outside the package."""
    stem = name.removesuffix(SUFFIX)
    return files(__name__) / f"{stem}{SUFFIX}" if stem in names() else None
