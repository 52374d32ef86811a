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
import collections
import functools
import json
import os
import time
from dataclasses import dataclass
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


@dataclass
class Allocations:
    """The profiler's CPU allocation events (``profile_memory``) in time order, and the
    ``record_function`` spans they fall in.

    Replayed by address, not by summing sizes: the profiler misses some frees (tensors freed on
    threads it does not trace, e.g. inside DeepSpeed's communication), and a plain running sum of
    +size/-size then only grows (by ~0.9 x 10^9 bytes over two steps of the 4-layer shape). An
    address the allocator hands out again was free, so an allocation at a still-live address
    first drops the old one (``unseen_frees``: the bytes dropped so)."""

    events: list[tuple[int, int, int, object]]  # (time ns, address, +bytes or -bytes, the event)
    spans: dict[str, tuple[int, int]]

    @classmethod
    def of(cls, prof) -> Allocations:
        from torch._C._profiler import _EventType

        events, spans, stack = [], {}, list(prof.profiler.kineto_results.experimental_event_tree())
        while stack:
            event = stack.pop()
            if event.typed[0] == _EventType.Allocation:
                fields = event.typed[1]
                if fields.device.type == "cpu":
                    events.append((event.start_time_ns, fields.ptr, fields.alloc_size, event))
            elif event.name.startswith("ftlaunch_"):
                spans[event.name] = (event.start_time_ns, event.end_time_ns)
            stack.extend(event.children)
        return cls(sorted(events, key=lambda e: e[0]), spans)

    def replay(self):
        """(time, live bytes, live allocations by address, bytes dropped as unseen frees so far)
        after each event; the dict is shared."""
        live: dict[int, tuple[int, int, object]] = {}
        total = unseen = 0
        for at, ptr, size, event in self.events:
            if ptr in live:
                old = live.pop(ptr)[0]
                total -= old
                if size > 0:
                    unseen += old
            if size > 0:
                live[ptr] = (size, at, event)
                total += size
            yield at, total, live, unseen

    @functools.cached_property
    def unseen_frees(self) -> int:
        """Bytes the replay dropped because their address was handed out again."""
        last = collections.deque(self.replay(), maxlen=1)
        return last[0][3] if last else 0

    def peaks(self, marker: str) -> tuple[int, int, int]:
        """(peak before ``marker`` began, peak from then on, live at the end): the CPU analog of
        CUDA's max_memory_allocated, counted from the profiler's start."""
        start = self.spans[marker][0]
        before = after = total = 0
        for at, total, _live, _unseen in self.replay():
            if at < start:
                before = max(before, total)
            else:
                after = max(after, total)
        return before, after, total

    def phase_peaks(self, prefix: str) -> dict[str, list[int]]:
        """For each span named prefix + phase: [live bytes when it began, the most during it]."""
        spans = sorted(
            (b, e, name.removeprefix(prefix))
            for name, (b, e) in self.spans.items()
            if name.startswith(prefix)
        )
        peaks: dict[str, list[int]] = {}
        for at, total, _live, _unseen in self.replay():
            for begin, end, name in spans:
                if at < begin:
                    peaks[name] = [total, total]
                elif at <= end:
                    peaks.setdefault(name, [total, total])
                    peaks[name][1] = max(peaks[name][1], total)
        return peaks

    def attribution(self, span: str, limit: int = 12) -> list[str]:
        """Who holds the bytes at ``span``'s highest point: the live allocations grouped by the
        phase that made them (setup or a ``ftlaunch_phase_`` span), the autograd function and
        the ops around the allocation."""
        from collections import Counter

        begin, end = self.spans[span]
        best, snapshot = -1, {}
        for at, total, live, _unseen in self.replay():
            if begin <= at <= end and total > best:
                best, snapshot = total, dict(live)
        groups: Counter[str] = Counter()
        for size, at, event in snapshot.values():
            groups[self.label(event, at)] += size
        rows = [f"{span}: {best / 1e9:.3f} x 10^9 bytes live at its peak"]
        return rows + [
            f"  {size / 1e9:.3f}  {what}" for what, size in groups.most_common(limit) if size >= 1e6
        ]

    def label(self, event, time: int) -> str:
        from torch._C._profiler import _EventType

        phases = (n for n, (b, e) in self.spans.items() if n.startswith("ftlaunch_phase_") and b <= time <= e)
        phase = next(phases, "setup").removeprefix("ftlaunch_phase_")
        ops, grad_fn, node = [], "", event.parent
        while node is not None:
            if node.name.startswith("autograd::engine::evaluate_function: "):
                grad_fn = grad_fn or node.name.rsplit(": ", 1)[1]
            elif (
                node.typed[0] == _EventType.TorchOp and not node.name.startswith("ftlaunch_") and len(ops) < 4
            ):
                ops.append(node.name)
            node = node.parent
        return f"{phase} | {grad_fn or '-'} | {' < '.join(ops) or '-'}"


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

    from launcher.core.recipe_loading import read_run_recipe
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
    optimizer = build_optimizer(model, recipe, accelerator.device)  # as train.py builds it (fused AdamW)
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
    allocations = Allocations.of(prof)
    tensors_load, tensors_train, tensors_end = allocations.peaks("ftlaunch_bench_train")
    phase_peaks = allocations.phase_peaks("ftlaunch_phase_")
    attribution = [
        row for step in range(steps) for row in allocations.attribution(f"ftlaunch_phase_backward{step}")
    ]
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
        "unseen_frees": allocations.unseen_frees,
        "attribution": attribution,
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
        "attribution": ranks[0]["attribution"],
        "unseen_frees": max(r["unseen_frees"] for r in ranks),
        "estimate_total": row.total_gib * GIB,
        "estimate_states": row.model_states_gib * GIB,
        "estimate_activations": row.activations_gib * GIB,
        "wall_s": record.wall_s,
    }


def report(args, results: dict[bool, dict], params: int, wall_s: float) -> str:
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
        "- the profiler misses some frees (threads it does not trace): allocations are replayed by address,\n"
        "  and an address handed out again drops the allocation it held (up to "
        f"{max(r['unseen_frees'] for r in results.values()) / 1e9:.2f} x 10^9 bytes per rank here; a plain\n"
        "  running sum of the events would count them as live).\n"
        f"- {wall_s:.0f} s wall\n"
        + "".join(
            f"\n## Who holds the bytes at each backward's peak, {'with' if c else 'without'} checkpointing "
            "(rank 0; phase that allocated | autograd function | ops, 10^9 bytes)\n\n"
            "Accelerate's `backward` under DeepSpeed also runs the engine's step (the optimizer step):\n"
            "a peak in `backward` may be the step's.\n\n```\n" + "\n".join(r["attribution"]) + "\n```\n"
            for c, r in results.items()
        )
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
    text = report(args, results, params, wall_s=time.time() - started)
    bl.emit(text, args, parser)


if __name__ == "__main__":
    main()
