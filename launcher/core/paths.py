"""Where the project's data files live, in a source checkout and in an installed wheel."""

from __future__ import annotations

from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parents[1]  # launcher/, this file being launcher/core/paths.py
ASSETS_DIR = PACKAGE_DIR / "assets"
SAMPLE_DATA_DIR = ASSETS_DIR / "sample"
TINY_TOKENIZER_DIR = ASSETS_DIR / "tiny_t5_tokenizer"


def project_dir(name: str) -> Path:
    """Return a top-level project folder (``recipes``, ``accelerate_configs``).

    In a checkout (editable install) they sit beside the package; a wheel ships them inside
    the package under the same name (see ``[tool.setuptools.package-dir]`` in pyproject.toml).
    """
    for candidate in (PACKAGE_DIR.parent / name, PACKAGE_DIR / name):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(f"ftlaunch is installed without its {name}/ folder")


def is_local_reference(name: str) -> bool:
    """A model/tokenizer name that means a folder on disk (a path), not a hub id."""
    return name.startswith((".", "/", "~")) or Path(name).expanduser().exists()
