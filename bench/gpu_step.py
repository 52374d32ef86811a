"""One training-step variant, alone in a fresh process (``gpu_worker.py step``): the fair comparison.

Variants (``--variant``): ``product`` (train.train_step with the rendered recipe's Accelerator;
``--compile``: train.compile=true, so Accelerate's torch.compile and the length buckets) and
``trainer`` (transformers' Seq2SeqTrainer, bf16, the same model, examples and batches;
``--compile``: its ``torch_compile=True``). Every ratio in the summary is taken against
``trainer`` eager. ``--tiny`` (the CPU rehearsal) compiles with dynamo's ``eager`` backend: the
same tracing, guards and graph count, without inductor's minutes of C++ compilation on CPU.

Method: a fixed list of micro-batches (one epoch of the product's length-grouped sampler over
synthetic DialogSum-like examples) is run twice; the first pass warms up every batch shape (and
compiles), only the second is timed. Tokens are the batches' non-pad source + target tokens,
counted on the host beforehand. Then, on CUDA: the peak memory of the longest batch alone, and
(``--profile``) a torch.profiler trace of 3 steady steps, summarized (``profile_summary``).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from collections import Counter

from gpu_worker import build_arch, emit, flop_counts, peak_bf16, step_flops, synthetic_token_examples

PROFILED_STEPS = 3
SYNC_EVENTS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize")


def fixed_batches(
    examples: list[dict], batch: int, count: int, tokens: int | None = None, bucketed: bool = False
) -> list[list[int]]:
    """The product's batches of one epoch, the first ``count`` of them: length-grouped batches of
    ``batch`` examples, or with ``tokens`` micro-batches filled up to that token budget
    (train.micro_batch_tokens; ``bucketed``: counted at the compiled run's length buckets)."""
    from launcher.rank.data import LengthGroupedBatchSampler, TokenBudgetBatchSampler

    if tokens:
        from launcher.rank.compiling import bucketed_lengths

        sources = [len(e["input_ids"]) for e in examples]
        targets = [len(e["labels"]) for e in examples]
        if bucketed:
            sources, targets = bucketed_lengths(sources, targets, 512, 128)
        return TokenBudgetBatchSampler(sources, targets, tokens, 42).batches()[:count]
    keys = [len(e["input_ids"]) + len(e["labels"]) for e in examples]
    return list(LengthGroupedBatchSampler(keys, batch, 42))[:count]


def batch_lengths(examples: list[dict], indices: list[int]) -> tuple[list[int], list[int]]:
    return [len(examples[i]["input_ids"]) for i in indices], [len(examples[i]["labels"]) for i in indices]


def figures(examples, batch_list, seconds: float, counts, on_gpu: bool) -> dict:
    """tokens/s, samples/s, TFLOP/s and MFU of one timed pass over ``batch_list``."""
    import torch

    tokens = flops = 0
    for indices in batch_list:
        s, t = batch_lengths(examples, indices)
        tokens += sum(s) + sum(t)
        flops += int(step_flops(s, t, counts, lora=False))
    peak, label = peak_bf16(torch.cuda.get_device_name(0) if on_gpu else "")
    samples = sum(len(indices) for indices in batch_list)
    return {
        "seconds": seconds,
        "steps": len(batch_list),
        "tokens_per_s": tokens / seconds,
        "samples_per_s": samples / seconds,
        "tflops": flops / seconds / 1e12,
        "mfu": flops / seconds / peak if peak else None,
        "peak_label": label,
    }


def longest(batch_list, examples) -> list[int]:
    return max(
        batch_list, key=lambda indices: sum(sum(lengths) for lengths in batch_lengths(examples, indices))
    )


# ---------------------------------------------------------------- the product


def product_runner(args: argparse.Namespace, examples: list[dict]):
    """step(indices): the product's optimizer step on one micro-batch, compiled or not."""
    from types import SimpleNamespace

    from transformers import AutoTokenizer

    from launcher.core.recipe_loading import read_run_recipe
    from launcher.host.render import DYNAMO_ENV
    from launcher.rank.distributed import build_accelerator
    from launcher.rank.loaders import recipe_collator
    from launcher.rank.optimization import build_optimizer
    from launcher.rank.train import train_step

    recipe = read_run_recipe(args.run_dir)
    recipe.train.compile = args.compile
    if recipe.compiles:  # what accelerate launch (or command.sh) sets for the ranks
        os.environ.update(DYNAMO_ENV)
        if args.tiny:  # the CPU rehearsal: dynamo traces and counts, inductor's minutes of C++ are skipped
            os.environ["ACCELERATE_DYNAMO_BACKEND"] = "EAGER"
    accelerator = build_accelerator(recipe)
    on_gpu = accelerator.device.type == "cuda"
    model = build_arch(args.arch, accelerator.device)
    collator = recipe_collator(recipe, AutoTokenizer.from_pretrained(args.tokenizer), on_gpu, model)
    optimizer = build_optimizer(model, recipe, accelerator.device)  # as train.py builds it (fused AdamW)
    model, optimizer = accelerator.prepare(model, optimizer)
    model.train()
    run = SimpleNamespace(
        accelerator=accelerator,
        model=model,
        optimizer=optimizer,
        scheduler=SimpleNamespace(step=lambda: None),  # constant learning rate: the step is timed
        recipe=recipe,
    )

    def step(indices: list[int]) -> None:
        batch = collator([examples[i] for i in indices])
        batch = {key: value.to(accelerator.device, non_blocking=True) for key, value in batch.items()}
        train_step(run, [batch])

    return step


# ---------------------------------------------------------------- Seq2SeqTrainer


def trainer_pass_seconds(args: argparse.Namespace, examples: list[dict], batch_list) -> tuple[float, float]:
    """(warm-up pass seconds, timed pass seconds) of Seq2SeqTrainer over the batches, twice."""
    import torch
    from transformers import (
        AutoTokenizer,
        DataCollatorForSeq2Seq,
        Seq2SeqTrainer,
        Seq2SeqTrainingArguments,
        TrainerCallback,
    )

    on_gpu = torch.cuda.is_available()
    sync = torch.cuda.synchronize if on_gpu else (lambda: None)
    model = build_arch(args.arch, "cuda" if on_gpu else "cpu")
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    collator = DataCollatorForSeq2Seq(tokenizer, model=model, pad_to_multiple_of=8 if on_gpu else None)
    n = len(batch_list)
    marks: dict[int, float] = {}

    class Clock(TrainerCallback):
        def on_train_begin(self, *_args, **_kwargs):
            sync()
            marks[0] = time.perf_counter()

        def on_step_end(self, _args, state, *_rest, **_kwargs):
            if state.global_step in (n, 2 * n):
                sync()
                marks[state.global_step] = time.perf_counter()

    class SameBatches(Seq2SeqTrainer):
        def get_train_dataloader(self):  # the product's batches, in its order, twice
            return torch.utils.data.DataLoader(examples, batch_sampler=batch_list * 2, collate_fn=collator)

    training_args = Seq2SeqTrainingArguments(
        output_dir=tempfile.mkdtemp(prefix="trainer-"),
        per_device_train_batch_size=args.batch,
        max_steps=2 * n,
        learning_rate=1e-4,
        lr_scheduler_type="constant",
        max_grad_norm=1.0,
        bf16=True,
        torch_compile=args.compile,
        logging_steps=10**6,
        save_strategy="no",
        report_to=[],
        use_cpu=not on_gpu,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    SameBatches(model=model, args=training_args, data_collator=collator, callbacks=[Clock()]).train()
    return marks[n] - marks[0], marks[2 * n] - marks[n]


# ---------------------------------------------------------------- the profile


def profile_summary(prof, steps: int) -> dict:
    """What a trace of ``steps`` steady steps says: GPU busy fraction (union of kernel intervals
    over the traced wall time), kernels per step, the top CUDA kernels, the attention kernels
    (SDPA: flash / memory-efficient / cudnn / math), time in host syncs."""
    events = prof.events()
    kernels = [e for e in events if e.device_type.name == "CUDA"]
    spans = sorted((e.time_range.start, e.time_range.end) for e in kernels)
    busy, end = 0.0, None
    for start, stop in spans:
        if end is None or start > end:
            busy += stop - start
            end = stop
        elif stop > end:
            busy += stop - end
            end = stop
    cpu = [e for e in events if e.device_type.name == "CPU"]
    wall = max((e.time_range.end for e in cpu), default=0) - min((e.time_range.start for e in cpu), default=0)
    by_name = Counter()
    count = Counter()
    for e in kernels:
        by_name[e.name] += e.time_range.elapsed_us()
        count[e.name] += 1
    attention = sorted(
        {
            e.name[:120]
            for e in kernels
            if any(key in e.name.lower() for key in ("fmha", "flash", "attention", "efficient", "cudnn_sdpa"))
        }
    )
    syncs = [e for e in cpu if e.name in SYNC_EVENTS]
    dtoh = [e for e in kernels if "DtoH" in e.name]
    scalars = [e for e in cpu if e.name == "aten::_local_scalar_dense"]  # .item() and the like
    return {
        "steps": steps,
        "wall_ms_per_step": wall / 1e3 / steps,
        "gpu_busy_fraction": busy / wall if wall and kernels else None,  # None: no GPU traced
        "kernels_per_step": len(kernels) / steps,
        "top_kernels": [
            {"name": name[:100], "ms_per_step": us / 1e3 / steps, "calls_per_step": count[name] / steps}
            for name, us in by_name.most_common(10)
        ],
        "attention_kernels": attention,
        "sync_calls_per_step": len(syncs) / steps,
        "sync_ms_per_step": sum(e.time_range.elapsed_us() for e in syncs) / 1e3 / steps,
        "dtoh_copies_per_step": len(dtoh) / steps,
        "scalar_reads_per_step": len(scalars) / steps,
    }


# ---------------------------------------------------------------- entry


def worker_step(args: argparse.Namespace) -> None:
    """One variant: two passes over the fixed batches, the second timed; then memory and profile."""
    import torch

    per_batch = max(args.batch, (args.tokens or 0) // 64)  # a budget's short dialogues come in many
    examples = synthetic_token_examples(args.steps * per_batch * 2, 32128 if args.arch != "tiny" else 1000)
    batch_list = fixed_batches(examples, args.batch, args.steps, args.tokens, args.compile)
    on_gpu = torch.cuda.is_available()
    sync = torch.cuda.synchronize if on_gpu else (lambda: None)
    name = f"{args.variant} {'compiled' if args.compile else 'eager'}"
    result = {"kind": "step", "variant": args.variant, "compiled": args.compile, "batch": args.batch}
    result["micro_batch_tokens"] = args.tokens
    result["arch"] = args.arch
    if args.variant == "trainer":
        warm, timed = trainer_pass_seconds(args, examples, batch_list)
    else:
        step = product_runner(args, examples)
        sync()
        start = time.perf_counter()
        for indices in batch_list:
            step(indices)
        sync()
        warm = time.perf_counter() - start
        for indices in batch_list:
            step(indices)
        sync()
        timed = time.perf_counter() - start - warm
        if args.compile:
            from launcher.rank.compiling import compiled_graphs

            result["compiled_graphs"] = compiled_graphs()
        if on_gpu:
            torch.cuda.reset_peak_memory_stats()
            step(longest(batch_list, examples))
            sync()
            result["longest_batch_peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    result.update(figures(examples, batch_list, timed, flop_counts(build_arch(args.arch, "meta")), on_gpu))
    result["warmup_pass_s"] = warm
    result["name"] = name
    emit(result)
    if args.profile and args.variant == "product":
        emit(
            {"kind": "profile", "name": name, "batch": args.batch, **profile_steps(step, batch_list, on_gpu)}
        )


def profile_steps(step, batch_list, on_gpu: bool) -> dict:
    import torch
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_gpu else [])
    traced = (batch_list * PROFILED_STEPS)[:PROFILED_STEPS]  # shapes the timed passes compiled already
    with profile(activities=activities, record_shapes=False) as prof:
        for indices in traced:
            step(indices)
        if on_gpu:
            torch.cuda.synchronize()
    return profile_summary(prof, len(traced))
