"""The model card ``final/README.md`` in the Hugging Face format, so ``final/`` uploads as it is.

Written after the report, from the files the run left (recipe.yaml, report/rouge.json,
metrics.jsonl, final/ftlaunch.json): its ROUGE values are report/rouge.json's, never recomputed.
Those files are checked as they are read (one line naming the file, the key and the fix), and the
card is rendered whole before it is written: ``ftlaunch export`` renders it before writing weights.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from launcher.core.errors import UserError
from launcher.core.history import history_lines, strategy_label
from launcher.core.model_settings import read_inference_settings
from launcher.core.paths import is_local_reference
from launcher.core.recipe import EMBEDDED_DATA, EMBEDDED_MODEL, Recipe, shown_generation_settings
from launcher.core.recipe_loading import read_run_recipe
from launcher.core.rundir import FINETUNED, ORIGINAL, RunDir
from launcher.results.records import read_checked_metrics, read_json_record, scores_problem
from launcher.results.report import best_step_marker, best_step_words, early_stop, percent, shown_number
from launcher.results.rouge import ROUGE_TYPES

CARD_FILE = "README.md"


def read_report_scores(run: RunDir) -> dict[str, Any]:
    """report/rouge.json (``{model: one evaluation's scores}``), checked where the card reads it;
    ``{}`` when the run has no report (the card then has no ROUGE rows)."""
    rouge = run.report.rouge
    if not rouge.is_file():
        return {}
    fix = f"run ftlaunch report {run.path} to rewrite it"
    scores = read_json_record(rouge, fix)
    if not isinstance(scores, dict):
        raise UserError(f"{rouge} is not a JSON object of evaluations ({ORIGINAL}, {FINETUNED}); {fix}")
    for name in (ORIGINAL, FINETUNED):
        if name in scores:
            check_model_scores(rouge, name, scores[name], fix)
    return scores


def check_model_scores(rouge: Path, name: str, entry: Any, fix: str) -> None:
    """One model's entry of report/rouge.json: the card prints its four ROUGE values as numbers."""
    problem = scores_problem(entry)
    if problem:
        raise UserError(f"{rouge}: {name}{'.' if isinstance(entry, dict) else ' '}{problem}; {fix}")


def hub_reference(name: str) -> str | None:
    """A name the Hub can resolve (local folders and embedded assets are not)."""
    if name in (EMBEDDED_MODEL, EMBEDDED_DATA) or is_local_reference(name):
        return None
    return name


def card_metadata(recipe, scores: dict, library: str) -> dict[str, Any]:
    finetuned = scores.get(FINETUNED, {})
    metadata: dict[str, Any] = {
        "library_name": library,
        "pipeline_tag": "summarization",
        "tags": ["summarization", "dialogue-summarization", "ftlaunch", recipe.train.method],
    }
    base = hub_reference(recipe.model.name)
    dataset = hub_reference(recipe.data.dataset)
    if base:
        metadata["base_model"] = base
    if dataset:
        metadata["datasets"] = [dataset]
    if finetuned:
        metadata["model-index"] = [
            {
                "name": f"{Path(recipe.model.name).name}-{recipe.train.method}-dialogsum",
                "results": [
                    {
                        "task": {"type": "summarization", "name": "Summarization"},
                        "dataset": {
                            "type": recipe.data.dataset,
                            "name": recipe.data.dataset,
                            "split": recipe.eval.split,
                        },
                        "metrics": [
                            {"type": metric, "value": finetuned[metric], "name": metric}
                            for metric in ROUGE_TYPES
                        ],
                    }
                ],
            }
        ]
    return metadata


def training_facts(run_dir: Path, recipe) -> list[tuple[str, str]]:
    run = RunDir(run_dir)
    metrics = read_checked_metrics(run.path)
    last_step = max((row["step"] for row in metrics if "step" in row), default=None)
    steps = str(last_step) if last_step is not None else f"not recorded (no steps in {run.metrics.name})"
    wall = run.final.stat().st_mtime - run.recipe_yaml.stat().st_mtime
    facts = [
        ("method", recipe.lora.label if recipe.train.method == "lora" else "full fine-tuning"),
        ("base model", f"`{recipe.model.name}`"),
        ("dataset", f"`{recipe.data.dataset}`"),
        ("world size", f"{recipe.launch.world_size} ({recipe.launch.nodes} node(s) x {recipe.launch.gpus})"),
        ("strategy", strategy_label(recipe)),
        ("precision", recipe.model.precision),
        ("optimizer steps", steps),
        *outcome_facts(metrics),
        ("effective batch", effective_batch(recipe)),
        ("learning rate", f"{recipe.train.lr:g} ({schedule_label(recipe)})"),
        ("wall time (launch to final save)", f"{wall / 60:.1f} min"),
    ]
    # a resumed or restarted run: each segment's world size and strategy (history.py)
    return facts + [(f"segment {number}", line) for number, line in enumerate(history_lines(metrics), 1)]


def outcome_facts(metrics: list[dict]) -> list[tuple[str, str]]:
    """Which step final/ holds (train.best_metric) and why training stopped early, read from
    metrics.jsonl's markers as the report reads them."""
    facts = []
    best = best_step_marker(metrics)
    if best:
        value = shown_number(best["best_value"], 1, ".4f")
        facts.append(("weights", f"{best_step_words(best)} ({value}; train.best_metric)"))
    stop = early_stop(metrics)
    if stop:
        facts.append(("stopped early", stop))
    return facts


def schedule_label(recipe: Recipe) -> str:
    """``linear``, or ``polynomial, lr_end 1e-06, power 2`` with the schedule's own settings."""
    options = recipe.train.scheduler_options
    return ", ".join([recipe.train.scheduler, *(f"{key} {value:g}" for key, value in options.items())])


def rouge_rows(scores: dict) -> str:
    lines = ["| model | " + " | ".join(ROUGE_TYPES) + " |", "|---|" + "---|" * len(ROUGE_TYPES)]
    for name in (ORIGINAL, FINETUNED):
        if name in scores:
            lines.append(f"| {name} | " + " | ".join(percent(scores[name][m]) for m in ROUGE_TYPES) + " |")
    return "\n".join(lines)


def generate_arguments(settings: dict) -> str:
    """The run's generation settings as ``generate()`` keyword arguments."""
    return ", ".join(f"{key}={value!r}" for key, value in shown_generation_settings(settings).items())


def usage_snippet(settings: dict, library: str) -> str:
    prompt = json.dumps(settings["prompt"])
    if library == "peft":
        load = (
            "from peft import AutoPeftModelForSeq2SeqLM\nfrom transformers import AutoTokenizer\n\n"
            'model = AutoPeftModelForSeq2SeqLM.from_pretrained("PATH_OR_REPO")  # loads the base model too\n'
        )
    else:
        load = (
            "from transformers import AutoModelForSeq2SeqLM, AutoTokenizer\n\n"
            'model = AutoModelForSeq2SeqLM.from_pretrained("PATH_OR_REPO")\n'
        )
    return (
        "```python\n" + load + 'tokenizer = AutoTokenizer.from_pretrained("PATH_OR_REPO")\n'
        f"prompt = {prompt}  # the training prompt\n"
        'inputs = tokenizer(prompt.replace("{dialogue}", dialogue), truncation=True, '
        f'max_length={settings["max_source_length"]}, return_tensors="pt")\n'
        f"output = model.generate(**inputs, {generate_arguments(settings)})\n"
        "print(tokenizer.decode(output[0], skip_special_tokens=True))\n```\n\n"
        "Or with ftlaunch (same prompt, truncation and generation as the run's evaluation):\n\n"
        "```bash\nftlaunch summarize PATH --input dialogues.jsonl --output summaries.jsonl\n```\n"
    )


def render_card(
    run_dir: Path,
    model_dir: Path | None = None,
    library: str | None = None,
    settings: dict[str, Any] | None = None,
) -> str:
    """The whole card, from the run's files (each checked as it is read). ``settings``: the
    inference settings the model folder will hold (export renders the card before writing it);
    by default its ``ftlaunch.json``."""
    run = RunDir(run_dir)
    recipe = read_run_recipe(run_dir)
    model_dir = model_dir or run.final
    scores = read_report_scores(run)
    settings = settings or read_inference_settings(model_dir) or read_inference_settings(run.final)
    library = library or ("peft" if (model_dir / "adapter_config.json").is_file() else "transformers")
    front = yaml.safe_dump(card_metadata(recipe, scores, library), sort_keys=False, allow_unicode=True)
    facts = "\n".join(f"| {key} | {value} |" for key, value in training_facts(run_dir, recipe))
    split = recipe.eval.split
    return (
        f"---\n{front}---\n\n"
        f"# {Path(recipe.model.name).name} fine-tuned for dialogue summarization ({recipe.train.method})\n\n"
        f"Trained with `ftlaunch {recipe.train.method}`; the full recipe is the run's `{RunDir(run_dir).recipe_yaml.name}`.\n\n"
        f"## Training\n\n| | |\n|---|---|\n{facts}\n\n"
        f"## ROUGE on `{recipe.data.dataset}` [{split}] (F-measure, %)\n\n{rouge_rows(scores)}\n\n"
        f"{scores.get(FINETUNED, {}).get('description', '')}\n\n"
        f"## Usage\n\n{usage_snippet(settings, library)}"
    )


def write_model_card(run_dir: Path, model_dir: Path | None = None, library: str | None = None) -> Path:
    path = (model_dir or RunDir(run_dir).final) / CARD_FILE
    path.write_text(render_card(run_dir, model_dir, library))
    return path


def effective_batch(recipe) -> str:
    """Examples per optimizer step, or with a token budget the padded tokens a step holds at most."""
    train = recipe.train
    if not train.micro_batch_tokens:
        return str(recipe.effective_batch_size())
    tokens = train.micro_batch_tokens * train.grad_accum * recipe.launch.world_size
    return f"up to {tokens:,} padded tokens (token budget {train.micro_batch_tokens:,} per micro-batch)"
