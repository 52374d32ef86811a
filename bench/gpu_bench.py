"""The GPU benchmark run by bench/gpu.sh (one H100/H200, no network, < 8 minutes).

FLAN-T5-base and -large architectures (random init from their config values, no download),
bf16 autocast over fp32 master weights (the product's precision), full fine-tuning and LoRA,
DDP vs ZeRO-2 vs ZeRO-3 on one GPU, through the product's own pieces: configs rendered by
``ftlaunch {full,lora} --dry-run --gpus 1 --zero N``, then per strategy ONE process started by
``accelerate launch`` with that config, which builds the Accelerator (``build_accelerator``),
LoRA (``apply_lora``), AdamW (``build_optimizer``), the length-grouped loader
(``LengthGroupedBatchSampler`` + ``build_collator``) and runs the loop's step (accumulate,
backward, clip, step, zero_grad, loss.item()) for each (architecture, method) in turn,
releasing everything between them (``accelerator.free_memory``). Reported per run:

  tokens/s     non-pad source + target tokens per second over the timed steps
  MFU          model FLOPs / (time x peak bf16 FLOP/s) with, per optimizer step,
               FLOPs = c x (N_enc x S + N_dec x T) + attention,
               c = 6 (full: forward 2 + backward 4) or 4 (LoRA: no weight gradients for frozen weights),
               N_enc / N_dec = encoder / decoder parameters without the embedding (the decoder's
               includes lm_head), S / T = non-pad source / target tokens of the step,
               attention = 12 x inner x (L_enc x sum s_i^2 + L_dec x sum t_i^2 + L_dec x sum t_i s_i)
               (QK^T and AV, 2 FLOPs per MAC, x3 for forward + backward; inner = heads x d_kv)
  peak memory  torch.cuda.max_memory_allocated() from before the model is built to the end, minus
               what an earlier part of the same process left allocated (reported as well)

Generation: the product's ``launcher.evaluation.generate_predictions`` (length-sorted batches,
bf16 autocast, greedy) on 500 dialogues: the DialogSum test split when ``--data DIR`` is given,
else synthetic dialogues with DialogSum-like token lengths (lognormal: source mean ~181, p95 ~340;
target mean ~28). A random-init model never emits EOS, so every dialogue generates exactly
max_new_tokens tokens.

``--tiny``: the embedded tiny-t5 on CPU ranks (gloo), a few steps: proves the whole script works
before GPU time is spent (tests/test_bench.py).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "bench")]

ARCHS = ("google/flan-t5-base", "google/flan-t5-large")
METHODS = ("full", "lora")
STRATEGIES = {"DDP": 0, "ZeRO-2": 2, "ZeRO-3": 3}
PEAK_BF16 = (("H100 PCIe", 756e12), ("H100", 989e12), ("H200", 989e12), ("GH200", 989e12), ("A100", 312e12),
             ("L40S", 362e12))
SOURCE_LOGNORMAL = (5.10, 0.45)  # DialogSum with a T5 tokenizer: mean ~181, p95 ~340 tokens
TARGET_LOGNORMAL = (3.25, 0.40)  # mean ~28, p95 ~50


# ---------------------------------------------------------------- data


def lognormal_lengths(n: int, mu_sigma: tuple[float, float], low: int, high: int, seed: int) -> list[int]:
    import numpy as np

    rng = np.random.default_rng(seed)
    return np.clip(np.round(rng.lognormal(*mu_sigma, size=n)), low, high).astype(int).tolist()


def synthetic_token_examples(n: int, vocab: int, seed: int = 0) -> list[dict]:
    """Token-id examples with DialogSum-like lengths (ids 3.. vocab-1; last id = EOS 1)."""
    import numpy as np

    rng = np.random.default_rng(seed + 1)
    src = lognormal_lengths(n, SOURCE_LOGNORMAL, 16, 512, seed)
    tgt = lognormal_lengths(n, TARGET_LOGNORMAL, 4, 128, seed + 2)
    out = []
    for s, t in zip(src, tgt):
        ids = rng.integers(3, vocab, size=s - 1).tolist() + [1]
        out.append({"input_ids": ids, "attention_mask": [1] * s, "labels": rng.integers(3, vocab, t - 1).tolist() + [1]})
    return out


def synthetic_dialogues(n: int, tokenizer, seed: int = 0) -> list[dict]:
    """Text dialogues whose prompts tokenize to DialogSum-like lengths under ``tokenizer``."""
    import numpy as np

    from launcher.data import build_prompt
    from launcher.paths import SAMPLE_DATA_DIR
    from launcher.recipe import DEFAULT_PROMPT

    words = " ".join(json.loads(line)["dialogue"] for line in (SAMPLE_DATA_DIR / "train.jsonl").read_text().splitlines()
                     if line.strip()).split()
    probe = " ".join(words[:2000])
    per_word = len(tokenizer(probe)["input_ids"]) / 2000
    rng = np.random.default_rng(seed)
    rows = []
    for i, length in enumerate(lognormal_lengths(n, SOURCE_LOGNORMAL, 16, 512, seed)):
        count = max(4, int(length / per_word))
        start = int(rng.integers(0, max(1, len(words) - count)))
        text = " ".join((words * (1 + count // max(len(words), 1)))[start:start + count])
        rows.append({"id": f"synthetic_{i}", "dialogue": text, "summary": "x", "references": ["x"]})
    lengths = [len(ids) for ids in tokenizer([build_prompt(DEFAULT_PROMPT, r["dialogue"]) for r in rows],
                                             max_length=512, truncation=True)["input_ids"]]
    print(f"synthetic dialogues: source tokens mean {np.mean(lengths):.0f}, p95 {np.percentile(lengths, 95):.0f}",
          flush=True)
    return rows


def load_tokenizer(path: str | None):
    from transformers import AutoTokenizer

    from launcher.paths import TINY_TOKENIZER_DIR

    return AutoTokenizer.from_pretrained(path or str(TINY_TOKENIZER_DIR))


# ---------------------------------------------------------------- models and FLOPs


def arch_config(arch: str) -> dict:
    from launcher.estimate import FLAN_T5_CONFIGS, FLAN_T5_VOCAB
    from launcher.model import TINY_T5_CONFIG

    if arch == "tiny-t5":
        return dict(TINY_T5_CONFIG, vocab_size=1000)
    return dict(FLAN_T5_CONFIGS[arch], vocab_size=FLAN_T5_VOCAB, feed_forward_proj="gated-gelu",
                tie_word_embeddings=False, dropout_rate=0.1, pad_token_id=0, eos_token_id=1,
                decoder_start_token_id=0)


def build_arch(arch: str, device):
    """Random init on the device (fast), fp32 master weights, FLAN-T5's own lm_head."""
    import torch
    from transformers import T5Config, T5ForConditionalGeneration

    from launcher.distributed import without_zero3_init

    config = T5Config(**arch_config(arch))
    with without_zero3_init(), torch.device(device):
        torch.manual_seed(0)
        model = T5ForConditionalGeneration(config)
        model.lm_head.weight = torch.nn.Parameter(torch.randn(config.vocab_size, config.d_model) * config.d_model**-0.5)
    return model


def flop_params(model) -> tuple[int, int, dict]:
    """(encoder, decoder) parameters that do matmuls per token (no embedding; lm_head in the decoder)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    enc = sum(p.numel() for n, p in base.encoder.named_parameters() if "embed_tokens" not in n)
    dec = sum(p.numel() for n, p in base.decoder.named_parameters() if "embed_tokens" not in n)
    dec += base.lm_head.weight.numel()
    c = base.config
    return enc, dec, {"inner": c.num_heads * c.d_kv, "L_enc": c.num_layers, "L_dec": c.num_decoder_layers}


def step_flops(batch_examples: list[tuple[int, int]], enc: int, dec: int, dims: dict, lora: bool) -> float:
    c = 4 if lora else 6
    s_sum = sum(s for s, _ in batch_examples)
    t_sum = sum(t for _, t in batch_examples)
    attention = 12 * dims["inner"] * (dims["L_enc"] * sum(s * s for s, _ in batch_examples)
                                      + dims["L_dec"] * sum(t * t for _, t in batch_examples)
                                      + dims["L_dec"] * sum(t * s for s, t in batch_examples))
    return c * (enc * s_sum + dec * t_sum) + attention


def peak_flops(override: float | None) -> tuple[float | None, str]:
    import torch

    if override:
        return override * 1e12, f"given ({override:g} TFLOP/s)"
    if not torch.cuda.is_available():
        return None, "no GPU"
    name = torch.cuda.get_device_name(0)
    for key, value in PEAK_BF16:
        if key in name:
            return value, f"{name}: {value / 1e12:g} TFLOP/s dense bf16"
    return None, f"{name}: peak unknown (pass --peak-tflops)"


# ---------------------------------------------------------------- worker: training


def train_one(accelerator, recipe, arch: str, method: str, args, loop: str = "product") -> dict:
    """``loop="product"``: train.py's step as it is (device-side WindowStats, clip_and_norm,
    deepspeed_grad_norm, and the per-step stop-flag all-reduce ``any_rank``); ``"lean"``: the same
    math with none of that bookkeeping (its cost is the difference)."""
    import torch

    from launcher.data import LengthGroupedBatchSampler
    from launcher.distributed import any_rank, uses_deepspeed
    from launcher.model import apply_lora, count_parameters
    from launcher.train import WindowStats, build_collator, build_optimizer, clip_and_norm, deepspeed_grad_norm

    on_gpu = accelerator.device.type == "cuda"
    baseline = 0
    if on_gpu:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        baseline = torch.cuda.memory_allocated()  # anything an earlier part left behind in this process
    model = build_arch(arch, accelerator.device)
    if method == "lora":
        model = apply_lora(model, recipe.lora)
    trainable, total = count_parameters(model)
    enc, dec, dims = flop_params(model)
    vocab = model.config.vocab_size
    steps = args.warmup + args.steps
    examples = load_train_examples(args, vocab, steps * args.batch)
    sampler = LengthGroupedBatchSampler([len(e["input_ids"]) + len(e["labels"]) for e in examples], args.batch, 42)
    tokenizer = load_tokenizer(args.tokenizer)
    collator = build_collator(tokenizer, on_gpu)
    loader = torch.utils.data.DataLoader(examples, batch_sampler=sampler, collate_fn=collator)
    optimizer = build_optimizer(model, recipe)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    model.train()
    stats = WindowStats()
    timed_tokens = timed_flops = timed_padded = 0.0
    done = 0
    start = None
    sync = torch.cuda.synchronize if on_gpu else (lambda: None)
    while done < steps:
        for batch in loader:
            if done == args.warmup:
                sync()
                start = time.perf_counter()
            with accelerator.accumulate(model):
                loss = model(**batch).loss
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    if loop == "product":
                        clip_and_norm(accelerator, model, recipe.train.max_grad_norm)
                    elif recipe.train.max_grad_norm and not uses_deepspeed(accelerator):
                        accelerator.clip_grad_norm_(model.parameters(), recipe.train.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            if loop == "product":
                stats.add(loss, batch)  # as train.py: sums stay on the device
                deepspeed_grad_norm(accelerator, model)
                any_rank(accelerator, False)
            if done >= args.warmup:
                mask = batch["attention_mask"]
                labels = batch["labels"]
                pairs = list(zip(mask.sum(1).tolist(), (labels != -100).sum(1).tolist()))
                timed_tokens += sum(s + t for s, t in pairs)
                timed_flops += step_flops(pairs, enc, dec, dims, method == "lora")
                timed_padded += step_flops([(mask.shape[1], labels.shape[1])] * mask.shape[0], enc, dec, dims,
                                           method == "lora")
            done += 1
            if done >= steps:
                break
    sync()
    seconds = time.perf_counter() - start
    peak, label = peak_flops(args.peak_tflops)
    result = {
        "arch": arch, "method": method, "loop": loop, "params": total, "trainable": trainable, "steps": args.steps,
        "batch": args.batch, "tokens_per_s": timed_tokens / seconds,
        "samples_per_s": args.steps * args.batch / seconds, "tflops": timed_flops / seconds / 1e12,
        "mfu": timed_flops / seconds / peak if peak else None,
        "mfu_padded": timed_padded / seconds / peak if peak else None, "peak_label": label,
        "peak_mem_gib": (torch.cuda.max_memory_allocated() - baseline) / 2**30 if on_gpu else None,
        "left_over_at_start_gib": baseline / 2**30,
        "peak_reserved_gib": torch.cuda.max_memory_reserved() / 2**30 if on_gpu else None,
    }
    del model, optimizer, loader, batch, loss
    accelerator.free_memory()
    return result


def load_train_examples(args, vocab: int, n: int) -> list[dict]:
    if args.data:
        from launcher.data import load_split, tokenize_rows
        from launcher.recipe import DataSection

        return tokenize_rows(load_split(args.data, "train", n), load_tokenizer(args.tokenizer), DataSection())
    return synthetic_token_examples(n, vocab if not args.tiny else 1000)


def worker_train(args) -> None:
    from launcher.distributed import build_accelerator
    from launcher.recipe import read_run_recipe

    recipe = read_run_recipe(args.run_dir)
    accelerator = build_accelerator(recipe)
    parts = [(arch, method, "product") for arch in args.archs for method in args.methods]
    if args.strategy == "DDP" and "full" in args.methods:
        parts += [(arch, "full", "lean") for arch in args.archs]  # the cost of the loop's per-step syncs
    for arch, method, loop in parts:
        try:
            result = train_one(accelerator, recipe, arch, method, args, loop)
        except Exception as exc:  # noqa: BLE001 - an OOM or error is a result, the others still run
            result = {"arch": arch, "method": method, "loop": loop,
                      "error": f"{type(exc).__name__}: {str(exc)[:300]}"}
            accelerator.free_memory()
        result["strategy"] = args.strategy
        if accelerator.is_main_process:
            print(f"BENCH_RESULT {json.dumps(result)}", flush=True)
    accelerator.end_training()


# ---------------------------------------------------------------- worker: generation


def worker_generate(args) -> None:
    import torch

    from launcher.distributed import build_accelerator
    from launcher.evaluation import generate_predictions
    from launcher.recipe import read_run_recipe

    recipe = read_run_recipe(args.run_dir)
    recipe.eval.max_new_tokens = args.max_new_tokens
    recipe.eval.batch_size = args.eval_batch
    accelerator = build_accelerator(recipe)
    tokenizer = load_tokenizer(args.tokenizer)
    if args.data:
        from launcher.data import load_split

        rows = load_split(args.data, "test", args.dialogues)
    else:
        rows = synthetic_dialogues(args.dialogues, tokenizer)
    on_gpu = accelerator.device.type == "cuda"
    for arch in args.archs:
        if on_gpu:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        model = build_arch(arch, accelerator.device).eval()
        generate_predictions(accelerator, model, tokenizer, rows[: args.eval_batch], recipe, synced=False)  # warm-up
        if on_gpu:
            torch.cuda.synchronize()
        start = time.perf_counter()
        predictions = generate_predictions(accelerator, model, tokenizer, rows, recipe, synced=False)
        if on_gpu:
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        assert len(predictions) == len(rows)
        result = {"arch": arch, "dialogues": len(rows), "seconds": seconds, "dialogues_per_s": len(rows) / seconds,
                  "new_tokens_per_s": len(rows) * args.max_new_tokens / seconds, "batch": args.eval_batch,
                  "max_new_tokens": args.max_new_tokens, "source": "DialogSum test" if args.data else "synthetic",
                  "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30 if on_gpu else None}
        print(f"BENCH_RESULT {json.dumps(result)}", flush=True)
        del model
    accelerator.end_training()


# ---------------------------------------------------------------- driver


def render(method: str, zero: int, out: Path, args) -> None:
    command = [sys.executable, "-m", "launcher.cli", method, "--dry-run", "--gpus", "1", "--zero", str(zero),
               "--model", "tiny-t5", "--data", "sample", "--output", str(out), "--overwrite",
               "--set", f"train.micro_batch_size={args.batch}", "--set", "model.precision=bf16"]
    if args.tiny:
        command.append("--cpu")
    subprocess.run(command, check=True, cwd=REPO, capture_output=True, text=True)


def launch(run_dir: Path, worker_args: list[str], timeout: float) -> tuple[list[dict], str]:
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(run_dir / "accelerate.yaml"),
               str(Path(__file__).resolve()), *worker_args, "--run-dir", str(run_dir)]
    started = time.perf_counter()
    proc = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    log = f"$ {' '.join(command)}\n(exit {proc.returncode}, {time.perf_counter() - started:.0f} s)\n{proc.stdout}\n{proc.stderr}"
    results = [json.loads(line.split(" ", 1)[1]) for line in proc.stdout.splitlines() if line.startswith("BENCH_RESULT ")]
    return results, log


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", choices=("train", "generate"))
    parser.add_argument("--run-dir", type=Path)
    parser.add_argument("--strategy", default="DDP")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / f"gpu-{time.strftime('%Y-%m-%d')}")
    parser.add_argument("--data", default=None, help="DialogSum directory (train/test.jsonl); default: synthetic")
    parser.add_argument("--tokenizer", default=None, help="tokenizer directory; default: the package's tiny one")
    parser.add_argument("--tiny", action="store_true", help="CPU smoke run: tiny-t5, a few steps")
    parser.add_argument("--archs", nargs="*", default=list(ARCHS))
    parser.add_argument("--methods", nargs="*", default=list(METHODS))
    parser.add_argument("--strategies", nargs="*", default=list(STRATEGIES))
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--dialogues", type=int, default=500)
    parser.add_argument("--eval-batch", type=int, default=64)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--peak-tflops", type=float, default=None)
    parser.add_argument("--budget-s", type=float, default=450, help="stop launching new parts after this")
    args = parser.parse_args()
    if args.tiny:
        args.archs, args.batch, args.warmup, args.steps = ["tiny-t5"], 4, 1, 3
        args.dialogues, args.eval_batch, args.max_new_tokens = 12, 8, 8
    if args.worker:
        args.run_dir = args.run_dir.resolve()
        (worker_train if args.worker == "train" else worker_generate)(args)
        return
    started = time.perf_counter()
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    runs = out / "runs"
    common = ["--archs", *args.archs, "--methods", *args.methods, "--batch", str(args.batch), "--warmup",
              str(args.warmup), "--steps", str(args.steps), "--dialogues", str(args.dialogues), "--eval-batch",
              str(args.eval_batch), "--max-new-tokens", str(args.max_new_tokens)]
    common += ["--data", args.data] if args.data else []
    common += ["--tokenizer", args.tokenizer] if args.tokenizer else []
    common += ["--peak-tflops", str(args.peak_tflops)] if args.peak_tflops else []
    common += ["--tiny"] if args.tiny else []
    train_results, gen_results, logs, skipped = [], [], [], []
    for name in args.strategies:
        if time.perf_counter() - started > args.budget_s:
            skipped.append(f"training {name} (time budget)")
            continue
        run_dir = runs / name
        render("full", STRATEGIES[name], run_dir, args)
        results, log = launch(run_dir, ["--worker", "train", "--strategy", name, *common], timeout=300)
        train_results += results
        logs.append(log)
        print(f"{name}: {len(results)} results", flush=True)
    if time.perf_counter() - started <= args.budget_s + 60:
        run_dir = runs / "generate"
        render("full", 0, run_dir, args)
        results, log = launch(run_dir, ["--worker", "generate", *common], timeout=240)
        gen_results += results
        logs.append(log)
    else:
        skipped.append("generation (time budget)")
    (out / "results.json").write_text(json.dumps({"train": train_results, "generate": gen_results}, indent=1))
    (out / "logs.txt").write_text("\n\n".join(logs))
    (out / "README.md").write_text(report(args, train_results, gen_results, skipped, time.perf_counter() - started))
    print(f"wrote {out / 'README.md'}")
    expected = len(args.strategies) * len(args.archs) * len(args.methods)
    ok = [r for r in train_results if "error" not in r and r.get("loop") == "product"]
    sys.exit(0 if len(ok) == expected and gen_results else 1)


def report(args, train: list[dict], gen: list[dict], skipped: list[str], elapsed: float) -> str:
    import platform

    import torch

    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU (--tiny smoke run)"
    versions = {}
    for name in ("torch", "transformers", "accelerate", "deepspeed", "peft"):
        try:
            versions[name] = __import__(name).__version__
        except Exception:  # noqa: BLE001
            versions[name] = "missing"
    lines = [
        "# GPU benchmark: DDP vs ZeRO-2 vs ZeRO-3 on one GPU, full and LoRA, + generation",
        "",
        "- command: `" + " ".join(["bash bench/gpu.sh", os.environ.get("GPU_SH_ARGS", "")]).strip() + "`",
        f"- date: {time.strftime('%Y-%m-%d %H:%M %Z')}; device: {device}; python {platform.python_version()}; "
        + ", ".join(f"{k} {v}" for k, v in versions.items()),
        f"- bf16 autocast over fp32 master weights; micro batch {args.batch}; {args.warmup} warm-up + {args.steps} timed "
        f"steps; data: {args.data or 'synthetic DialogSum-like lengths'}; {elapsed:.0f} s wall",
        "- FLOPs per step = c x (N_enc x S + N_dec x T) + 12 x inner x (L_enc sum s^2 + L_dec sum t^2 + L_dec sum t s), "
        "c = 6 full / 4 LoRA; MFU on non-pad tokens (MFU padded: on the padded batch)",
        "",
        "| model | method | strategy | loop | tokens/s | samples/s | TFLOP/s | MFU | MFU padded | peak memory GiB |",
        "| --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    fmt = lambda v, f: "-" if v is None else format(v, f)  # noqa: E731
    for r in train:
        if "error" in r:
            lines.append(f"| {r['arch']} | {r['method']} | {r['strategy']} | {r.get('loop')} | error: {r['error']} "
                         "| | | | | |")
            continue
        lines.append(f"| {r['arch']} | {r['method']} | {r['strategy']} | {r['loop']} | {r['tokens_per_s']:,.0f} | "
                     f"{r['samples_per_s']:.1f} | {r['tflops']:.1f} | {fmt(r['mfu'], '.1%')} | "
                     f"{fmt(r['mfu_padded'], '.1%')} | {fmt(r['peak_mem_gib'], '.2f')} |")
    lines += ["", "| model | dialogues | source | batch | max_new_tokens | seconds | dialogues/s | new tokens/s | "
              "peak memory GiB |", "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in gen:
        lines.append(f"| {r['arch']} | {r['dialogues']} | {r['source']} | {r['batch']} | {r['max_new_tokens']} | "
                     f"{r['seconds']:.1f} | {r['dialogues_per_s']:.1f} | {r['new_tokens_per_s']:,.0f} | "
                     f"{fmt(r['peak_mem_gib'], '.2f')} |")
    if skipped:
        lines += ["", "Skipped: " + "; ".join(skipped)]
    lines += ["", "Logs of every launch: logs.txt; raw numbers: results.json."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
