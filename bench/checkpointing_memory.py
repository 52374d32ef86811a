"""Peak memory per rank of a flan-t5-large-shaped model under ZeRO-3 with gradient checkpointing,
measured on 2 CPU ranks, beside what ``ftlaunch estimate`` says for that shape.

The model: flan-t5-large's config (launcher.host.estimate.FLAN_T5_CONFIGS: d_model 1024, d_ff 2816,
16 heads, vocab 32128, its own lm_head) with random weights, saved with ``save_pretrained`` and
passed as ``--model DIR``; ``--layers N`` keeps flan-t5-large's width with N layers per stack
(24 = the real depth; fewer when memory or time is short: the result says which).

The method is bench/zero_memory.py's: ``ftlaunch full --dry-run --cpu --gpus 2 --zero 3 --model
DIR --set train.gradient_checkpointing=true`` renders accelerate.yaml + deepspeed.json, and
``accelerate launch`` starts this script as each rank, which builds what the loop builds
(``build_accelerator``, ``build_model``, ``build_optimizer``, ``accelerator.prepare``) and runs
``--steps`` optimizer steps of the loop's objective (``summed_cross_entropy``) on random
micro-batches of exactly ``--micro-batch`` x ``--source-len`` / ``--target-len`` tokens, the
shape the estimate is asked about.

What is measured (per rank, from /proc/self/status): the resident-set high-water mark (VmHWM)
during the training steps, minus the resident set before the model was built (libraries, the
interpreter). The high-water mark is reset (``clear_refs`` 5) after ``prepare``, so loading the
weights (a transient the estimate does not model) is reported apart; glibc is asked to return
freed memory (``malloc_trim``) before each reading. The estimate's figure is the ZeRO-3 row
(no offload) of ``ftlaunch estimate --model DIR --gpus 2 --micro-batch B --source-len S
--target-len T --gradient-checkpointing``: model states (DeepSpeed's estimator) + activations.

  python bench/checkpointing_memory.py                         # flan-t5-large width, 4+4 layers
  python bench/checkpointing_memory.py --layers 2 --quick      # what tests/test_gradient_checkpointing.py runs
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import benchlib as bl

LARGE = "google/flan-t5-large"
GIB = 2**30


# ---------------------------------------------------------------- worker (every rank)


def status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def settle() -> int:
    """Resident bytes now, after glibc returned what it can."""
    import ctypes
    import gc

    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    return status_kib("VmRSS") * 1024


def reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # Linux >= 4.0: VmHWM := VmRSS


def tensor_peaks(prof, marker: str) -> tuple[int, int, int]:
    """(peak before ``marker``, peak from ``marker`` on, live at the end) of the bytes held by
    tensors on the CPU, from the profiler's allocation events (``profile_memory``): the CPU
    analog of CUDA's max_memory_allocated, counted from the profiler's start."""
    events = list(prof.profiler.kineto_results.events())
    start = min(e.start_ns() for e in events if e.name() == marker)
    live = before = after = 0
    for event in sorted((e for e in events if e.name() == "[memory]"), key=lambda e: e.start_ns()):
        if event.device_type().name != "CPU":
            continue
        live += event.nbytes()
        if event.start_ns() < start:
            before = max(before, live)
        else:
            after = max(after, live)
    return before, after, live


def tensor_phase_peaks(prof, prefix: str) -> dict[str, list[int]]:
    """For each ``record_function`` span named prefix + phase: [live tensor bytes when it began,
    the most during it], from the same allocation events as ``tensor_peaks`` (where the peak falls)."""
    events = list(prof.profiler.kineto_results.events())
    spans = sorted(
        (e.start_ns(), e.end_ns(), e.name()[len(prefix) :]) for e in events if e.name().startswith(prefix)
    )
    memory = sorted(
        (e.start_ns(), e.nbytes()) for e in events if e.name() == "[memory]" and e.device_type().name == "CPU"
    )
    peaks: dict[str, list[int]] = {}
    live, index = 0, 0
    for start, end, name in spans:
        while index < len(memory) and memory[index][0] < start:
            live += memory[index][1]
            index += 1
        most = begin = live
        while index < len(memory) and memory[index][0] <= end:
            live += memory[index][1]
            most = max(most, live)
            index += 1
        peaks[name] = [begin, most]
    return peaks


def held_after_backward(model) -> dict[str, int]:
    """Elements still held when backward returns: full-size ``param.grad`` and ZeRO-3 gathered
    weights (``ds_status`` AVAILABLE, persistent small ones included)."""
    grads = gathered = 0
    for param in model.parameters():
        if param.grad is not None:
            grads += param.grad.numel()
        if getattr(param, "ds_status", None) is not None and param.ds_status.name == "AVAILABLE":
            gathered += param.ds_numel
    return {"grad_elements": grads, "gathered_elements": gathered}


def largest_live(limit: int = 12) -> list[str]:
    """The largest tensor storages Python can reach now (dtype, shape, MiB): where the bytes are."""
    import gc

    import torch

    seen: dict[int, tuple[int, str]] = {}
    for obj in gc.get_objects():
        try:
            if isinstance(obj, torch.Tensor) and obj.device.type == "cpu":
                storage = obj.untyped_storage()
                seen.setdefault(storage.data_ptr(), (storage.nbytes(), f"{obj.dtype} {tuple(obj.shape)}"))
        except Exception:  # noqa: BLE001 (meta / sparse / freed tensors)
            continue
    total = sum(size for size, _ in seen.values())
    top = sorted(seen.values(), reverse=True)[:limit]
    return [f"total {total / 2**20:.0f} MiB"] + [f"{what}: {size / 2**20:.1f} MiB" for size, what in top]


def worker(run_dir: Path, steps: int, source_len: int, target_len: int) -> None:
    import torch

    from launcher.core.recipe import read_run_recipe
    from launcher.rank.distributed import build_accelerator
    from launcher.rank.model import build_model, checkpointed_layers, count_parameters
    from launcher.rank.train import build_optimizer, summed_cross_entropy

    recipe = read_run_recipe(run_dir)
    accelerator = build_accelerator(recipe)
    baseline = settle()
    reset_peak()
    from torch.profiler import ProfilerActivity, profile, record_function

    prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
    prof.__enter__()
    model = build_model(recipe, vocab_size=0)
    params = count_parameters(model)[1]
    optimizer = build_optimizer(model, recipe)
    model, optimizer = accelerator.prepare(model, optimizer)
    load_peak = status_kib("VmHWM") * 1024
    prepared = settle()
    reset_peak()
    generator = torch.Generator().manual_seed(accelerator.process_index)
    vocab = accelerator.unwrap_model(model).config.vocab_size
    micro = recipe.train.micro_batch_size
    model.train()
    losses, phases = [], []
    marker = record_function("ftlaunch_bench_train")
    marker.__enter__()
    for _ in range(steps):
        ids = torch.randint(2, vocab, (micro, source_len), generator=generator)
        labels = torch.randint(2, vocab, (micro, target_len), generator=generator)
        decoder_ids = torch.cat([torch.zeros_like(labels[:, :1]), labels[:, :-1]], dim=1)
        batch = {
            "input_ids": ids,
            "attention_mask": torch.ones_like(ids),
            "decoder_input_ids": decoder_ids,
            "labels": labels,
        }
        step = len(losses)
        with record_function(f"ftlaunch_phase_forward{step}"):
            ce_sum, tokens = summed_cross_entropy(model, batch)
        forward = status_kib("VmHWM") * 1024 - baseline
        with record_function(f"ftlaunch_phase_backward{step}"):
            accelerator.backward(ce_sum / tokens)
        backward = status_kib("VmHWM") * 1024 - baseline
        held = held_after_backward(model)
        with record_function(f"ftlaunch_phase_step{step}"):
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        stepped = status_kib("VmHWM") * 1024 - baseline
        phases.append(
            {"forward": forward, "backward": backward, "step": stepped, "rss_after": settle() - baseline}
            | held
        )
        losses.append(float(ce_sum / tokens))
    train_peak = status_kib("VmHWM") * 1024
    marker.__exit__(None, None, None)
    prof.__exit__(None, None, None)
    tensors_load, tensors_train, tensors_end = tensor_peaks(prof, "ftlaunch_bench_train")
    phase_peaks = tensor_phase_peaks(prof, "ftlaunch_phase_")
    if os.environ.get("CHECKPOINTING_MEMORY_OPS"):  # which ops allocate (diagnosis; slow to build)
        table = prof.key_averages().table(sort_by="self_cpu_memory_usage", row_limit=30)
        (run_dir / f"ops-rank{accelerator.process_index}.txt").write_text(table)
    payload = {
        "rank": accelerator.process_index,
        "world": accelerator.num_processes,
        "params": params,
        "baseline": baseline,
        "load_peak": load_peak - baseline,
        "after_prepare": prepared - baseline,
        "train_peak": train_peak - baseline,
        "losses": losses,
        "phases": phases,
        "tensors_load_peak": tensors_load,
        "tensors_train_peak": tensors_train,
        "tensors_end": tensors_end,
        "largest_live": largest_live(),
        "phase_peaks": phase_peaks,
        "checkpointed_stacks": checkpointed_layers(accelerator.unwrap_model(model)),
    }
    (run_dir / f"peak-rank{accelerator.process_index}.json").write_text(json.dumps(payload))
    accelerator.wait_for_everyone()
    accelerator.end_training()


# ---------------------------------------------------------------- driver


def large_config(layers: int) -> dict:
    from launcher.host.estimate import FLAN_T5_CONFIGS, FLAN_T5_VOCAB

    config = dict(FLAN_T5_CONFIGS[LARGE], num_layers=layers, num_decoder_layers=layers)
    return dict(
        config,
        vocab_size=FLAN_T5_VOCAB,
        feed_forward_proj="gated-gelu",
        is_gated_act=True,
        dense_act_fn="gelu_new",
        tie_word_embeddings=False,
        dropout_rate=0.0,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )


def save_model(out_dir: Path, layers: int) -> Path:
    """flan-t5-large's config at ``layers`` per stack, random init, with the embedded tokenizer."""
    if (out_dir / "config.json").is_file():
        return out_dir
    import torch
    from transformers import AutoTokenizer, T5Config, T5ForConditionalGeneration

    from launcher.core.paths import TINY_TOKENIZER_DIR

    torch.manual_seed(0)
    config = T5Config(**large_config(layers))
    model = T5ForConditionalGeneration(config)
    # FLAN-T5's own lm_head, untied from the embedding (as bench/benchlib.py builds its T5s):
    # T5Config(tie_word_embeddings=False) alone still ties it in transformers 5.
    model.lm_head.weight = torch.nn.Parameter(
        torch.randn(config.vocab_size, config.d_model) * config.d_model**-0.5
    )
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    model.save_pretrained(str(tmp))
    AutoTokenizer.from_pretrained(str(TINY_TOKENIZER_DIR)).save_pretrained(str(tmp))
    tmp.rename(out_dir)
    return out_dir


def estimated(model_dir: Path, micro: int, source_len: int, target_len: int, checkpointing: bool):
    """The ZeRO-3 (no offload) row of ``ftlaunch estimate`` for this shape."""
    from launcher.host.estimate import RunShape, estimate_model

    shape = RunShape(
        gpus=2,
        micro_batch=micro,
        source_len=source_len,
        target_len=target_len,
        gradient_checkpointing=checkpointing,
    )
    rows = estimate_model(str(model_dir), shape)
    return next(row for row in rows if row.stage == 3 and row.offload == "none" and not row.fsdp)


def measure(args, checkpointing: bool) -> dict:
    """Render with the product, run the worker on 2 ranks; the max over ranks of each figure."""
    out = args.work / ("checkpointed" if checkpointing else "plain")
    env = bl.bench_env(1)
    bl.check(
        bl.run_measured(
            bl.ftlaunch_cmd(
                *("full", "--dry-run", "--cpu", "--gpus", "2", "--zero", "3"),
                *("--model", str(args.model), "--data", "sample", "--output", str(out), "--overwrite"),
                *("--set", "model.precision=bf16", "--set", f"train.micro_batch_size={args.micro_batch}"),
                *("--set", f"train.gradient_checkpointing={str(checkpointing).lower()}"),
            ),
            env,
        ),
        "render",
    )
    for old in out.glob("peak-rank*.json"):
        old.unlink()
    record = bl.check(
        bl.run_measured(
            bl.accelerate_cmd(
                *("--config_file", str(out / "accelerate.yaml"), str(Path(__file__).resolve())),
                *("--worker", "--run-dir", str(out), "--steps", str(args.steps)),
                *("--source-len", str(args.source_len), "--target-len", str(args.target_len)),
            ),
            env,
            timeout=args.timeout,
        ),
        "worker",
    )
    ranks = [json.loads(p.read_text()) for p in sorted(out.glob("peak-rank*.json"))]
    if len(ranks) != 2:
        raise SystemExit(f"expected 2 ranks' results, got {len(ranks)}\n{record.stdout[-3000:]}")
    row = estimated(args.model, args.micro_batch, args.source_len, args.target_len, checkpointing)
    keys = (
        "train_peak",
        "load_peak",
        "after_prepare",
        "tensors_train_peak",
        "tensors_end",
        "tensors_load_peak",
    )
    return {
        **{key: max(r[key] for r in ranks) for key in keys},
        "losses": ranks[0]["losses"],
        "params": ranks[0]["params"],
        "largest_live": ranks[0]["largest_live"],
        "checkpointed_stacks": ranks[0]["checkpointed_stacks"],
        "phase_peaks": [r.get("phase_peaks", {}) for r in ranks],
        "estimate_total": row.total_gib * GIB,
        "estimate_states": row.model_states_gib * GIB,
        "estimate_activations": row.activations_gib * GIB,
        "wall_s": record.wall_s,
    }


def report(args, results: dict[bool, dict], params: int) -> str:
    rows = []
    for checkpointing, r in results.items():
        ratio = r["tensors_train_peak"] / r["estimate_total"]
        rows.append(
            [
                "with" if checkpointing else "without",
                f"{r['tensors_train_peak'] / GIB:.3f}",
                f"{r['train_peak'] / GIB:.3f}",
                f"{r['estimate_total'] / GIB:.3f} = {r['estimate_states'] / GIB:.3f} + {r['estimate_activations'] / GIB:.3f}",
                f"{ratio:.2f}",
                "yes" if abs(ratio - 1) <= 0.20 else "no",
                f"{r['tensors_end'] / GIB:.3f}",
                f"{20 * r['params'] / 2 / GIB:.3f}",
                f"{r['tensors_load_peak'] / GIB:.3f}",
                " -> ".join(f"{loss:.2f}" for loss in r["losses"]),
            ]
        )
    table = bl.md_table(
        [
            "gradient checkpointing",
            "measured peak / rank: live tensors (GiB)",
            "peak RSS above start (GiB)",
            "`ftlaunch estimate` ZeRO-3 = states + activations (GiB)",
            "measured / estimate",
            "within 20 %",
            "live tensors after the steps (GiB)",
            "20Ψ/N (GiB)",
            "loading peak, live tensors (GiB)",
            "loss per step",
        ],
        rows,
    )
    first = next(iter(results.values()))
    trained = first["params"]
    notes = [
        f"model: flan-t5-large's config with {args.layers} layers per stack (the real model: 24), random "
        f"init, vocab 32128, own lm_head; Ψ = {trained:,} parameters as trained (estimate's count: {params:,})",
        f"run: ZeRO-3 as rendered by ftlaunch (fp32 weights, gradients and master copy, bf16 torch_autocast), "
        f"2 CPU ranks (gloo), AdamW, micro batch {args.micro_batch}, {args.source_len}/{args.target_len} "
        f"tokens, {args.steps} optimizer steps",
    ]
    largest = "; ".join(first["largest_live"][:7])
    return (
        bl.header(
            "Peak memory per rank: flan-t5-large shape, ZeRO-3, gradient checkpointing",
            bl.command_line(),
            notes,
        )
        + "\n"
        + table
        + "\n\n"
        + "- measured peak = the most bytes held by live CPU tensors at once during the steps, from the torch\n"
        "  profiler's allocation events (the CPU analog of CUDA's max_memory_allocated), max over the 2 ranks;\n"
        "  peak RSS (resident-set high-water mark minus the resident set before the model was built) adds the\n"
        "  allocator's retained memory and library code. The estimate: `ftlaunch estimate --model DIR --gpus 2\n"
        f"  --micro-batch {args.micro_batch} --source-len {args.source_len} --target-len {args.target_len}"
        " [--gradient-checkpointing]`, ZeRO-3 row without offload.\n"
        f"- what is live after the steps (rank 0, Python-reachable storages): {largest}.\n"
        "- loading peak: from_pretrained under zero.Init, before training; the estimate does not model it.\n"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", action="store_true", help="(internal) run as one rank")
    parser.add_argument("--run-dir", type=Path)
    parser.add_argument("--work", type=Path, default=Path("/tmp/ftlaunch-bench/checkpointing_memory"))
    parser.add_argument("--layers", type=int, default=4, help="layers per stack (flan-t5-large: 24)")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--micro-batch", type=int, default=2)
    parser.add_argument("--source-len", type=int, default=256)
    parser.add_argument("--target-len", type=int, default=64)
    parser.add_argument("--without", action="store_true", help="also measure without checkpointing")
    parser.add_argument("--timeout", type=float, default=1800)
    parser.add_argument("--quick", action="store_true", help="print, do not write bench/results")
    parser.add_argument("--json", action="store_true", help="print the measurements as one JSON line")
    parser.add_argument("--out", type=Path, default=bl.RESULTS_DIR / "checkpointing_memory.md")
    args = parser.parse_args()
    if args.worker:
        from launcher.core.ranklog import exit_rank

        worker(args.run_dir.resolve(), args.steps, args.source_len, args.target_len)
        exit_rank(0)
    started = time.time()
    args.work = args.work.resolve()
    args.work.mkdir(parents=True, exist_ok=True)
    args.model = save_model(args.work / f"flan-t5-large-{args.layers}layers", args.layers)
    from launcher.host.estimate import model_spec

    params = model_spec(str(args.model)).params
    results = {True: measure(args, True)}
    if args.without:
        results[False] = measure(args, False)
    if args.json:
        bl.emit_result({str(k): v for k, v in results.items()} | {"params": params})
    text = report(args, results, params) + f"- {time.time() - started:.0f} s wall\n"
    bl.emit(text, args, parser)


if __name__ == "__main__":
    main()
