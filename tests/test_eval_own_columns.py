"""`ftlaunch eval --model RUN/final --data D`, where D is the dataset the run was trained and
evaluated on, reads D through the run's own columns (data.source_field/target_field), as the run's
own evaluation did; `--set data.source_field=...` still names others, and another dataset keeps
the defaults. The columns come from final/ftlaunch.json (written by the export the ranks run), or,
for a final/ written before ftlaunch.json recorded them, from the run's recipe.yaml.

Real CLI in process (`--dry-run`: the evaluation's recipe.yaml says what it would read); final/
is tiny-t5 saved as a model folder with the settings rank/export.py writes beside it.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import yaml
from conftest import run_cli_in_process, save_tiny_t5

from launcher.core.dialogues import dataset_dir
from launcher.core.jsonl import read_jsonl, write_jsonl
from launcher.core.model_settings import write_inference_settings
from launcher.core.recipe_loading import read_run_recipe

COLUMNS = ("--set", "data.source_field=conversation", "--set", "data.target_field=[notes, notes_2]")
TINY = ("--cpu", "--model", "tiny-t5")


def own_columns_data(path: Path) -> Path:
    """The sample dialogues with columns of their own beside the default ones: conversation (the
    text), notes and notes_2 (references; the training splits have one)."""
    shutil.copytree(dataset_dir("sample"), path)
    for split in ("train", "validation", "test"):
        rows = read_jsonl(path / f"{split}.jsonl")
        write_jsonl(
            path / f"{split}.jsonl",
            (
                {
                    **row,
                    "conversation": f"Call log.\n{row['dialogue']}",
                    "notes": row.get("summary") or row["summary1"],
                    **({"notes_2": row["summary2"]} if "summary2" in row else {}),
                }
                for row in rows
            ),
        )
    return path


def run_with_final(tmp_path: Path) -> tuple[Path, Path]:
    """A run rendered with the data's own columns, and its final/ as the export leaves it."""
    data = own_columns_data(tmp_path / "own-data")
    run = tmp_path / "run"
    result = run_cli_in_process(
        "full", *TINY, "--data", str(data), *COLUMNS, "--dry-run", "--output", str(run)
    )
    assert result.returncode == 0, result.stderr
    final = save_tiny_t5(run / "final")
    write_inference_settings(final, read_run_recipe(run))
    return run, data


def evaluated_columns(tmp_path: Path, name: str, *args: str) -> dict:
    """`ftlaunch eval ARGS --dry-run` into a new folder, run in ``tmp_path``: the data section it
    would evaluate with."""
    out = tmp_path / name
    result = run_cli_in_process("eval", "--cpu", *args, "--dry-run", "--output", str(out), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    data = yaml.safe_load((out / "recipe.yaml").read_text())["data"]
    return {key: data[key] for key in ("dataset", "source_field", "target_field")}


def test_eval_on_the_run_s_own_data_reads_its_columns(tmp_path):
    """final/ copied out of its run (as a user keeps or exports it): its ftlaunch.json names the
    dataset and the columns; --data spelling the same folder otherwise (relative) is that
    dataset. Another dataset keeps the defaults; --set still wins over the recorded columns."""
    run, data = run_with_final(tmp_path)
    final = shutil.copytree(run / "final", tmp_path / "kept-model")
    settings = json.loads((final / "ftlaunch.json").read_text())
    assert (settings["source_field"], settings["target_field"]) == ("conversation", ["notes", "notes_2"])
    own = {"dataset": str(data), "source_field": "conversation", "target_field": ["notes", "notes_2"]}
    for index, given in enumerate((str(data), data.name, f"../{tmp_path.name}/{data.name}/")):
        columns = evaluated_columns(tmp_path, f"eval-{index}", "--model", str(final), "--data", given)
        assert columns == own, given
    assert evaluated_columns(tmp_path, "sample", "--model", str(final), "--data", "sample") == {
        "dataset": "sample",
        "source_field": "dialogue",
        "target_field": "summary",
    }
    chosen = evaluated_columns(
        tmp_path, "set", "--model", str(final), "--data", str(data), "--set", "data.source_field=dialogue"
    )
    assert chosen == {**own, "source_field": "dialogue"}


def test_eval_of_an_older_final_takes_the_columns_from_its_run(tmp_path):
    """A final/ whose ftlaunch.json predates the columns (no source_field/target_field): the
    recipe.yaml of the run it is in says them. Out of its run, such a folder says nothing of them:
    the defaults, as before."""
    run, data = run_with_final(tmp_path)
    settings_file = run / "final" / "ftlaunch.json"
    settings = json.loads(settings_file.read_text())
    settings.pop("source_field", None), settings.pop("target_field", None)
    settings_file.write_text(json.dumps(settings, indent=2) + "\n")
    assert evaluated_columns(tmp_path, "older", "--model", str(run / "final"), "--data", str(data)) == {
        "dataset": str(data),
        "source_field": "conversation",
        "target_field": ["notes", "notes_2"],
    }
    elsewhere = shutil.copytree(run / "final", tmp_path / "older-copy")
    assert evaluated_columns(tmp_path, "older-copy-eval", "--model", str(elsewhere), "--data", str(data)) == {
        "dataset": str(data),
        "source_field": "dialogue",
        "target_field": "summary",
    }


def test_eval_of_an_adapter_on_its_run_s_data_reads_its_columns(tmp_path):
    """A LoRA run's final/ is an adapter (--adapter): its ftlaunch.json is the one followed."""
    from launcher.core.recipe import LoraSection
    from launcher.rank.model import apply_lora, build_tiny_t5

    run, data = run_with_final(tmp_path)
    adapter = tmp_path / "adapter"
    apply_lora(build_tiny_t5(100), LoraSection(r=4)).save_pretrained(str(adapter))
    write_inference_settings(adapter, read_run_recipe(run), method="lora")
    columns = evaluated_columns(
        tmp_path, "adapter-eval", "--model", "tiny-t5", "--adapter", str(adapter), "--data", str(data)
    )
    assert columns == {
        "dataset": str(data),
        "source_field": "conversation",
        "target_field": ["notes", "notes_2"],
    }
