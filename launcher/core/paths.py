"""Where the project's data files live, in a source checkout and in an installed wheel."""

from __future__ import annotations

from pathlib import Path

from launcher.core.errors import UserError

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
    """A model/tokenizer/adapter name that means a folder on disk (a path), not a hub id.

    A hub id is ``NAME`` or ``NAMESPACE/NAME``; anything else is a path, existing or not: a name
    with more than one ``/`` (``runs/B0/final``) or ending in one, one starting with ``.``, ``/``
    or ``~`` (``./m``, ``../m``, ``~/m``), one that exists here, or ``DIR/NAME`` where DIR is an
    existing folder (``runs/B0`` beside a ``runs/`` folder). Such a path that does not exist is
    refused in one line where it is checked, never sent to the hub (whose client would fail with
    a traceback on a name that cannot be a repo id).
    """
    if name.startswith((".", "/", "~")) or name.count("/") > 1 or name.endswith("/"):
        return True
    path = Path(name).expanduser()
    return path.exists() or ("/" in name and path.parent.is_dir())


def shadowed_hub_id(name: str) -> str:
    """For a missing local path that is also a valid hub id (``google/flan-t5-base`` run where a
    ``google/`` folder exists, so it was taken as a path): how to reach the hub model; else ''."""
    path = Path(name).expanduser()
    if name.count("/") != 1 or name.startswith((".", "/", "~")) or path.exists():
        return ""
    if not path.parent.is_dir() or hub_id_problem(name) is not None:
        return ""
    return (
        f" (it is taken as a path because a folder {path.parent.name}/ exists here; to use the hub "
        f"model {name}, run ftlaunch from another directory)"
    )


def hub_id_problem(name: str) -> str | None:
    """Why ``name`` cannot be a Hugging Face Hub repo id (huggingface_hub's own rule), or None."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError as exc:
        reason = str(exc).split(f": {name!r}")[0].split(". Use `repo_type`")[0].rstrip(".")
        return reason[:1].lower() + reason[1:]
    return None


def check_hub_id(name: str, what: str) -> None:
    """A reference that is no local path must be a hub id: else one line naming ``what`` (the
    flag or recipe key) and the value, before anything asks the hub about it."""
    problem = hub_id_problem(name)
    if problem:
        raise UserError(
            f"{what} {name!r} is neither an existing local path nor a hub id ({problem}); pass a "
            "directory (./NAME for one here) or a hub id NAMESPACE/NAME"
        )
