"""Whether ``data.max_source_length`` leaves room for the dialogue after the prompt's text.

Inputs are the prompt with the dialogue in its place, truncated from the right to
``data.max_source_length`` tokens, the tokenizer's special tokens (T5: the end-of-sequence
token) included. When the prompt's text before ``{dialogue}`` and those special tokens take all
of it, every input is the same truncated prompt whatever the dialogue: the run trains and scores
on nothing, and nothing else says so. Refused with the count and the minimum to set.

Counted on the host (before a launch, also under ``--dry-run``) with the ``tokenizers`` library
from the tokenizer's ``tokenizer.json`` where it is on disk (the embedded tokenizer, a local
folder, the hub cache): no transformers import. The ranks count again with the tokenizer they
loaded (``rank/data.py``), so a tokenizer the host could not read (a hub id not yet downloaded)
is refused there, with the same line.
"""

from __future__ import annotations

from pathlib import Path

from launcher.core.errors import UserError
from launcher.core.paths import TINY_TOKENIZER_DIR, is_local_reference
from launcher.core.recipe import EMBEDDED_MODEL, DataSection, Recipe

PLACEHOLDER = "{dialogue}"
TOKENIZER_FILE = "tokenizer.json"  # the fast tokenizer's own file: the tokenizers library reads it


def prompt_prefix(prompt: str) -> str:
    """The prompt's text before the dialogue: what every input starts with."""
    return prompt.split(PLACEHOLDER, 1)[0]


def tokenizer_name(recipe: Recipe) -> str:
    """The reference the ranks load their tokenizer from (rank/model.py ``load_tokenizer``)."""
    return recipe.model.tokenizer or recipe.model.name


def check_room_for_dialogue(data: DataSection, prefix_tokens: int, tokenizer: str) -> None:
    """Refuse a ``data.max_source_length`` that the prompt's text before ``{dialogue}`` fills,
    its special tokens included (``prefix_tokens``, counted with ``tokenizer``)."""
    if data.max_source_length > prefix_tokens:
        return
    raise UserError(
        f"data.max_source_length={data.max_source_length} leaves no room for the dialogue: the prompt's "
        f"text before {PLACEHOLDER} takes {prefix_tokens} tokens, the end-of-sequence token included "
        f"(tokenizer {tokenizer}), so every input would be the same truncated prompt; set "
        f"data.max_source_length to at least {prefix_tokens + 1} (the default is 512), or shorten data.prompt",
        key="data.max_source_length",
    )


def local_tokenizer_file(name: str) -> Path | None:
    """``tokenizer.json`` of a tokenizer reference where it is on disk here, else None: the
    embedded tokenizer, a local folder, or a hub id already in the hub cache (no network)."""
    if name == EMBEDDED_MODEL:
        return TINY_TOKENIZER_DIR / TOKENIZER_FILE
    if is_local_reference(name):
        path = Path(name).expanduser() / TOKENIZER_FILE
        return path if path.is_file() else None
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(name, TOKENIZER_FILE)
    return Path(cached) if isinstance(cached, str) else None


def count_prefix_tokens(tokenizer_file: Path, prompt: str) -> int | None:
    """Tokens of the prompt's text before the dialogue, special tokens included, from
    ``tokenizer_file``; None where the tokenizers library cannot read it (the ranks count then)."""
    try:
        from tokenizers import Tokenizer

        return len(Tokenizer.from_file(str(tokenizer_file)).encode(prompt_prefix(prompt)).ids)
    except Exception:  # noqa: BLE001 - any unreadable file: the ranks' tokenizer decides
        return None


def check_prompt_room_on_host(recipe: Recipe) -> None:
    """``check_room_for_dialogue`` before a launch, where the run's tokenizer is on disk here."""
    name = tokenizer_name(recipe)
    path = local_tokenizer_file(name)
    counted = count_prefix_tokens(path, recipe.data.prompt) if path is not None else None
    if counted is not None:
        check_room_for_dialogue(recipe.data, counted, name)
