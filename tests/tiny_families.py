"""Tiny random models of other seq2seq families (BART, mT5), with tokenizers trained here on the
embedded sample dialogues: the non-T5 path end to end, without a download.

BART gets a byte-level BPE with BART's special tokens (<s>=0, <pad>=1, </s>=2); mT5 a Unigram
(SentencePiece-style) with T5's (<pad>=0, </s>=1). Both are saved with ``save_pretrained`` as a
model directory a user would pass with ``--model``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

SAMPLE = Path(__file__).resolve().parents[1] / "launcher" / "assets" / "sample"
VOCAB = 400


def sample_texts() -> list[str]:
    texts = []
    for split in ("train", "validation", "test"):
        for line in (SAMPLE / f"{split}.jsonl").read_text().splitlines():
            row = json.loads(line)
            texts += [value for key, value in row.items() if key != "id" and isinstance(value, str)]
    return texts


def bpe_tokenizer():
    """BART-style: byte-level BPE, <s> text </s>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB,
        special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(sample_texts(), trainer)
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", special_tokens=[("<s>", 0), ("</s>", 2)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        mask_token="<mask>",
    )


def unigram_tokenizer():
    """mT5-style: Unigram over Metaspace pieces, text </s>."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.Unigram())
    tokenizer.normalizer = normalizers.NFKC()
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    tokenizer.decoder = decoders.Metaspace()
    trainer = trainers.UnigramTrainer(
        vocab_size=VOCAB, special_tokens=["<pad>", "</s>", "<unk>"], unk_token="<unk>"
    )
    tokenizer.train_from_iterator(sample_texts(), trainer)
    tokenizer.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )


def bart_model(vocab: int):
    from transformers import BartConfig, BartForConditionalGeneration

    config = BartConfig(
        vocab_size=vocab,
        d_model=32,
        encoder_layers=2,
        decoder_layers=2,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        max_position_embeddings=256,
    )
    return BartForConditionalGeneration(config)


def mt5_model(vocab: int):
    from transformers import MT5Config, MT5ForConditionalGeneration

    config = MT5Config(
        vocab_size=vocab, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=4
    )
    return MT5ForConditionalGeneration(config)


FAMILIES = {"bart": (bpe_tokenizer, bart_model), "mt5": (unigram_tokenizer, mt5_model)}


def save_tiny(family: str, directory: Path) -> Path:
    """A random-init model of ``family`` and its trained tokenizer, saved as one model directory."""
    make_tokenizer, make_model = FAMILIES[family]
    tokenizer = make_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = make_model(len(tokenizer))
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def save_tiny_families(root: Path) -> dict[str, Path]:
    """Every family's tiny model directory under ``root``."""
    return {family: save_tiny(family, root / family) for family in FAMILIES}
