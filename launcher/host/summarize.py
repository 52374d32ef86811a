"""``ftlaunch summarize``: summaries of new dialogues with a fine-tuned (or any seq2seq) model.

The prompt, truncation and generation settings come from the model's ``ftlaunch.json`` (written
next to the weights by export.py) or the run's recipe, and generation is the evaluation's own
``generate_predictions``: a run's test split summarized here gives exactly its predictions.
One rank runs in this process; several ranks are launched like ``ftlaunch eval`` (a work
directory with recipe.yaml, command.sh and the inputs) and gathered the same way.

Entry point for the ranks: ``accelerate launch -m launcher.host.summarize --run-dir WORK``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

from launcher.core.dialogues import row_id
from launcher.core.errors import UserError
from launcher.core.jsonl import dumps_line, parse_jsonl_text, read_jsonl, read_jsonl_lines, write_jsonl
from launcher.core.model_settings import SETTINGS_FILE, apply_inference_settings, checked_settings
from launcher.core.modelfiles import check_model_files
from launcher.core.paths import is_local_reference
from launcher.core.prompt_room import check_prompt_room_on_host
from launcher.core.recipe import Recipe
from launcher.core.recipe_loading import apply_overrides, build_recipe, default_recipe_path, read_yaml_mapping
from launcher.core.rundir import RunDir
from launcher.core.writable import check_writable_file, same_file

INPUTS_FILE = "inputs.jsonl"
SUMMARIES_FILE = "summaries.jsonl"
STDIN_ID = "stdin"  # the id of one plain-text dialogue read from standard input
EVAL_KEYS = ("eval.", "data.prompt", "data.max_source_length", "model.precision")
ADAPTER_CONFIG = "adapter_config.json"


# ---------------------------------------------------------------- the model and its settings


def model_folder(source: Path) -> tuple[Path, Path | None]:
    """(folder with the weights or adapter, run directory if there is one)."""
    source = source.expanduser().resolve()
    if (
        not source.is_dir()
        and source.name == RunDir(source.parent).final.name
        and RunDir(source.parent).has_recipe()
    ):
        raise UserError(RunDir(source.parent).no_final_yet())
    if not source.is_dir():
        raise UserError(
            f"{source} is not a directory; pass a run directory, its final/ folder or a model folder"
        )
    run = RunDir(source)
    if run.has_recipe() and run.final.is_dir():
        check_model_files(run.final, "run")
        return run.final, source
    if run.has_recipe():
        raise UserError(run.no_final_yet())
    run_dir = source.parent if RunDir(source.parent).has_recipe() else None
    if not any((source / name).is_file() for name in ("config.json", ADAPTER_CONFIG)):
        raise UserError(
            f"{source} holds no model (no config.json or adapter_config.json); pass a run directory, "
            "its final/ folder or a folder written by save_pretrained"
        )
    check_model_files(source, "model folder")
    return source, run_dir


def base_model_of(adapter: Path, settings: dict | None, run_recipe: dict | None) -> str:
    """An adapter's base model: ftlaunch.json, then the adapter's own config, then the run's recipe."""
    candidates = [
        (settings or {}).get("base_model"),
        adapter_base_model(adapter),
        ((run_recipe or {}).get("model") or {}).get("name"),
    ]
    for name in candidates:
        if name:
            return name
    raise UserError(
        f"adapter {adapter} names no base model; pass a run directory whose recipe.yaml has model.name"
    )


def adapter_on_another_base(adapter: Path, model: str) -> str | None:
    """Why ``ftlaunch eval --model M --adapter A`` may not score what the user means: A records
    another base model (its ftlaunch.json, else adapter_config.json). Shapes may still fit (the
    base's fine-tuned copy, another size's twin), so this is said, not refused."""
    from launcher.core.model_settings import checked_settings
    from launcher.host.launch import same_model

    recorded = (checked_settings(adapter) or {}).get("base_model") or adapter_base_model(adapter)
    if not recorded or same_model(recorded, model):
        return None
    return (
        f"--adapter {adapter} was trained on {recorded}, not on --model {model}: the scores are those "
        "of the adapter on another base model"
    )


def adapter_base_model(adapter: Path) -> str | None:
    """``base_model_name_or_path`` of adapter_config.json, checked: a name, or none at all."""
    path = adapter / ADAPTER_CONFIG
    name = json.loads(path.read_text(encoding="utf-8")).get("base_model_name_or_path")
    if name is not None and not isinstance(name, str):
        raise UserError(
            f"{path}: base_model_name_or_path is {name!r}, not a model name; write the base model's "
            "name or folder there (or pass the run directory, whose recipe.yaml has model.name)"
        )
    return name


def run_recipe_of(run_dir: Path | None) -> dict[str, Any] | None:
    """The run's recipe.yaml as raw data, validated as ``recipe validate`` does: summarize edits
    its sections, so a damaged one must be named with its key first."""
    if run_dir is None:
        return None
    path = RunDir(run_dir).recipe_yaml
    raw = read_yaml_mapping(path)
    build_recipe(raw, f"recipe {path}")
    return raw


def summarize_recipe(source: Path, overrides: list[str], gpus: int, cpu: bool) -> Recipe:
    """The recipe the run evaluated with, pointed at the saved model, with ``--set`` applied."""
    folder, run_dir = model_folder(source)
    run_recipe = run_recipe_of(run_dir)
    raw = run_recipe or read_yaml_mapping(default_recipe_path("full"))
    settings = checked_settings(folder)
    if settings:
        apply_inference_settings(raw, settings)
    adapter = (folder / ADAPTER_CONFIG).is_file()
    raw.setdefault("model", {}).update(
        name=base_model_of(folder, settings, run_recipe) if adapter else str(folder),
        adapter=str(folder) if adapter else None,
        tokenizer=str(folder) if (folder / "tokenizer_config.json").is_file() else None,
    )
    base = raw["model"]["name"]
    if adapter and is_local_reference(base) and Path(base).expanduser().is_dir():
        check_model_files(Path(base).expanduser(), f"base model of {folder}")
    raw["launch"] = {"gpus": gpus, "nodes": 1, "zero": 0, "cpu": cpu}
    overridden = apply_overrides(raw, overrides, refuse_non_generation_keys)
    source = str(folder / SETTINGS_FILE) if settings else f"settings of {folder}"
    return build_recipe(raw, source, overridden)


def refuse_non_generation_keys(item: str) -> None:
    """summarize generates: only the keys of generation and the prompt apply."""
    if not item.startswith(EVAL_KEYS):
        raise UserError(
            f"--set {item}: summarize takes only eval.*, data.prompt, data.max_source_length "
            "and model.precision"
        )


# ---------------------------------------------------------------- inputs and outputs


def read_inputs(input_path: str) -> list[dict[str, Any]]:
    """Rows of id + dialogue: JSON Lines (``dialogue``, optional ``id``), one plain-text
    dialogue per file, or one from standard input (``-``)."""
    if input_path == "-":
        return parse_text_or_jsonl(read_stdin(), "standard input", STDIN_ID)
    path = Path(input_path).expanduser()
    if not path.is_file():
        raise UserError(f"--input {input_path} is not a file; pass a .jsonl file, a text file or -")
    if path.suffix in (".jsonl", ".json"):
        return dialogue_rows(read_jsonl_lines(path), str(path))
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise UserError(f"--input {path} is not UTF-8 text; re-encode it as UTF-8") from None
    return parse_text_or_jsonl(text, str(path), path.stem)


def read_stdin() -> str:
    """Standard input decoded strictly as UTF-8, like a file: the locale's decoder would pass
    bad bytes on as surrogates, which the tokenizer then rejects with a traceback."""
    buffer = getattr(sys.stdin, "buffer", None)
    if buffer is None:  # already text (a StringIO in tests, an embedding program)
        return sys.stdin.read()
    data = buffer.read()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        start = exc.start + (3 if data.startswith(b"\xef\xbb\xbf") else 0)
        number = data.count(b"\n", 0, start) + 1
        raise UserError(
            f"standard input line {number} is not UTF-8 text (byte {start}); re-encode it as UTF-8"
        ) from None


def parse_text_or_jsonl(text: str, source: str, text_id: str) -> list[dict[str, Any]]:
    if text.lstrip().startswith("{"):  # JSON Lines on standard input
        return dialogue_rows(parse_jsonl_text(text, source), source)
    if text.lstrip().startswith("[") and is_json_array(text):  # not a dialogue that opens with "[10:02]"
        raise UserError(
            f"{source} is a JSON array; give JSON Lines (one object with 'dialogue' per line) or plain text"
        )
    if not text.strip():
        raise UserError(f"{source} is empty; give one dialogue as text or JSON Lines with 'dialogue'")
    return [{"id": text_id, "dialogue": text.strip()}]


def is_json_array(text: str) -> bool:
    try:
        return isinstance(json.loads(text), list)
    except ValueError:
        return False


def dialogue_rows(lines: list[tuple[int, Any]], source: str) -> list[dict[str, Any]]:
    rows = []
    for number, row in lines:
        dialogue = row.get("dialogue") if isinstance(row, dict) else None
        if not isinstance(dialogue, str) or not dialogue.strip():
            raise UserError(f"{source} line {number} has no 'dialogue' text; each line needs a dialogue")
        rows.append({"id": row_id(row, str(number - 1), f"{source} line {number}"), "dialogue": dialogue})
    if not rows:
        raise UserError(f"{source} has no dialogues")
    return rows


def check_summaries_output(output: Path, input_path: str) -> None:
    """``--output`` may be a new file, an empty one or an earlier summaries file (replaced); never
    the input, and never another file (a recipe, weights, metrics, predictions) it would replace."""
    check_writable_file(output, "--output")
    if input_path != "-" and same_file(output, Path(input_path)):
        raise UserError(
            f"--output {output} is the --input file; the dialogues would be lost: pick another file"
        )
    if output.is_file() and not is_summaries_file(output):
        raise UserError(
            f"--output {output} exists and is not a summaries file (JSON Lines of id and summary); "
            "pick a new file (or delete it first if it may go)"
        )


def is_summaries_file(path: Path) -> bool:
    """Empty, or only lines of ``{id, summary}`` (what summarize writes): safe to replace."""
    try:
        with path.open("rb") as handle:
            if handle.read(1) not in (b"", b"{", b"\n", b" "):
                return False  # weights, YAML, text: not read further
            handle.seek(0)
            for raw in handle:
                if not raw.strip():
                    continue
                row = json.loads(raw.decode("utf-8"))
                if not isinstance(row, dict) or set(row) != {"id", "summary"}:
                    return False
    except (OSError, ValueError):  # unreadable, not UTF-8, not JSON
        return False
    return True


def write_summaries(rows: list[dict], summaries: list[str], output: Path | None, plain: bool) -> None:
    records = [{"id": r["id"], "summary": s} for r, s in zip(rows, summaries)]
    if output is not None:
        output.parent.mkdir(parents=True, exist_ok=True)
        write_jsonl(output, records)
    elif plain:
        print(summaries[0])
    else:
        sys.stdout.write("".join(dumps_line(record) for record in records))


# ---------------------------------------------------------------- generation


def generate_summaries(recipe: Recipe, rows: list[dict]) -> list[str] | None:
    """The evaluation's generation on this rank's share; the summaries on the main process."""
    from launcher.rank.quiet import quiet_libraries

    quiet_libraries()  # this process's console is the user's: no rank log takes the noise
    from launcher.rank.data import check_prompt_room
    from launcher.rank.distributed import build_accelerator
    from launcher.rank.evaluation import generate_predictions
    from launcher.rank.model import load_for_inference, load_tokenizer

    accelerator = build_accelerator(recipe)
    tokenizer = load_tokenizer(recipe)
    check_prompt_room(tokenizer, recipe)
    model = load_for_inference(recipe.model.name, recipe.model.adapter, len(tokenizer), recipe)
    model = model.to(accelerator.device)
    summaries = generate_predictions(accelerator, model, tokenizer, rows, recipe)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return summaries if accelerator.is_main_process else None


def summarize_launched(recipe: Recipe, rows: list[dict], argv: list[str]) -> list[str]:
    """Several ranks: a work directory launched like ``ftlaunch eval``; the main rank writes
    the summaries there. It is removed once the summaries are read; after a failure it is kept,
    since the failure summary names a rank log inside it."""
    from launcher.host import launch
    from launcher.host.render import SUMMARIZE_MODULE, RankEntry

    try:
        work_dir = Path(tempfile.mkdtemp(prefix="ftlaunch-summarize-"))
    except OSError as exc:
        raise UserError(
            f"cannot create a work folder in {tempfile.gettempdir()} ({exc.strerror}); "
            "set TMPDIR to a directory you can write to"
        ) from None
    code = 1
    try:
        write_jsonl(work_dir / INPUTS_FILE, rows)
        launch.write_run_files(recipe, work_dir, RankEntry(argv, module=SUMMARIZE_MODULE))
        code = launch.run_command(work_dir)
        if code == 0:
            return [row["summary"] for row in read_jsonl(work_dir / SUMMARIES_FILE)]
    finally:
        if code == 0:
            shutil.rmtree(work_dir, ignore_errors=True)
    print(f"  the work folder {work_dir} is kept for its logs: delete it when done", file=sys.stderr)
    raise SystemExit(code)


def summarize(
    source: Path,
    input_path: str,
    output: Path | None,
    gpus: int,
    cpu: bool,
    overrides: list[str],
    argv: list[str],
) -> None:
    """``ftlaunch summarize``: check everything, then generate on one or several ranks."""
    if gpus < 1:
        raise UserError(f"--gpus {gpus} must be at least 1")
    recipe = summarize_recipe(source, overrides, gpus, cpu)
    check_prompt_room_on_host(recipe)
    rows = read_inputs(input_path)
    if output is not None:  # before generating: the summaries must have a place, and lose nothing
        check_summaries_output(output, input_path)
    if not cpu and gpus > 1:
        from launcher.host import launch

        launch.check_gpus(recipe)
    with contextlib.redirect_stdout(sys.stderr):  # library notices must not mix with the summaries
        summaries = summarize_launched(recipe, rows, argv) if gpus > 1 else generate_summaries(recipe, rows)
    write_summaries(
        rows, summaries, output, plain=input_path == "-" and len(rows) == 1 and rows[0]["id"] == STDIN_ID
    )


def rank_main(work_dir: Path) -> int:
    from launcher.core.recipe_loading import read_run_recipe

    recipe = read_run_recipe(work_dir)
    rows = read_jsonl(work_dir / INPUTS_FILE)
    summaries = generate_summaries(recipe, rows)
    if summaries is not None:
        write_jsonl(
            work_dir / SUMMARIES_FILE, [{"id": r["id"], "summary": s} for r, s in zip(rows, summaries)]
        )
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Summarize dialogues on this rank (ftlaunch summarize).")
    parser.add_argument("--run-dir", required=True, type=Path)
    args = parser.parse_args(argv)
    from launcher.core.ranklog import run_rank

    work_dir = args.run_dir.resolve()
    return run_rank(work_dir, lambda: rank_main(work_dir))


if __name__ == "__main__":
    from launcher.core.ranklog import exit_rank

    exit_rank(main())
