"""ZeRO memory: per-rank bytes of parameters, gradients and optimizer state, measured from the
tensors each rank actually holds under DDP and ZeRO-1/2/3 with 2 CPU ranks, beside DeepSpeed's
estimator and the ZeRO paper's formulas.

For each stage the configs come from the product: ``ftlaunch full --dry-run --cpu --gpus 2
--zero N --model DIR`` renders accelerate.yaml + deepspeed.json; this script is then started by
``accelerate launch --config_file RUN/accelerate.yaml bench/zero_memory.py --worker --run-dir RUN``
and builds what the loop builds (``build_accelerator``, ``build_model``, ``build_optimizer``,
``accelerator.prepare``). After one optimizer step it runs a second forward + backward and,
before that step's update, walks every tensor the rank holds:

  parameters  module parameters (their storage: ZeRO-1/2's bit16 flat groups, ZeRO-3's ds_tensor)
  gradients   param.grad, DeepSpeed's averaged/partitioned gradient buffers, reduce buckets
  optimizer   fp32 master partitions (DeepSpeed) + the AdamW state (exp_avg, exp_avg_sq, step)

Storages are counted once (views share them). DDP's reducer buckets (another 4Ψ of fp32
gradients, C++-owned) are not reachable from Python and are left out: DDP's measured figure is
therefore a lower bound, and DeepSpeed's estimator's 20Ψ for DDP includes them.

  python bench/zero_memory.py            # 4 launches with 2 ranks each, ~2 min
  python bench/zero_memory.py --quick    # smaller model (tests/test_bench.py)
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import benchlib as bl

STAGES = (0, 1, 2, 3)
QUICK_CONFIG = dict(bl.BENCH_T5_CONFIG, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_decoder_layers=2)


# ---------------------------------------------------------------- worker (every rank)


class Ledger:
    """Unique storages by category; the first category that reaches a storage owns it."""

    def __init__(self) -> None:
        self.seen: dict[int, str] = {}
        self.bytes: dict[str, int] = {"parameters": 0, "gradients": 0, "optimizer": 0, "other": 0}
        self.where: dict[str, list[str]] = {k: [] for k in self.bytes}

    def add(self, tensor, category: str, path: str) -> None:
        import torch

        if not isinstance(tensor, torch.Tensor) or tensor.device.type == "meta":
            return
        storage = tensor.untyped_storage()
        key = storage.data_ptr()
        if key == 0 or storage.nbytes() == 0 or key in self.seen:
            return
        self.seen[key] = category
        self.bytes[category] += storage.nbytes()
        if len(self.where[category]) < 12:
            self.where[category].append(
                f"{path}:{tuple(tensor.shape)}:{str(tensor.dtype).removeprefix('torch.')}"
            )


def walk(obj, path: str, ledger: Ledger, depth: int = 0, seen: set | None = None) -> None:
    """Every tensor reachable from a DeepSpeed optimizer object, classified by attribute name."""
    import torch

    seen = seen if seen is not None else set()
    if depth > 4 or id(obj) in seen:
        return
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        low = path.lower()
        if "grad" in low or "ipg" in low:
            category = "gradients"
        elif "fp32" in low or "exp_avg" in low or ".state" in low:
            category = "optimizer"
        elif "bit16" in low or "fp16" in low or "bf16" in low or "param" in low:
            category = "parameters"
        else:
            category = "other"
        ledger.add(obj, category, path)
        if obj.grad is not None:
            ledger.add(obj.grad, "gradients", path + ".grad")
        return
    if isinstance(obj, dict):
        for key, value in list(obj.items())[:100000]:
            walk(
                value,
                f"{path}[{key if isinstance(key, (str, int)) else type(key).__name__}]",
                ledger,
                depth + 1,
                seen,
            )
    elif isinstance(obj, (list, tuple)):
        for i, value in enumerate(obj):
            walk(value, f"{path}[{i}]", ledger, depth + 1, seen)
    elif type(obj).__module__.startswith(("deepspeed", "torch.optim")) and hasattr(obj, "__dict__"):
        for key, value in vars(obj).items():
            if isinstance(value, torch.nn.Module):
                continue  # the model is walked separately
            walk(value, f"{path}.{key}", ledger, depth + 1, seen)


def measure(model, optimizer, accelerator) -> dict:
    from launcher.rank.distributed import uses_deepspeed

    ledger = Ledger()
    module = accelerator.unwrap_model(model)
    for name, param in module.named_parameters():
        ledger.add(getattr(param, "ds_tensor", None), "parameters", f"{name}.ds_tensor")
        ledger.add(param.data, "parameters", name)
    for name, param in module.named_parameters():
        ledger.add(param.grad, "gradients", f"{name}.grad")
    inner = optimizer.optimizer if hasattr(optimizer, "optimizer") else optimizer  # accelerate's wrapper
    if uses_deepspeed(accelerator):
        zero = model.optimizer  # DeepSpeed's ZeRO optimizer (owns the flat partitions)
        base = getattr(zero, "optimizer", None)
        if base is not None:
            for pid, state in base.state.items():
                for key, value in state.items():
                    ledger.add(value, "optimizer", f"adamw.state[{id(pid) % 10000}].{key}")
            for group in base.param_groups:  # the fp32 master partitions AdamW updates
                for master in group["params"]:
                    ledger.add(master, "optimizer", "fp32_master")
                    ledger.add(master.grad, "gradients", "fp32_master.grad")
        walk(zero, "zero_optimizer", ledger)
    else:
        for state in inner.state.values():
            for key, value in state.items():
                ledger.add(value, "optimizer", f"adamw.state.{key}")
    return {"bytes": ledger.bytes, "where": ledger.where}


def worker(run_dir: Path) -> None:
    import torch

    from launcher.core.recipe_loading import read_run_recipe
    from launcher.rank.distributed import build_accelerator, uses_deepspeed
    from launcher.rank.model import build_model, count_parameters
    from launcher.rank.optimization import build_optimizer

    recipe = read_run_recipe(run_dir)
    accelerator = build_accelerator(recipe)
    model = build_model(recipe, vocab_size=0)
    params = count_parameters(model)[1]
    optimizer = build_optimizer(model, recipe, accelerator.device)  # as train.py builds it (fused AdamW)
    model, optimizer = accelerator.prepare(model, optimizer)
    deepspeed = uses_deepspeed(accelerator)
    generator = torch.Generator().manual_seed(accelerator.process_index)
    vocab = accelerator.unwrap_model(model).config.vocab_size

    def batch():
        ids = torch.randint(2, vocab, (recipe.train.micro_batch_size, 64), generator=generator)
        labels = torch.randint(2, vocab, (recipe.train.micro_batch_size, 16), generator=generator)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}

    model.train()
    loss = model(**batch()).loss
    accelerator.backward(loss)  # DeepSpeed: backward + step
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    after_step = measure(model, optimizer, accelerator)
    loss = model(**batch()).loss
    if deepspeed:
        model.backward(loss)  # the engine's backward only: gradients reduced/partitioned, not yet applied
    else:
        accelerator.backward(loss)
    during = measure(model, optimizer, accelerator)
    if deepspeed:
        model.step()
    else:
        optimizer.step()
    payload = {
        "rank": accelerator.process_index,
        "world": accelerator.num_processes,
        "params": params,
        "deepspeed": deepspeed,
        "during": during,
        "after_step": after_step,
    }
    (run_dir / f"memory-rank{accelerator.process_index}.json").write_text(json.dumps(payload))
    accelerator.wait_for_everyone()
    accelerator.end_training()


# ---------------------------------------------------------------- driver


def paper_bytes(stage: int, psi: int, n: int) -> float:
    """ZeRO paper, mixed-precision Adam (K = 12): DDP 16Ψ, P_os 4Ψ + 12Ψ/N, P_os+g 2Ψ + 14Ψ/N, P_os+g+p 16Ψ/N."""
    return {0: 16 * psi, 1: 4 * psi + 12 * psi / n, 2: 2 * psi + 14 * psi / n, 3: 16 * psi / n}[stage]


def size_buckets(deepspeed_json: Path, d_model: int) -> dict:
    """What-if: the bucket sizes Hugging Face's "auto" would give this model (d = hidden size):
    reduce_bucket_size d^2, stage3_prefetch_bucket_size 0.9 d^2, stage3_param_persistence_threshold 10 d."""
    config = json.loads(deepspeed_json.read_text())
    zero = config["zero_optimization"]
    zero["reduce_bucket_size"] = d_model * d_model
    if zero.get("stage") == 3:
        zero["stage3_prefetch_bucket_size"] = int(0.9 * d_model * d_model)
        zero["stage3_param_persistence_threshold"] = 10 * d_model
    else:
        zero["allgather_bucket_size"] = d_model * d_model
    deepspeed_json.write_text(json.dumps(config, indent=2))
    return {k: v for k, v in zero.items() if "bucket" in k or "persistence" in k}


def run_stage(stage: int, args, variant: str = "as rendered") -> list[dict]:
    out = args.work / (f"zero{stage}" + ("-auto" if variant != "as rendered" else ""))
    env = bl.bench_env(1)
    bl.check(
        bl.run_measured(
            bl.ftlaunch_cmd(
                "full",
                "--dry-run",
                "--cpu",
                "--gpus",
                "2",
                "--zero",
                str(stage),
                "--model",
                str(args.model),
                "--data",
                "sample",
                "--output",
                str(out),
                "--overwrite",
                "--set",
                "model.precision=bf16",
                "--set",
                "train.micro_batch_size=2",
            ),
            env,
        ),
        f"render zero {stage}",
    )
    if variant != "as rendered":
        args.auto_buckets[stage] = size_buckets(out / "deepspeed.json", args.d_model)
    for old in out.glob("memory-rank*.json"):
        old.unlink()
    return bl.run_rank_workers(str(Path(__file__).resolve()), out, env, "memory-rank*.json", f"zero {stage}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", action="store_true", help="(internal) run as one rank")
    parser.add_argument("--run-dir", type=Path)
    parser.add_argument("--work", type=Path, default=Path("/tmp/ftlaunch-bench/zero_memory"))
    parser.add_argument("--stages", type=int, nargs="*", default=list(STAGES))
    parser.add_argument(
        "--what-if",
        type=int,
        nargs="*",
        default=[3],
        help="stages to run again with bucket sizes scaled to the model (HF's auto rule)",
    )
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", type=Path, default=bl.RESULTS_DIR / "zero_memory.md")
    args = parser.parse_args(argv)
    if args.worker:
        from launcher.core.ranklog import exit_rank

        worker(args.run_dir.resolve())
        exit_rank(0)  # as the product's ranks: no interpreter teardown (~3 s per rank and stage)
    started = time.time()
    args.work = args.work.resolve()
    args.work.mkdir(parents=True, exist_ok=True)
    config = QUICK_CONFIG if args.quick else bl.BENCH_T5_CONFIG
    args.model = bl.save_bench_model(args.work / ("model-quick" if args.quick else "model"), 8100, config)
    from launcher.host.estimate import model_state_bytes

    args.d_model, args.auto_buckets = config["d_model"], {}
    results = {(stage, "as rendered"): run_stage(stage, args) for stage in args.stages}
    for stage in args.what_if:
        results[(stage, "buckets sized to the model")] = run_stage(stage, args, "auto")
    ddp_psi = results[(0, "as rendered")][0]["params"] if (0, "as rendered") in results else None
    rows, per_rank = [], {}
    for (stage, variant), ranks in results.items():
        psi = ranks[0]["params"]
        during = [r["during"]["bytes"] for r in ranks]
        total = max(sum(d[k] for k in ("parameters", "gradients", "optimizer")) for d in during)
        per_rank[(stage, variant)] = (total, psi)
        after = max(
            sum(r["after_step"]["bytes"][k] for k in ("parameters", "gradients", "optimizer")) for r in ranks
        )
        est_gpu, _ = model_state_bytes(
            stage, "none", params=psi, gpus=2, nodes=1, largest_layer=8100 * config["d_model"]
        )
        name = ("DDP" if stage == 0 else f"ZeRO-{stage}") + (
            "" if variant == "as rendered" else f" ({variant})"
        )
        flag = "" if ddp_psi in (None, psi) else " (lm_head tied!)"
        rows.append(
            [
                name,
                f"{psi:,}{flag}",
                " / ".join(f"{d['parameters'] / psi:.2f}" for d in during),
                " / ".join(f"{d['gradients'] / psi:.2f}" for d in during),
                " / ".join(f"{d['optimizer'] / psi:.2f}" for d in during),
                f"{total / psi:.2f}Ψ = {total / 2**20:.1f} MiB",
                f"{after / psi:.2f}Ψ",
                f"{est_gpu / psi:.2f}Ψ",
                f"{paper_bytes(stage, psi, 2) / psi:.2f}Ψ",
            ]
        )
    lines = [
        bl.md_table(
            [
                "strategy (2 ranks)",
                "Ψ (parameters)",
                "parameters (rank 0 / 1, bytes/Ψ)",
                "gradients",
                "optimizer",
                "model states per rank (measured, max over ranks)",
                "between steps",
                "ftlaunch estimate (with transients)",
                "ZeRO paper",
            ],
            rows,
        )
    ]
    goal = []
    if (0, "as rendered") in per_rank:
        ddp_total, ddp_psi = per_rank[(0, "as rendered")]
        for (stage, variant), (total, psi) in per_rank.items():
            if stage != 3:
                continue
            absolute, normalised = total / ddp_total, (total / psi) / (ddp_total / ddp_psi)
            goal.append(
                f"- ZeRO-3 {variant}: per-rank model states / DDP's = **{absolute:.3f}x** in bytes, "
                f"**{normalised:.3f}x** per parameter -> {'met' if normalised <= 0.55 else 'MISSED'} "
                "(goal <= 0.55x at 2 ranks)"
            )
    if args.auto_buckets:
        goal.append(f"- what-if bucket sizes (d_model {args.d_model}): {json.dumps(args.auto_buckets)}")
    where = ["", "Where the bytes are (rank 0, first tensors of each category):", ""]
    for (stage, variant), ranks in results.items():
        w = ranks[0]["during"]["where"]
        where.append(
            f"- {'DDP' if stage == 0 else f'ZeRO-{stage}'} {variant}: "
            + "; ".join(f"{k}: {', '.join(v[:4])}" for k, v in w.items() if v)
        )
    notes = [
        f"model: random-init T5 (FLAN-T5 family) {json.dumps({k: config[k] for k in ('d_model', 'd_ff', 'num_layers')})}, "
        f"vocab 8100, Ψ = {ddp_psi or psi:,} parameters (fewer where a row says lm_head tied); precision bf16 autocast over fp32 weights "
        "and gradients for every strategy (DeepSpeed as rendered: bf16 off, torch_autocast on; plus its fp32 master partitions), AdamW, micro batch 2, 2 CPU ranks (gloo)",
        f"configs rendered by `ftlaunch full --dry-run --cpu --gpus 2 --zero N`; {time.time() - started:.0f} s wall "
        "(sizes are exact: no timing noise)",
    ]
    text = "\n".join(
        [
            bl.header(
                "ZeRO memory per rank: measured tensors vs ftlaunch estimate vs the ZeRO paper",
                bl.command_line(),
                notes,
            ),
            "## Results (bytes per parameter, Ψ = parameters; measured after the 2nd backward, before its update)",
            "",
            *lines,
            "",
            *goal,
            "",
            "- DDP holds fp32 weights (4Ψ), fp32 gradients (4Ψ) and Adam's two fp32 moments (8Ψ) on every rank = 16Ψ,",
            "  the paper's figure (its 2Ψ + 2Ψ + 12Ψ in fp16 terms); DDP's reducer buckets (+4Ψ) are not reachable here.",
            "- ftlaunch estimate (launcher/host/estimate.py) counts the fp32 layouts measured here plus the largest transient",
            "  (ZeRO-3's gathered weights + one layer's gradient, or the step's gradient copy 4Ψ/N; DDP's buckets), so it",
            "  sits above this walk, which is taken before the update; the paper counts neither.",
            "- 'between steps' is the same walk after optimizer.step() + zero_grad(): gradients released.",
            "- ZeRO-3 bucket sizes: rendering sizes `reduce_bucket_size`, `stage3_prefetch_bucket_size` and",
            "  `stage3_param_persistence_threshold` from the model's d_model (Hugging Face's `auto` rule: d^2, 0.9 d^2, 10 d;",
            "  `launcher/host/render.py` `fill_bucket_sizes`). Before that fix the templates' fixed 5e7-element bucket kept 95 MiB",
            "  per rank whatever the model, and ZeRO-3 measured 2.05x DDP's bytes on this model (goal missed); the",
            "  'buckets sized to the model' row is the same what-if, and now agrees with the rendered config.",
            "- All rows hold the same Ψ: loaded under ZeRO-3 the model keeps its own lm_head (fixed in `launcher/rank/model.py`;",
            "  before, ZeRO-3 tied it to the embedding and dropped vocab x d_model parameters).",
            "- ZeRO-1 and ZeRO-2 measure the same: in DeepSpeed 0.19 both reduce gradients into rank-partitioned",
            "  buffers (`averaged_gradients`) during backward; the paper's ZeRO-1 keeps whole 16-bit gradients (10Ψ).",
            *where,
        ]
    )
    bl.emit(text, args, parser)


if __name__ == "__main__":
    main()
