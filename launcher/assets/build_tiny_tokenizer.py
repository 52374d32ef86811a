"""Build the tiny T5-style tokenizer that ships inside ``launcher/assets``.

Why this exists
---------------
ftlaunch has to run (tests, CI, smoke runs, air-gapped machines) without
downloading anything from a model hub.  The real FLAN-T5 SentencePiece
tokenizer cannot be vendored here, so this script trains a small stand-in with
the same *shape* on the embedded sample dialogues:

* a SentencePiece-style **Unigram** model with T5's pre-tokenization
  (whitespace split + ``Metaspace("▁", prepend_scheme="always")``) and decoder;
* T5's special-token layout: ``<pad>`` = 0, ``</s>`` = 1, ``<unk>`` = 2;
* a post-processor that appends ``</s>`` to every sequence, like T5;
* no ``<extra_id_N>`` sentinels (``extra_ids`` = 0), so ``len(tok)`` equals the
  model vocabulary size.

``transformers.AutoTokenizer.from_pretrained("launcher/assets/tiny_t5_tokenizer")``
returns a ``T5Tokenizer``.  Note that in transformers 5 ``T5Tokenizer`` does not
use ``tokenizer.json`` verbatim: it only takes the vocabulary (and a
``Precompiled`` normalizer, if there is one) and rebuilds the pre-tokenizer,
decoder and post-processor itself.  The pipeline written here is exactly the
one it rebuilds, so loading the file with plain ``tokenizers.Tokenizer`` and
with transformers gives the same ids.  There is deliberately no normalizer
(transformers would drop a non-``Precompiled`` one); newlines are handled by the
whitespace split, i.e. they become ordinary word boundaries, as in T5.

Usage (from the repository root)::

    python launcher/assets/build_tiny_tokenizer.py          # regenerate the files
    python launcher/assets/build_tiny_tokenizer.py --check  # exit 1 if they are stale

The output is reproducible: regenerating with the same ``tokenizers`` version
gives byte-identical files (see ``canonical_vocab`` for how the trainer's
run-to-run noise is removed).
"""

from __future__ import annotations

import os

# Fewer sources of float noise in the Unigram EM (see canonical_vocab); must be
# set before `tokenizers` is imported.
os.environ["TOKENIZERS_PARALLELISM"] = "false"
os.environ["RAYON_NUM_THREADS"] = "1"

import argparse
import json
import string
import sys
import tempfile
from pathlib import Path

from tokenizers import Tokenizer, decoders, pre_tokenizers, processors
from tokenizers.models import Unigram
from tokenizers.trainers import UnigramTrainer

ASSETS_DIR = Path(__file__).resolve().parent
SAMPLE_DIR = ASSETS_DIR / "sample"
OUTPUT_DIR = ASSETS_DIR / "tiny_t5_tokenizer"

VOCAB_SIZE = 1000
MODEL_MAX_LENGTH = 512
PAD, EOS, UNK = "<pad>", "</s>", "<unk>"
SPECIAL_TOKENS = [PAD, EOS, UNK]  # ids 0, 1, 2 -- same as T5

# The fixed prompt the launcher wraps every dialogue in.
PROMPT_TEXTS = ["Summarize the following conversation.\n\n", "\n\nSummary: "]

# Every printable ASCII character plus a few common non-ASCII ones, so that
# unseen punctuation/digits map to a real piece instead of <unk>.
INITIAL_ALPHABET = sorted(
    set(string.ascii_letters + string.digits + string.punctuation) | set("éèêëáàâäíìîïóòôöúùûüñçß€£’‘“”–—…")
)

SPLITS = ("train", "validation", "test")
TEXT_FIELDS = ("dialogue", "summary", "summary1", "summary2", "summary3")


def corpus() -> list[str]:
    """Training text: sample dialogues and reference summaries, plus the prompt."""
    texts: list[str] = []
    for split in SPLITS:
        with open(SAMPLE_DIR / f"{split}.jsonl", encoding="utf-8") as f:
            for line in f:
                row = json.loads(line)
                texts.extend(row[k] for k in TEXT_FIELDS if k in row)
    # Repeat the prompt so its words train as whole pieces.
    texts.extend(PROMPT_TEXTS * 20)
    return texts


def _t5_pipeline(model: Unigram) -> Tokenizer:
    """A tokenizer with exactly the pipeline transformers 5's T5Tokenizer rebuilds."""
    tok = Tokenizer(model)
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.WhitespaceSplit(),
            pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True),
        ]
    )
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    return tok


def train_vocab() -> list[tuple[str, float]]:
    """Train the Unigram model and return its (piece, log-prob) list."""
    tok = _t5_pipeline(Unigram())
    trainer = UnigramTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        unk_token=UNK,
        initial_alphabet=INITIAL_ALPHABET,
        show_progress=False,
    )
    tok.train_from_iterator(corpus(), trainer=trainer)
    return [(piece, score) for piece, score in json.loads(tok.to_str())["model"]["vocab"]]


def canonical_vocab(vocab: list[tuple[str, float]]) -> list[tuple[str, float]]:
    """Make the trained vocabulary byte-for-byte reproducible.

    The Rust trainer is not deterministic run to run even single-threaded: it
    sums over randomly seeded hash maps (score noise of ~1e-11), and the
    "required characters" it re-adds after pruning get ``min_score + k * 1e-4``
    in hash-set iteration order.  So: round every score to 4 decimals, give
    that re-added tail one shared score, and break ties by the piece string.
    The special tokens stay first, at ids 0, 1, 2.
    """
    specials = dict(vocab[: len(SPECIAL_TOKENS)])
    assert list(specials) == SPECIAL_TOKENS, list(specials)
    rest = vocab[len(SPECIAL_TOKENS) :]
    min_score = min(score for _, score in rest)
    tail_window = 1e-4 * sum(1 for piece, _ in rest if len(piece) == 1) + 1e-3
    tail_score = round(min_score, 4)
    canon = [
        (piece, tail_score if score < min_score + tail_window else round(score, 4)) for piece, score in rest
    ]
    canon.sort(key=lambda ps: (-ps[1], ps[0]))
    return [(t, 0.0) for t in SPECIAL_TOKENS] + canon


def build_tokenizer() -> Tokenizer:
    vocab = canonical_vocab(train_vocab())
    tok = _t5_pipeline(Unigram(vocab, unk_id=SPECIAL_TOKENS.index(UNK), byte_fallback=False))
    tok.add_special_tokens(SPECIAL_TOKENS)
    for i, t in enumerate(SPECIAL_TOKENS):
        assert tok.token_to_id(t) == i, f"{t} got id {tok.token_to_id(t)}, expected {i}"
    tok.post_processor = processors.TemplateProcessing(
        single=["$A", EOS],
        pair=["$A", EOS, "$B", EOS],
        special_tokens=[(EOS, SPECIAL_TOKENS.index(EOS))],
    )
    return tok


def _special(content: str) -> dict:
    return {
        "content": content,
        "lstrip": False,
        "normalized": False,
        "rstrip": False,
        "single_word": False,
        "special": True,
    }


def tokenizer_config() -> dict:
    return {
        "tokenizer_class": "T5Tokenizer",
        "model_max_length": MODEL_MAX_LENGTH,
        "pad_token": PAD,
        "eos_token": EOS,
        "unk_token": UNK,
        # No sentinel tokens: transformers' T5Tokenizer defaults to 100.
        "extra_ids": 0,
        "additional_special_tokens": [],
        "clean_up_tokenization_spaces": False,
        "added_tokens_decoder": {str(i): _special(t) for i, t in enumerate(SPECIAL_TOKENS)},
    }


def special_tokens_map() -> dict:
    return {"pad_token": PAD, "eos_token": EOS, "unk_token": UNK}


def write(out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    build_tokenizer().save(str(out_dir / "tokenizer.json"), pretty=True)
    for name, obj in (
        ("tokenizer_config.json", tokenizer_config()),
        ("special_tokens_map.json", special_tokens_map()),
    ):
        with open(out_dir / name, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=2, ensure_ascii=False)
            f.write("\n")


OUTPUT_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--check", action="store_true", help="verify the committed files are up to date")
    parser.add_argument("--out", type=Path, default=OUTPUT_DIR, help="output folder (default: %(default)s)")
    args = parser.parse_args(argv)

    if not args.check:
        write(args.out)
        size = Tokenizer.from_file(str(args.out / "tokenizer.json")).get_vocab_size()
        print(f"wrote {args.out} (vocab size {size})")
        return 0

    with tempfile.TemporaryDirectory() as tmp:
        write(Path(tmp))
        stale = [
            n
            for n in OUTPUT_FILES
            if not (args.out / n).is_file() or (args.out / n).read_bytes() != (Path(tmp) / n).read_bytes()
        ]
    if stale:
        print(f"stale or missing in {args.out}: {', '.join(stale)}; rerun without --check", file=sys.stderr)
        return 1
    print(f"{args.out} is up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main())
