"""Generation from sharded weights: collectives and time per generation under ZeRO-3 and FSDP2,
with the weights gathered once per generation (``eval.gather_weights=auto``, the default when the
model fits) and per module and token (``false``), against DDP, 2 CPU ranks.

For each contender the configs come from the product (``ftlaunch full --dry-run --cpu --gpus 2
[--zero 3 | --fsdp] --model DIR``); this script is then started by ``accelerate launch
--config_file RUN/accelerate.yaml bench/generation_gather.py --worker --run-dir RUN`` and builds
what the training loop builds (tokenizer, model, optimizer, ``accelerator.prepare``), then runs
the product's own ``generate_predictions`` on the sample test split (13 dialogues, 4 per batch,
so one rank has a batch fewer than the other) twice: once to warm up, once measured. Each rank
counts the collectives it issues (the profiler's ``c10d::`` ops) in a third, untimed generation,
and times the second. The predictions must equal DDP's.

  python bench/generation_gather.py            # bench model (d_model 128, 4+4 layers), ~3 min
  python bench/generation_gather.py --quick    # the embedded tiny model (tests/test_bench.py)
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import benchlib as bl

# (label, ftlaunch flags, eval.gather_weights)
CONTENDERS = (
    ("DDP", (), "auto"),
    ("ZeRO-3, per module", ("--zero", "3"), "false"),
    ("ZeRO-3, gathered", ("--zero", "3"), "auto"),
    ("FSDP2, per module", ("--fsdp",), "false"),
    ("FSDP2, gathered", ("--fsdp",), "auto"),
)
TINY_VOCABULARY = 1000  # the embedded tokenizer's


# ---------------------------------------------------------------- worker (every rank)


def collectives_of(run) -> dict[str, int]:
    """The collectives ``run()`` issues on this rank, by op, as the profiler records them: every
    torch.distributed collective (DeepSpeed's comm layer, FSDP2, Accelerate's gathers) is a
    ``c10d::`` op of the dispatcher, whoever calls it."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        run()
    return {event.key: event.count for event in prof.key_averages() if event.key.startswith("c10d::")}


def worker(run_dir: Path) -> None:
    from launcher.core.recipe_loading import read_run_recipe
    from launcher.rank.distributed import build_accelerator
    from launcher.rank.evaluation import eval_rows, generate_predictions
    from launcher.rank.fsdp import share_input_embedding
    from launcher.rank.model import build_model, load_tokenizer
    from launcher.rank.optimization import build_optimizer

    recipe = read_run_recipe(run_dir)
    accelerator = build_accelerator(recipe)
    tokenizer = load_tokenizer(recipe)
    model = build_model(recipe, len(tokenizer))
    if recipe.launch.fsdp:
        share_input_embedding(model)
    optimizer = build_optimizer(model, recipe, accelerator.device)
    model, optimizer = accelerator.prepare(model, optimizer)
    rows = eval_rows(recipe)

    def generation():
        return generate_predictions(accelerator, model, tokenizer, rows, recipe)

    generation()  # warm-up: first gathers, allocator caches
    accelerator.wait_for_everyone()
    started = time.perf_counter()
    predictions = generation()
    generation_s = time.perf_counter() - started  # this rank's part, up to the final gather
    accelerator.wait_for_everyone()
    counts = collectives_of(generation)  # a third generation, profiled (not timed)
    from torch.distributed.fsdp import FSDPModule

    generator = accelerator.unwrap_model(model)
    payload = {
        "rank": accelerator.process_index,
        "weights": len(list(generator.parameters())),  # tensors a whole gather gathers (each once)
        "units": sum(isinstance(module, FSDPModule) for module in generator.modules()),
        "generation_s": generation_s,
        "collectives": counts,
        "predictions": predictions,
    }
    (run_dir / f"generation-rank{accelerator.process_index}.json").write_text(json.dumps(payload))
    accelerator.wait_for_everyone()
    accelerator.end_training()


# ---------------------------------------------------------------- driver


def run_contender(label: str, flags: tuple[str, ...], gather: str, args) -> list[dict]:
    out = args.work / label.replace(", ", "-").replace(" ", "_")
    shutil.rmtree(out, ignore_errors=True)  # a run directory of this script's own, rendered anew
    env = bl.bench_env(1)
    bl.check(
        bl.run_measured(
            bl.ftlaunch_cmd(
                "full",
                "--dry-run",
                "--cpu",
                "--gpus",
                "2",
                *flags,
                "--model",
                args.model,
                "--data",
                "sample",
                "--output",
                str(out),
                "--overwrite",
                "--set",
                "model.precision=fp32",
                "--set",
                "eval.batch_size=4",
                "--set",
                f"eval.max_new_tokens={args.max_new_tokens}",
                "--set",
                f"eval.gather_weights={gather}",
                "--set",
                "model.tokenizer=tiny-t5",  # the embedded tokenizer (the bench model has none)
            ),
            env,
        ),
        f"render {label}",
    )
    return bl.run_rank_workers(str(Path(__file__).resolve()), out, env, "generation-rank*.json", label)


def report(results: dict[str, list[dict]], args) -> str:
    ddp = results["DDP"]
    rows = []
    for label, ranks in results.items():
        seconds = max(rank["generation_s"] for rank in ranks)
        calls = [sum(rank["collectives"].values()) for rank in ranks]
        same = ranks[0]["predictions"] == ddp[0]["predictions"]
        rows.append(
            [
                label,
                " / ".join(f"{c:,}" for c in calls),
                f"{seconds / max(r['generation_s'] for r in ddp):.2f}x",
                "yes" if same else "**no**",
            ]
        )
    table = bl.md_table(
        ["contender", "collectives per generation (rank 0 / rank 1)", "time vs DDP", "predictions = DDP's"],
        rows,
    )
    notes = [
        f"model: {args.model_label}; 13 test dialogues of the sample, eval.batch_size 4 (4 batches: "
        f"rank 0 generates 2, rank 1 2, the last one 1 example), eval.max_new_tokens {args.max_new_tokens}, fp32",
        "collectives: every torch.distributed collective call a rank makes during one "
        "generate_predictions (the final gather of the predictions included); time: the slower "
        "rank's wall time of the measured (second) generation, as a ratio to DDP's in the same "
        "run (2 ranks on a 2-core machine: noisy, the counts are exact)",
    ]
    return bl.header("Generation from sharded weights (ZeRO-3, FSDP2) vs DDP", bl.command_line(), notes) + (
        table + "\n"
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", action="store_true", help="(internal) run as one rank")
    parser.add_argument("--run-dir", type=Path)
    parser.add_argument("--work", type=Path, default=Path("/tmp/ftlaunch-bench/generation_gather"))
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", type=Path, default=bl.RESULTS_DIR / "generation_gather.md")
    args = parser.parse_args(argv)
    if args.worker:
        from launcher.core.ranklog import exit_rank

        worker(args.run_dir.resolve())
        exit_rank(0)
    args.work = args.work.resolve()
    args.work.mkdir(parents=True, exist_ok=True)
    if args.quick:
        args.model, args.model_label, args.max_new_tokens = "tiny-t5", "the embedded tiny-t5", 8
    else:
        path = bl.save_bench_model(args.work / "model", TINY_VOCABULARY, bl.BENCH_T5_CONFIG)
        args.model, args.model_label, args.max_new_tokens = (
            str(path),
            "bench T5 (d_model 128, 4+4 layers)",
            32,
        )
    results = {label: run_contender(label, flags, gather, args) for label, flags, gather in CONTENDERS}
    (args.work / "raw.json").write_text(json.dumps(results, indent=1))
    text = report(results, args)
    print(text)
    if not args.quick:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
