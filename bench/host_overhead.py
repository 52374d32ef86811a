"""Host time and ATen ops per optimizer step: a CPU proxy of how host-bound a GPU step is (issue 23).

On a GPU, a step of a small-batch eager T5 is bound by the host issuing kernels, not by the GPU
running them. This script measures that host cost on CPU with a model whose compute is negligible:
flan-t5-base's depth and heads (12 + 12 layers, 12 heads, gated-GELU feed-forward, relative
attention buckets, its own lm_head) at tiny widths and a small vocabulary, one thread, bf16
autocast everywhere. Contenders, all in this one process on the same fixed batches:

- ``plain``: the loop a user writes: the model as loaded (its own config),
  ``model(**batch, labels=labels).loss`` under autocast, backward, clip, torch AdamW;
- ``trainer``: transformers' ``Seq2SeqTrainer`` on the same model and batches (bf16, same clip and
  optimizer), its step timed from ``on_step_begin`` to ``on_step_end``;
- ``product_eager``: ftlaunch's own step (``train.train_step`` + the loop's per-step
  bookkeeping) on a model prepared as a run prepares it (``build_model``,
  ``prepare_model_for_training``, ``build_optimizer``, ``build_scheduler``, ``accelerator.prepare``);
- ``product_compiled``: the same, with ``torch.compile`` of the prepared model (no op count: a
  dispatch mode does not see inside compiled kernels).

Host time: each round runs every contender for a few steps, in a rotating order; the figure is the
median over rounds of each round's mean. ATen ops: every op dispatched during one steady step
(forward, backward, clip, optimizer), counted with a ``TorchDispatchMode``: deterministic.

  python bench/host_overhead.py --json bench/results/host_overhead.json     # more rounds
  python bench/host_overhead.py --quick --json OUT.json                     # a few minutes + compile

``torch.compile``'s warm-up of the 12+12-layer step dominates a run: ~3 minutes on a quiet 2-core
machine, 16.5 under a load average of 10 (``--no-compile`` skips that variant).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import benchlib as bl
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import TrainerCallback

VOCAB = 256
# flan-t5-base's depth and heads; widths shrunk until compute is negligible next to the host's work.
DEEP_NARROW_T5 = dict(
    bl.BENCH_T5_CONFIG,
    d_model=48,
    d_kv=4,
    d_ff=64,
    num_layers=12,
    num_decoder_layers=12,
    num_heads=12,
    dropout_rate=0.1,
)
VARIANTS = ("plain", "trainer", "product_eager", "product_compiled")


class OpCounter(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops += 1
        return func(*args, **(kwargs or {}))


def make_batches(count: int, batch: int, source: int, target: int, seed: int = 0) -> list[dict]:
    """Fixed padded batches (every one with padding, so the padding mask matters), labels with -100."""
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(count):
        ids = torch.randint(2, VOCAB, (batch, source), generator=generator)
        lengths = torch.randint(source // 2, source + 1, (batch,), generator=generator)
        lengths[0] = source
        mask = (torch.arange(source)[None, :] < lengths[:, None]).long()
        ids = ids * mask
        labels = torch.randint(2, VOCAB, (batch, target), generator=generator)
        label_lengths = torch.randint(target // 2, target + 1, (batch,), generator=generator)
        labels[torch.arange(target)[None, :] >= label_lengths[:, None]] = -100
        batches.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return batches


@dataclass
class Contender:
    """One way to train: ``step(batch)`` does one optimizer step; ``count`` counts one step's ops."""

    name: str
    step: Callable[[dict], None] | None
    countable: bool = True
    prepare: Callable[[dict], dict] = lambda batch: batch  # what the variant's own collator adds
    run_steps: Callable[[list[dict]], list[float]] | None = None  # Trainer: one train() per round
    clock: StepClock | None = None
    times: list[float] = field(default_factory=list)  # mean ms per step, one per round
    ops: int | None = None


# ---------------------------------------------------------------- plain


def plain(model_dir: Path, lr: float) -> Contender:
    model = bl.load_bench_model(model_dir).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)

    def step(batch: dict) -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return Contender("plain", step)


# ---------------------------------------------------------------- product


def product_recipe(model_dir: Path, lr: float):
    from launcher.core.recipe_loading import build_recipe, default_recipe_path, load_recipe

    raw = load_recipe(default_recipe_path("full")).model_dump(mode="json")
    raw["model"].update(name=str(model_dir), precision="bf16")
    raw["launch"].update(cpu=True, gpus=1)
    raw["train"].update(lr=lr, max_grad_norm=1.0, grad_accum=1)
    return build_recipe(raw, "host_overhead")


def product(model_dir: Path, lr: float, compiled: bool, total_steps: int) -> Contender:
    """The product's model preparation and step, as ``train.set_up`` and ``train_loop`` do them."""
    from launcher.rank import optimization, train
    from launcher.rank.distributed import build_accelerator
    from launcher.rank.model import build_model
    from launcher.rank.run import Run
    from launcher.rank.step_stats import WindowStats

    recipe = product_recipe(model_dir, lr)
    accelerator = build_accelerator(recipe)
    model = build_model(recipe, VOCAB)
    train.prepare_model_for_training(model, recipe, accelerator)
    optimizer = optimization.build_optimizer(model, recipe, accelerator.device)
    scheduler = optimization.build_scheduler(optimizer, recipe, total_steps)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    if compiled:
        model = torch.compile(model)
    model.train()
    run = Run(recipe, None, accelerator, model, None, optimizer, scheduler, None, None, None, total_steps, 0)
    decoder_start = accelerator.unwrap_model(model)
    stats = WindowStats()

    def step(batch: dict) -> None:
        nonlocal stats
        result = train.train_step(run, [batch])
        stats.add(result)

    name = "product_compiled" if compiled else "product_eager"

    def prepare(batch: dict) -> dict:  # the product's collator adds decoder inputs
        return {
            **batch,
            "decoder_input_ids": decoder_start.prepare_decoder_input_ids_from_labels(labels=batch["labels"]),
        }

    return Contender(name, step, countable=not compiled, prepare=prepare)


# ---------------------------------------------------------------- Seq2SeqTrainer


class StepClock(TrainerCallback):
    """A TrainerCallback timing each optimizer step; ``count_at`` counts the ops of that step."""

    def __init__(self) -> None:
        self.started = 0.0
        self.durations: list[float] = []
        self.count_at: int | None = None
        self.counter: OpCounter | None = None
        self.counted: int | None = None

    def on_step_begin(self, args, state, control, **kwargs):  # noqa: ARG002 - callback signature
        if self.count_at == len(self.durations):
            self.counter = OpCounter()
            self.counter.__enter__()
        self.started = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):  # noqa: ARG002
        self.durations.append(time.perf_counter() - self.started)
        if self.counter is not None:
            self.counter.__exit__(None, None, None)
            self.counted, self.counter, self.count_at = self.counter.ops, None, None


def trainer(model_dir: Path, lr: float, scratch: Path) -> Contender:
    """Seq2SeqTrainer's own loop; each call of ``run_steps`` is one ``trainer.train()`` of n steps."""
    from transformers import Seq2SeqTrainer, Seq2SeqTrainingArguments

    model = bl.load_bench_model(model_dir).train()
    clock = StepClock()
    holder: dict[str, list] = {"batches": []}

    def make(steps: int) -> Seq2SeqTrainer:
        args = Seq2SeqTrainingArguments(
            output_dir=str(scratch / "trainer"),
            per_device_train_batch_size=1,  # one "example" = one prepared batch (collator below)
            max_steps=steps,
            learning_rate=lr,
            max_grad_norm=1.0,
            optim="adamw_torch",
            lr_scheduler_type="linear",
            bf16=True,
            use_cpu=True,
            report_to="none",
            logging_strategy="no",
            save_strategy="no",
            eval_strategy="no",
            disable_tqdm=True,
            dataloader_num_workers=0,
            dataloader_pin_memory=False,
            remove_unused_columns=False,
        )
        return Seq2SeqTrainer(
            model=model,
            args=args,
            train_dataset=holder["batches"],
            data_collator=lambda items: items[0],
            callbacks=[clock],
        )

    def run_steps(batches: list[dict]) -> list[float]:
        """One train() over ``batches``; its first step (optimizer state creation) is not timed."""
        holder["batches"] = batches
        clock.durations = []
        make(len(batches)).train()
        return clock.durations[1:]

    return Contender("trainer", None, run_steps=run_steps, clock=clock)


# ---------------------------------------------------------------- measuring


def timed_round(contender: Contender, batches: list[dict]) -> float:
    """Mean host milliseconds per step over ``batches``."""
    if contender.run_steps is not None:
        durations = contender.run_steps([batches[-1], *batches])
        return 1000 * statistics.mean(durations)
    prepared = [contender.prepare(b) for b in batches]
    start = time.perf_counter()
    for batch in prepared:
        contender.step(batch)
    return 1000 * (time.perf_counter() - start) / len(prepared)


def count_ops(contender: Contender, batch: dict) -> int | None:
    if not contender.countable:
        return None
    if contender.run_steps is not None:
        contender.clock.count_at = 1  # a train()'s first step creates the optimizer state: count the second
        contender.run_steps([batch, batch])
        return contender.clock.counted
    prepared = contender.prepare(batch)
    counter = OpCounter()
    with counter:
        contender.step(prepared)
    return counter.ops


def measure(args) -> dict:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    config = dict(DEEP_NARROW_T5, num_layers=args.layers, num_decoder_layers=args.layers)
    batches = make_batches(args.batches, args.batch, args.source, args.target)
    with tempfile.TemporaryDirectory(prefix="host-overhead-") as scratch:
        model_dir = bl.save_bench_model(Path(scratch) / "model", VOCAB, config)
        total_steps = 10 * (args.rounds + 2) * len(batches)
        contenders = [plain(model_dir, args.lr), trainer(model_dir, args.lr, Path(scratch))]
        contenders.append(product(model_dir, args.lr, compiled=False, total_steps=total_steps))
        if not args.no_compile:
            contenders.append(product(model_dir, args.lr, compiled=True, total_steps=total_steps))
        compile_s = None
        for contender in contenders:  # warm-up: every batch shape once (compilation included)
            start = time.perf_counter()
            timed_round(contender, batches)
            if contender.name == "product_compiled":
                compile_s = time.perf_counter() - start
            contender.ops = count_ops(contender, batches[0])
        for round_index in range(args.rounds):
            shift = round_index % len(contenders)
            for contender in contenders[shift:] + contenders[:shift]:
                contender.times.append(timed_round(contender, batches))
    variants = {}
    for name in VARIANTS:
        found = [c for c in contenders if c.name == name]
        if not found:
            variants[name] = {"ms_per_step": None, "ops_per_step": None, "skipped": "--no-compile"}
            continue
        c = found[0]
        variants[name] = {
            "ms_per_step": statistics.median(c.times),
            "ms_range": [min(c.times), max(c.times)],
            "ops_per_step": c.ops,
        }
    variants["product_compiled"]["compile_warmup_s"] = compile_s
    plain_ms, plain_ops = variants["plain"]["ms_per_step"], variants["plain"]["ops_per_step"]
    ratios = {
        name: {
            "time_vs_plain": v["ms_per_step"] / plain_ms if v["ms_per_step"] is not None else None,
            "ops_vs_plain": v["ops_per_step"] / plain_ops if v["ops_per_step"] is not None else None,
        }
        for name, v in variants.items()
    }
    return {
        "variants": variants,
        "ratios": ratios,
        "setup": {
            "model": {
                k: config[k]
                for k in ("num_layers", "num_decoder_layers", "num_heads", "d_model", "d_kv", "d_ff")
            }
            | {"vocab_size": VOCAB, "feed_forward_proj": config["feed_forward_proj"]},
            "batch": args.batch,
            "source_tokens": args.source,
            "target_tokens": args.target,
            "batches_per_round": args.batches,
            "rounds": args.rounds,
            "threads": 1,
            "precision": "bf16 autocast over fp32 weights",
        },
    }


def markdown(result: dict, command: str) -> str:
    rows = []
    for name, v in result["variants"].items():
        r = result["ratios"][name]
        rows.append(
            [
                name,
                "-" if v["ms_per_step"] is None else f"{v['ms_per_step']:.1f}",
                "-" if "ms_range" not in v else f"{v['ms_range'][0]:.1f}-{v['ms_range'][1]:.1f}",
                "null" if v["ops_per_step"] is None else f"{v['ops_per_step']:,}",
                "-" if r["time_vs_plain"] is None else f"{r['time_vs_plain']:.2f}",
                "-" if r["ops_vs_plain"] is None else f"{r['ops_vs_plain']:.2f}",
            ]
        )
    setup = result["setup"]
    notes = [
        f"model: {json.dumps(setup['model'])}; micro batch {setup['batch']} x {setup['source_tokens']} "
        f"source + {setup['target_tokens']} target tokens (padded), {setup['batches_per_round']} "
        f"batches per round, {setup['rounds']} rounds, 1 thread, {setup['precision']}",
    ]
    return "\n".join(
        [
            bl.header(
                "Host time and ATen ops per optimizer step (CPU proxy of a host-bound GPU step)",
                command,
                notes,
            ),
            bl.md_table(
                [
                    "variant",
                    "host ms/step (median)",
                    "range over rounds",
                    "ATen ops/step",
                    "time vs plain",
                    "ops vs plain",
                ],
                rows,
            ),
            "",
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds and batches (a few minutes)")
    parser.add_argument("--json", type=Path, default=None, help="write the result as JSON here")
    parser.add_argument("--out", type=Path, default=bl.RESULTS_DIR / "host_overhead.md")
    parser.add_argument("--layers", type=int, default=12, help="encoder and decoder layers (tests: fewer)")
    parser.add_argument("--no-compile", action="store_true", help="skip product_compiled")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--source", type=int, default=64)
    parser.add_argument("--target", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--batches", type=int, default=None)
    args = parser.parse_args()
    args.rounds = args.rounds or (3 if args.quick else 7)
    args.batches = args.batches or (3 if args.quick else 5)
    result = measure(args)
    text = markdown(result, bl.command_line())
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.json}")
    bl.emit(text, args, parser)


if __name__ == "__main__":
    main()
