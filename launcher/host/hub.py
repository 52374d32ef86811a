"""``ftlaunch export --push-to-hub REPO``: the exported folder uploaded to the Hugging Face Hub as
one commit (huggingface_hub's ``create_repo`` + ``upload_folder``), the model card included.

Everything the upload needs that can be known without the network (a valid repo id, a token, the
Hub not switched off with HF_HUB_OFFLINE) is checked before the export writes anything. A failure
of the upload itself leaves the exported folder complete on disk and names the command that
uploads it later, so nothing is exported twice.
"""

from __future__ import annotations

import os
from pathlib import Path

from launcher.core.errors import UserError

TRUE_WORDS = {"1", "ON", "YES", "TRUE"}  # how huggingface_hub reads its boolean variables


def check_push(repo_id: str) -> None:
    """Refuse (one line, before the export) what would make the upload fail for sure."""
    from huggingface_hub import get_token
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as exc:
        raise UserError(
            f"--push-to-hub {repo_id!r} is not a Hub repo id ({exc}); pass NAMESPACE/NAME"
        ) from None
    if os.environ.get("HF_HUB_OFFLINE", "").upper() in TRUE_WORDS:
        raise UserError(
            f"--push-to-hub {repo_id}: HF_HUB_OFFLINE is set, so the Hub cannot be reached; export without "
            "--push-to-hub here and upload the folder where there is network (hf upload REPO DIR)"
        )
    if not get_token():
        raise UserError(
            f"--push-to-hub {repo_id}: no Hugging Face token; run `hf auth login` or set HF_TOKEN "
            "(a token with write access)"
        )


def push_folder(folder: Path, repo_id: str, private: bool, message: str) -> str:
    """Create the model repo if needed and upload ``folder`` to it as one commit; its URL."""
    from huggingface_hub import HfApi

    api = HfApi()
    try:
        url = api.create_repo(repo_id, private=private, exist_ok=True)
        api.upload_folder(repo_id=repo_id, folder_path=str(folder), commit_message=message)
    except Exception as exc:  # noqa: BLE001 - network, auth and HTTP errors all end the same way
        reason = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        raise UserError(
            f"exported to {folder}, but the upload to {repo_id} failed ({reason}); the folder is "
            f"complete: upload it with `hf upload {repo_id} {folder}`"
        ) from None
    return str(url)
