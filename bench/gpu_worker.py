"""The workers of the GPU benchmark (bench/gpu_bench.py starts them): what runs on the GPU.

  preflight  imports, versions, conflicts between the carried wheels and the image, the GPU, its
             bf16 dense peak (PEAK_BF16_TFLOPS), a measured 8192^3 bf16 matmul rate
  prepare    a FLAN-T5-base-shaped model directory (flan-t5-base's config values from
             launcher.host.estimate, random init, its own lm_head, vocabulary 32,128; save_pretrained,
             no download) with the package's tiny tokenizer, synthetic dialogues with DialogSum-like
             token lengths, and the training set's FLOPs per token (for the CLI rows' MFU)
  measure    started by ``accelerate launch`` with the configs ``ftlaunch full --dry-run`` rendered
             for the real architecture's name: the product's own step (``train.train_step`` and the
             loop's per-step bookkeeping) for full and LoRA, timed after warm-up; with
             ``--generate N`` also ``evaluation.generate_predictions`` on N dialogues

Figures:

  tokens/s     non-pad source + target tokens per second over the timed steps (counted on the device)
  FLOPs/step   c x (N_src x S + N_tgt x T) + 12 x inner x (L_enc sum s^2 + L_dec sum t^2 + L_dec sum t s)
               c = 6 (full: forward 2 + backward 4) or 4 (LoRA: frozen weights get no weight gradient);
               N_src = weights applied once per source token: every encoder Linear and the decoder's
               cross-attention k and v projections (they run over the encoder's S outputs, not the T
               decoder positions); N_tgt = weights applied once per target token: decoder
               self-attention, cross-attention q and o, feed-forward, lm_head; S, T = non-pad source /
               target tokens of the step; attention: QK^T and AV, 2 FLOPs per multiply-add, x3 for
               forward + backward, inner = heads x d_kv (embedding lookups, norms, softmax left out)
  MFU          FLOPs / (seconds x the GPU's dense bf16 peak); "padded": FLOPs of the padded batch
  memory       torch.cuda.max_memory_allocated() over the part (and reserved)
  host syncs   synchronising CUDA calls per step (torch.cuda.set_sync_debug_mode), counted over a few
               extra steps after the timed ones

Each worker prints its results as ``BENCH_RESULT {json}`` lines as soon as they exist, so a part
killed later keeps what it finished. Fault hook: ``FTLAUNCH_BENCH_HANG=<strategy>`` makes that
strategy's measurement hang (ignoring SIGTERM), to test that the driver kills it.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

HANG_ENV = "FTLAUNCH_BENCH_HANG"  # a strategy name: its measurement hangs (the kill is then tested)
DEADLINE_ENV = "FTLAUNCH_BENCH_DEADLINE"  # epoch seconds: workers start no new sub-part after it
RESULT_PREFIX = "BENCH_RESULT "
STRATEGIES: dict[str, tuple[int, str]] = {
    "DDP": (0, "none"),
    "ZeRO-2": (2, "none"),
    "ZeRO-3": (3, "none"),
    "ZeRO-3+offload": (3, "optimizer"),
}
ARCHS = {"base": "google/flan-t5-base", "large": "google/flan-t5-large", "tiny": "tiny-t5"}
FLAN_T5_VOCAB = 32128
# Dense bf16 tensor-core peaks in TFLOP/s: NVIDIA's datasheet figures are "with sparsity", twice
# these. Matched on torch.cuda.get_device_name() in this order (specific names first: "GH200"
# contains "H200", "H100 NVL" contains "H100").
PEAK_BF16_TFLOPS: tuple[tuple[str, float, str], ...] = (
    ("GH200", 989.5, "GH200 (H100-class GPU, 1,979 sparse)"),
    ("H200 NVL", 835.5, "H200 NVL (1,671 sparse)"),
    ("H200", 989.5, "H200 SXM (1,979 sparse)"),
    ("H100 NVL", 835.5, "H100 NVL (1,671 sparse)"),
    ("H100 PCIe", 756.5, "H100 PCIe (1,513 sparse)"),
    ("H100", 989.5, "H100 SXM (1,979 sparse)"),
    ("A100", 312.0, "A100 (624 sparse)"),
    ("L40S", 362.05, "L40S (733 sparse)"),
)
SOURCE_LOGNORMAL = (5.10, 0.45)  # DialogSum prompts with a T5 tokenizer: mean ~181 tokens, p95 ~340
TARGET_LOGNORMAL = (3.25, 0.40)  # summaries: mean ~28 tokens, p95 ~50
REQUIRED_MODULES = (
    "torch",
    "transformers",
    "accelerate",
    "peft",
    "deepspeed",
    "datasets",
    "pydantic",
    "typer",
    "rouge_score",
    "nltk",
    "yaml",
    "safetensors",
)


# ---------------------------------------------------------------- FLOPs and peaks


@dataclass(frozen=True)
class FlopCounts:
    """Weights a token passes through, split by which tokens they run over (see the docstring)."""

    source: int  # encoder Linears + decoder cross-attention k, v: once per source token
    target: int  # every other decoder Linear and lm_head: once per target token
    inner: int  # heads x d_kv
    enc_layers: int
    dec_layers: int


def flop_counts(model) -> FlopCounts:
    """Count the Linear weights of a (PEFT-wrapped or plain) T5 by the tokens they run over.

    LoRA's own adapter matrices (r x d) are left out: with r=32 they add under 1%.
    """
    import torch

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    source = target = 0
    for name, module in base.named_modules():
        if not isinstance(module, torch.nn.Linear) or "lora_" in name:
            continue
        count = getattr(module.weight, "ds_numel", module.weight.numel())
        cross_kv = ".EncDecAttention.k" in name or ".EncDecAttention.v" in name
        if name.startswith("encoder.") or (name.startswith("decoder.") and cross_kv):
            source += count
        else:
            target += count
    config = base.config
    return FlopCounts(
        source, target, config.num_heads * config.d_kv, config.num_layers, config.num_decoder_layers
    )


def step_flops(source_lengths, target_lengths, counts: FlopCounts, lora: bool):
    """Model FLOPs of one micro-batch (forward + backward) from per-example non-pad lengths.

    Works on torch tensors (summed on the device, no host sync) and on plain lists.
    """
    if isinstance(source_lengths, list):
        import torch

        source_lengths, target_lengths = torch.tensor(source_lengths), torch.tensor(target_lengths)
    s = source_lengths.long()
    t = target_lengths.long()
    c = 4 if lora else 6
    attention = (
        12
        * counts.inner
        * (
            counts.enc_layers * (s * s).sum()
            + counts.dec_layers * (t * t).sum()
            + counts.dec_layers * (t * s).sum()
        )
    )
    return c * (counts.source * s.sum() + counts.target * t.sum()) + attention


def peak_bf16(device_name: str, override_tflops: float | None = None) -> tuple[float | None, str]:
    """(peak FLOP/s, label) for MFU: dense bf16 tensor-core peak of the named GPU."""
    if override_tflops:
        return override_tflops * 1e12, f"given: {override_tflops:g} TFLOP/s"
    for key, tflops, label in PEAK_BF16_TFLOPS:
        if key in device_name:
            return tflops * 1e12, f"{label}: {tflops:g} TFLOP/s dense bf16"
    return None, f"{device_name or 'no GPU'}: peak unknown (pass --peak-tflops)"


def emit(payload: dict) -> None:
    """One result, printed at once (the driver reads these lines, also from a part it killed)."""
    print(RESULT_PREFIX + json.dumps(payload), flush=True)


# ---------------------------------------------------------------- worker: preflight


def requirement_problems(site: Path) -> list[str]:
    """Requirements of the carried wheels (installed in ``site``) that the environment does not meet."""
    from importlib import metadata

    from packaging.requirements import InvalidRequirement, Requirement

    problems = []
    for dist in metadata.distributions(path=[str(site)]):
        name, version = dist.metadata["Name"], dist.version
        for text in dist.requires or []:
            try:
                requirement = Requirement(text)
            except InvalidRequirement:
                continue
            if requirement.marker is not None and not requirement.marker.evaluate({"extra": ""}):
                continue
            try:
                found = metadata.version(requirement.name)
            except metadata.PackageNotFoundError:
                problems.append(f"missing: {name} {version} requires {requirement}, which is not installed")
                continue
            if requirement.specifier and not requirement.specifier.contains(found, prereleases=True):
                problems.append(
                    f"conflict: {name} {version} requires {requirement}, the image has "
                    f"{requirement.name} {found}"
                )
    return problems


def import_problem(module: str) -> tuple[str | None, str | None]:
    """(version, problem) of importing ``module``: missing vs. broken (a conflict) told apart."""
    import importlib

    try:
        imported = importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if exc.name == module:
            return None, f"missing: {module} (carry its wheel in .whl/)"
        return None, f"broken: {module} needs {exc.name}, which is missing (a dependency of a carried wheel?)"
    except Exception as exc:  # noqa: BLE001 - any import failure is reported, never raised
        return None, f"conflict: importing {module} fails: {type(exc).__name__}: {str(exc)[:200]}"
    return module_version(module, imported), None


def module_version(module: str, imported) -> str:
    """``__version__``, else the installed distribution's version (rouge_score has no __version__)."""
    from importlib import metadata

    version = getattr(imported, "__version__", None)
    for name in (module, {"yaml": "PyYAML", "rouge_score": "rouge-score"}.get(module, module)):
        if version:
            break
        try:
            version = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return str(version or "?")


def worker_preflight(args: argparse.Namespace) -> None:
    info: dict[str, Any] = {
        "versions": {},
        "problems": [],
        "cpus": len(os.sched_getaffinity(0)),
        "python": sys.version.split()[0],
    }
    for module in REQUIRED_MODULES:
        version, problem = import_problem(module)
        if version:
            info["versions"][module] = version
        if problem:
            info["problems"].append(problem)
    if args.site and Path(args.site).is_dir():
        try:
            info["problems"] += requirement_problems(Path(args.site))
        except Exception as exc:  # noqa: BLE001
            info["problems"].append(f"requirement check failed: {type(exc).__name__}: {exc}")
    elif not args.tiny:
        info["problems"].append(f"no carried wheels installed ({args.site or 'no --site'})")
    if shutil.which("accelerate") is None:  # every command.sh runs `accelerate launch`
        info["problems"].append("missing: the `accelerate` command is not on PATH")
    try:
        import torch

        info["cuda"] = torch.cuda.is_available()
        info["device"] = torch.cuda.get_device_name(0) if info["cuda"] else "CPU"
        info["torch_cuda"] = torch.version.cuda
    except Exception as exc:  # noqa: BLE001
        info["cuda"] = False
        info["problems"].append(f"torch: {type(exc).__name__}: {exc}")
    try:
        from launcher.rank.optimization import cpu_fused_adamw_available

        info["cpu_fused_adamw"] = cpu_fused_adamw_available()  # what ZeRO-Offload runs will use
    except Exception as exc:  # noqa: BLE001
        info["problems"].append(f"launcher.rank.optimization: {type(exc).__name__}: {str(exc)[:200]}")
    info["peak_flops"], info["peak_label"] = peak_bf16(
        info.get("device", "") if info.get("cuda") else "", args.peak_tflops
    )
    if info.get("cuda"):
        try:
            info["matmul_tflops"] = matmul_tflops()
            info["gpu_memory_gib"] = torch.cuda.get_device_properties(0).total_memory / 2**30
        except Exception as exc:  # noqa: BLE001
            info["problems"].append(f"matmul probe: {type(exc).__name__}: {exc}")
    emit(info)


def matmul_tflops(n: int = 8192, repeats: int = 10) -> float:
    """bf16 n^3 matmul rate on random data: what this GPU reaches, next to its datasheet peak."""
    import torch

    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    torch.cuda.synchronize()
    return 2 * n**3 * repeats / (time.perf_counter() - start) / 1e12


# ---------------------------------------------------------------- worker: prepare


def arch_config(arch: str) -> dict:
    """flan-t5-*'s config values (launcher.host.estimate) or tiny-t5's, as a T5Config's keywords."""
    from launcher.host.estimate import FLAN_T5_CONFIGS
    from launcher.rank.model import TINY_T5_CONFIG

    if arch == "tiny":
        return dict(TINY_T5_CONFIG, vocab_size=1000)
    return dict(TINY_T5_CONFIG, **FLAN_T5_CONFIGS[ARCHS[arch]], vocab_size=FLAN_T5_VOCAB)


def build_arch(arch: str, device):
    """Random init with FLAN-T5's own (untied) lm_head, fp32 master weights, whole (not ZeRO-3 sharded)."""
    import torch
    from transformers import T5Config, T5ForConditionalGeneration

    from launcher.rank.distributed import without_zero3_init

    config = T5Config(**arch_config(arch))
    with without_zero3_init(), torch.device(device):
        torch.manual_seed(0)
        model = T5ForConditionalGeneration(config)
        model.lm_head.weight = torch.nn.Parameter(
            torch.randn(config.vocab_size, config.d_model) * config.d_model**-0.5
        )
    model.config.tie_word_embeddings = False
    return model


def lognormal_lengths(n: int, mu_sigma: tuple[float, float], low: int, high: int, seed: int) -> list[int]:
    import numpy as np

    rng = np.random.default_rng(seed)
    return np.clip(np.round(rng.lognormal(*mu_sigma, size=n)), low, high).astype(int).tolist()


def synthetic_rows(n: int, tokenizer, seed: int, prefix: str) -> list[dict]:
    """Dialogues and summaries built from the sample's turns and sentences, with DialogSum-like
    token lengths under ``tokenizer`` (each dialogue unique: the loader merges repeated ones)."""
    import numpy as np

    from launcher.core.dialogues import read_jsonl
    from launcher.core.paths import SAMPLE_DATA_DIR

    sample = read_jsonl(SAMPLE_DATA_DIR / "train.jsonl")
    turns = [turn for row in sample for turn in row["dialogue"].split("\n") if turn.strip()]
    sentences = [s.strip() + "." for row in sample for s in row["summary"].split(".") if s.strip()]
    turn_len = [len(ids) for ids in tokenizer(turns, add_special_tokens=False)["input_ids"]]
    sent_len = [len(ids) for ids in tokenizer(sentences, add_special_tokens=False)["input_ids"]]
    rng = np.random.default_rng(seed)
    rows = []
    sources = lognormal_lengths(n, SOURCE_LOGNORMAL, 24, 600, seed + 1)
    targets = lognormal_lengths(n, TARGET_LOGNORMAL, 4, 128, seed + 2)
    for index, (source, target) in enumerate(zip(sources, targets)):
        dialogue, length = [f"#Person1#: ({prefix} {index})"], 6
        while length < source - 12:  # the prompt adds ~12 tokens
            pick = int(rng.integers(len(turns)))
            dialogue.append(turns[pick])
            length += turn_len[pick] + 1
        summary, length = [], 0
        while length < target:
            pick = int(rng.integers(len(sentences)))
            summary.append(sentences[pick])
            length += sent_len[pick]
        rows.append(
            {"id": f"{prefix}_{index}", "dialogue": "\n".join(dialogue), "summary": " ".join(summary)}
        )
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


def prepare_data(args: argparse.Namespace, tokenizer, data_dir: Path) -> dict:
    """train (exactly one epoch of the CLI runs' steps), validation, test: real DialogSum or synthetic."""
    data_dir.mkdir(parents=True, exist_ok=True)
    sizes = {"train": args.train_rows, "validation": 16, "test": args.test_rows}
    for seed, (split, n) in enumerate(sizes.items()):
        if args.data:
            from launcher.core.dialogues import load_split

            rows = [
                {"id": r["id"], "dialogue": r["dialogue"], "summary": r["summary"]}
                for r in load_split(args.data, split, n)
            ]
        else:
            rows = synthetic_rows(n, tokenizer, seed=100 * seed, prefix=split)
        write_jsonl(data_dir / f"{split}.jsonl", rows)
    return sizes


def train_token_lengths(data_dir: Path, tokenizer) -> tuple[list[int], list[int]]:
    """Non-pad source and target lengths of the training split as the product tokenizes it."""
    from launcher.core.dialogues import load_split
    from launcher.core.recipe import DataSection
    from launcher.rank.data import tokenize_rows

    examples = tokenize_rows(load_split(str(data_dir), "train"), tokenizer, DataSection())
    return [len(e["input_ids"]) for e in examples], [len(e["labels"]) for e in examples]


def worker_prepare(args: argparse.Namespace) -> None:
    """Model directories (save_pretrained, tokenizer beside them), data, FLOPs per training token."""
    import torch
    from transformers import AutoTokenizer

    from launcher.core.paths import TINY_TOKENIZER_DIR
    from launcher.core.recipe import LoraSection
    from launcher.rank.model import apply_lora

    work = Path(args.work)
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer or str(TINY_TOKENIZER_DIR))
    tokenizer_dir = work / "tokenizer"
    tokenizer.save_pretrained(str(tokenizer_dir))
    data_dir = work / "data"
    sizes = prepare_data(args, tokenizer, data_dir)
    sources, targets = train_token_lengths(data_dir, tokenizer)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    result: dict[str, Any] = {
        "models": {},
        "flops_per_token": {},
        "data_dir": str(data_dir),
        "tokenizer": str(tokenizer_dir),
        "rows": sizes,
        "source_tokens_mean": sum(sources) / len(sources),
        "target_tokens_mean": sum(targets) / len(targets),
    }
    for arch in args.archs:
        model = build_arch(arch, device)
        counts = flop_counts(model)
        tokens = sum(sources) + sum(targets)
        per_token = {
            "full": int(step_flops(sources, targets, counts, lora=False)) / tokens,
            "lora": int(step_flops(sources, targets, counts, lora=True)) / tokens,
        }
        total = sum(p.numel() for p in model.parameters())
        directory = work / "models" / arch
        model.save_pretrained(str(directory))
        tokenizer.save_pretrained(str(directory))
        lora = apply_lora(model, LoraSection())
        trainable = sum(p.numel() for p in lora.parameters() if p.requires_grad)
        result["models"][arch] = str(directory)
        result["flops_per_token"][arch] = per_token
        result["model_note"] = (
            f"{ARCHS[arch]}-shaped, random init, {total:,} parameters (LoRA r=32 on q, v: "
            f"{trainable:,} trainable); tokenizer: {args.tokenizer or 'the package tiny one'} "
            f"({len(tokenizer)} tokens); data: {args.data or 'synthetic'}, source tokens mean "
            f"{result['source_tokens_mean']:.0f}, target {result['target_tokens_mean']:.0f}"
        )
        del model, lora
    emit(result)


# ---------------------------------------------------------------- worker: measure


def maybe_hang(strategy: str) -> None:
    """Fault hook: FTLAUNCH_BENCH_HANG=<strategy> makes this measurement hang (and ignore SIGTERM)."""
    if os.environ.get(HANG_ENV) != strategy:
        return
    print(f"fault hook {HANG_ENV}={strategy}: hanging (SIGTERM ignored)", flush=True)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    while True:
        time.sleep(3600)


def deadline_left() -> float:
    value = os.environ.get(DEADLINE_ENV)
    return float(value) - time.time() if value else float("inf")


def synthetic_token_examples(n: int, vocab: int, seed: int = 0) -> list[dict]:
    """Token-id examples with DialogSum-like lengths (ids 3..vocab-1, EOS 1 last)."""
    import numpy as np

    rng = np.random.default_rng(seed + 1)
    sources = lognormal_lengths(n, SOURCE_LOGNORMAL, 16, 512, seed)
    targets = lognormal_lengths(n, TARGET_LOGNORMAL, 4, 128, seed + 2)
    return [
        {
            "input_ids": rng.integers(3, vocab, size=s - 1).tolist() + [1],
            "attention_mask": [1] * s,
            "labels": rng.integers(3, vocab, size=t - 1).tolist() + [1],
        }
        for s, t in zip(sources, targets)
    ]


def batches(loader, sampler, count: int):
    """``count`` micro-batches, starting new epochs of the loader as needed."""
    done = 0
    while done < count:
        for batch in loader:
            yield batch
            done += 1
            if done >= count:
                return
        sampler.epoch += 1


def count_host_syncs(step: Callable[[], None], steps: int) -> float | None:
    """Synchronising CUDA calls per step (torch.cuda.set_sync_debug_mode's warnings)."""
    import warnings

    import torch

    if not steps or not torch.cuda.is_available():
        return None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            for _ in range(steps):
                step()
            torch.cuda.synchronize()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    syncs = [w for w in caught if "synchroniz" in str(w.message).lower()]
    return len(syncs) / steps


def measure_training(accelerator, recipe, arch: str, method: str, args: argparse.Namespace) -> dict:
    """The product's step (train.train_step + the loop's per-step bookkeeping), timed after warm-up."""
    from types import SimpleNamespace

    import torch
    from transformers import AutoTokenizer

    from launcher.rank.data import LengthGroupedBatchSampler
    from launcher.rank.loaders import build_collator, pins_memory
    from launcher.rank.model import apply_lora, count_parameters
    from launcher.rank.optimization import build_optimizer
    from launcher.rank.step_stats import WindowStats
    from launcher.rank.stopping import StopRequest, stop_requested
    from launcher.rank.train import prepare_model_for_training, train_step

    on_gpu = accelerator.device.type == "cuda"
    if on_gpu:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    left_over = torch.cuda.memory_allocated() if on_gpu else 0
    model = build_arch(arch, accelerator.device)
    if method == "lora":
        model = apply_lora(model, recipe.lora)
    trainable, total = count_parameters(model)
    counts = flop_counts(model)
    steps = args.warmup + args.steps + args.sync_steps
    examples = synthetic_token_examples(steps * args.batch, model.config.vocab_size)
    sampler = LengthGroupedBatchSampler(
        [len(e["input_ids"]) + len(e["labels"]) for e in examples], args.batch, 42
    )
    collator = build_collator(AutoTokenizer.from_pretrained(args.tokenizer), on_gpu, model)
    loader = torch.utils.data.DataLoader(
        examples, batch_sampler=sampler, collate_fn=collator, pin_memory=pins_memory(accelerator)
    )
    prepare_model_for_training(model, recipe, accelerator)  # what train.set_up does (issue 23)
    optimizer = build_optimizer(model, recipe, accelerator.device)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    model.train()
    no_schedule = SimpleNamespace(step=lambda: None)  # a constant learning rate: the step is what is timed
    run = SimpleNamespace(
        accelerator=accelerator, model=model, optimizer=optimizer, scheduler=no_schedule, recipe=recipe
    )
    stats, stop, grad_norm = WindowStats(), StopRequest(), None
    zero = torch.zeros((), dtype=torch.long, device=accelerator.device)
    tokens, flops, padded = zero.clone(), zero.clone(), zero.clone()
    sync = torch.cuda.synchronize if on_gpu else (lambda: None)
    iterator = batches(loader, sampler, steps)
    lora = method == "lora"

    def product_step(index: int, timed: bool) -> None:
        nonlocal grad_norm, tokens, flops, padded
        batch = next(iterator)
        step = train_step(run, [batch])  # one micro-batch per optimizer step (recipe grad_accum 1)
        grad_norm = step.grad_norm if step.grad_norm is not None else grad_norm
        stats.add(step)
        stop_requested(accelerator, stop, index + 1, steps)
        if timed:  # counted on the device: no host sync
            s, t = batch["attention_mask"].sum(1), (batch["labels"] != -100).sum(1)
            tokens = tokens + s.sum() + t.sum()
            flops = flops + step_flops(s, t, counts, lora)
            full_s = torch.full_like(s, batch["attention_mask"].shape[1])
            full_t = torch.full_like(t, batch["labels"].shape[1])
            padded = padded + step_flops(full_s, full_t, counts, lora)

    for index in range(args.warmup):
        product_step(index, timed=False)
    sync()
    start = time.perf_counter()
    for index in range(args.warmup, args.warmup + args.steps):
        product_step(index, timed=True)
    sync()
    seconds = time.perf_counter() - start
    later = iter(range(args.warmup + args.steps, steps))
    syncs = count_host_syncs(lambda: product_step(next(later), timed=False), args.sync_steps)
    peak, label = peak_bf16(torch.cuda.get_device_name(0) if on_gpu else "", args.peak_tflops)
    result = {
        "kind": "train",
        "arch": arch,
        "method": method,
        "params": total,
        "trainable": trainable,
        "steps": args.steps,
        "batch": args.batch,
        "seconds": seconds,
        "tokens_per_s": int(tokens) / seconds,
        "samples_per_s": args.steps * args.batch / seconds,
        "tflops": int(flops) / seconds / 1e12,
        "mfu": int(flops) / seconds / peak if peak else None,
        "mfu_padded": int(padded) / seconds / peak if peak else None,
        "peak_label": label,
        "host_syncs_per_step": syncs,
        "peak_alloc_gib": (torch.cuda.max_memory_allocated() - left_over) / 2**30 if on_gpu else None,
        "peak_reserved_gib": torch.cuda.max_memory_reserved() / 2**30 if on_gpu else None,
        "left_over_gib": left_over / 2**30,
    }
    run = model = optimizer = loader = None  # drop the references before freeing memory
    accelerator.free_memory()
    return result


def measure_generation(accelerator, recipe, arch: str, args: argparse.Namespace) -> dict:
    """launcher.rank.evaluation.generate_predictions on the test split's dialogues, after a warm-up batch."""
    import torch
    from transformers import AutoTokenizer

    from launcher.core.dialogues import load_split
    from launcher.rank.evaluation import generate_predictions

    on_gpu = accelerator.device.type == "cuda"
    recipe.eval.max_new_tokens = args.max_new_tokens
    recipe.eval.batch_size = args.eval_batch
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    rows = load_split(args.data_dir, "test", args.generate)
    if on_gpu:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    model = build_arch(arch, accelerator.device).eval()
    generate_predictions(accelerator, model, tokenizer, rows[: args.eval_batch], recipe)
    sync = torch.cuda.synchronize if on_gpu else (lambda: None)
    sync()
    start = time.perf_counter()
    predictions = generate_predictions(accelerator, model, tokenizer, rows, recipe)
    sync()
    seconds = time.perf_counter() - start
    if len(predictions) != len(rows):
        raise RuntimeError(f"{len(predictions)} predictions for {len(rows)} dialogues")
    return {
        "kind": "generate",
        "arch": arch,
        "dialogues": len(rows),
        "seconds": seconds,
        "dialogues_per_s": len(rows) / seconds,
        "new_tokens_per_s": len(rows) * args.max_new_tokens / seconds,
        "batch": args.eval_batch,
        "max_new_tokens": args.max_new_tokens,
        "peak_alloc_gib": torch.cuda.max_memory_allocated() / 2**30 if on_gpu else None,
    }


def worker_measure(args: argparse.Namespace) -> None:
    """One strategy: full and LoRA (and generation under DDP); each part's failure is a result."""
    maybe_hang(args.strategy)
    from launcher.core.recipe_loading import read_run_recipe
    from launcher.rank.distributed import build_accelerator

    recipe = read_run_recipe(args.run_dir)
    accelerator = build_accelerator(recipe)
    jobs: list[tuple[str, Callable[[], dict]]] = [
        (method, lambda method=method: measure_training(accelerator, recipe, args.arch, method, args))
        for method in ("full", "lora")
    ]
    if args.generate:
        jobs.append(("generate", lambda: measure_generation(accelerator, recipe, args.arch, args)))
    for name, job in jobs:
        if deadline_left() < 15:
            result = {
                "kind": "generate" if name == "generate" else "train",
                "arch": args.arch,
                "method": name,
                "error": "skipped: the run's time budget ran out",
            }
        else:
            try:
                result = job()
            except Exception as exc:  # noqa: BLE001 - an OOM or error is a result; the next part still runs
                result = {
                    "kind": "generate" if name == "generate" else "train",
                    "arch": args.arch,
                    "method": name,
                    "error": f"{type(exc).__name__}: {str(exc)[:300]}",
                }
                accelerator.free_memory()
        result["strategy"] = args.strategy
        if accelerator.is_main_process:
            emit(result)
    accelerator.end_training()


# ---------------------------------------------------------------- entry


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("worker", choices=("preflight", "prepare", "measure", "step"))
    parser.add_argument("--tiny", action="store_true", help="CPU rehearsal sizes")
    parser.add_argument("--peak-tflops", type=float, default=None)
    # preflight
    parser.add_argument("--site", default=None, help="where gpu.sh installed the carried wheels")
    # prepare
    parser.add_argument("--work", type=Path)
    parser.add_argument("--archs", default="base", help="comma list of base, large, tiny")
    parser.add_argument("--tokenizer", default=None)
    parser.add_argument("--data", default=None, help="a DialogSum folder (else synthetic dialogues)")
    parser.add_argument("--train-rows", type=int, default=480)
    parser.add_argument("--test-rows", type=int, default=500)
    # measure
    parser.add_argument("--run-dir", type=Path)
    parser.add_argument("--strategy", default="DDP")
    parser.add_argument("--arch", default="base")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--sync-steps", type=int, default=3)
    parser.add_argument("--generate", type=int, default=0, help="dialogues to generate for (0: none)")
    parser.add_argument("--eval-batch", type=int, default=64)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--data-dir", default=None)
    # step (gpu_step.py): one variant in this fresh process
    parser.add_argument("--variant", choices=("product", "trainer"), default="product")
    parser.add_argument(
        "--compile", action="store_true", help="product: train.compile; trainer: torch_compile"
    )
    parser.add_argument("--profile", action="store_true", help="product: trace 3 steady steps")
    parser.add_argument(
        "--tokens", type=int, default=None, help="micro-batches filled up to this token budget (else --batch)"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.archs = [arch.strip() for arch in args.archs.split(",") if arch.strip()]
    if args.worker == "step":
        from gpu_step import worker_step

        worker_step(args)
        return 0
    {"preflight": worker_preflight, "prepare": worker_prepare, "measure": worker_measure}[args.worker](args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
