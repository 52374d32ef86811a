"""Dialogue files: a split from a hub id, a local directory of JSON Lines, CSV or Parquet files, or
the embedded sample, normalised to one row per dialogue. Read by the ranks (training data), and by
the launcher's checks, fingerprints and scoring on the host.

Every split is normalised to rows of ``id``, ``dialogue`` (the recipe's ``data.source_field``),
``summary`` (the training target: the first of ``data.target_field``) and ``references`` (every
non-empty target column; with the default ``summary``, DialogSum's layouts: ``summary1..3`` in
the original test file, or the repeated rows of the hub's 1,500-row test split merged back into
500 dialogues).
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from launcher.core.errors import UserError
from launcher.core.jsonl import read_jsonl, read_jsonl_lines  # noqa: F401 - read_jsonl is this module's API too
from launcher.core.paths import SAMPLE_DATA_DIR, check_hub_id, is_local_reference
from launcher.core.recipe import EMBEDDED_DATA, DataSection

REFERENCE_FIELDS = ("summary1", "summary2", "summary3")
DEFAULT_TARGET = "summary"
FILE_FORMATS = (".jsonl", ".csv", ".parquet")  # a local split is {split}.jsonl, .csv or .parquet


@dataclass
class Table:
    """Rows of one split as read, with their position (line or row number) for messages, and the
    column names present (for the refusal when a mapped column is missing)."""

    rows: list[tuple[int, dict[str, Any]]]
    columns: list[str]
    unit: str = "row"


# ---------------------------------------------------------------- reading


def dataset_dir(dataset: str) -> Path | None:
    """The local directory behind a dataset reference, or None for a hub id."""
    if dataset == EMBEDDED_DATA:
        return SAMPLE_DATA_DIR
    path = Path(dataset).expanduser()
    if path.is_dir():
        return path
    if is_local_reference(dataset) or path.suffix:
        raise UserError(
            f"data {dataset!r} is not a directory; pass a folder with train, validation and test files "
            "(.jsonl, .csv or .parquet), a hub id such as knkarthick/dialogsum, or sample"
        )
    check_hub_id(dataset, "data")
    return None


def same_dataset(name: str, other: str) -> bool:
    """Two dataset references name the same data: the same hub id (or ``sample``), or the same
    folder however it is written (relative, absolute, through ``~``). A folder gone since is none."""
    if name == other:
        return True
    try:
        mine, theirs = dataset_dir(name), dataset_dir(other)
    except UserError:
        return False
    return mine is not None and theirs is not None and mine.resolve() == theirs.resolve()


def read_csv_table(path: Path) -> Table:
    """A CSV file with a header row (quoted fields may hold newlines, as dialogues do)."""
    try:
        with path.open(encoding="utf-8-sig", newline="") as handle:
            reader = csv.DictReader(handle)
            rows = [(number, row) for number, row in enumerate(reader, start=1)]
            columns = list(reader.fieldnames or [])
    except UnicodeDecodeError:
        raise UserError(f"{path} is not UTF-8 text; re-encode it as UTF-8") from None
    except csv.Error as exc:
        raise UserError(
            f"{path} is not a valid CSV file ({exc}); it needs a header row of column names"
        ) from None
    return Table(rows, columns)


def read_parquet_table(path: Path) -> Table:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as exc:
        raise UserError(f"{path} is not a readable Parquet file ({str(exc).splitlines()[0][:160]})") from None
    return Table(list(enumerate(table.to_pylist(), start=1)), list(table.column_names))


def read_jsonl_table(path: Path) -> Table:
    rows = read_jsonl_lines(path)
    columns = list(dict.fromkeys(key for _, row in rows for key in row))
    return Table(rows, columns, unit="line")


READERS = {".jsonl": read_jsonl_table, ".csv": read_csv_table, ".parquet": read_parquet_table}


def split_file(directory: Path, split: str) -> Path:
    """The one file of a split: {split}.jsonl, .csv or .parquet."""
    found = [
        directory / f"{split}{suffix}"
        for suffix in FILE_FORMATS
        if (directory / f"{split}{suffix}").is_file()
    ]
    if len(found) > 1:
        raise UserError(
            f"split {split!r} is in {len(found)} files ({', '.join(p.name for p in found)}) in {directory}; "
            "keep one of them"
        )
    if not found:
        present = sorted({p.stem for suffix in FILE_FORMATS for p in directory.glob(f"*{suffix}")})
        raise UserError(
            f"split {split!r} not found: {directory / split}.jsonl does not exist, nor .csv or .parquet "
            f"(splits there: {', '.join(present) or 'none'})"
        )
    return found[0]


def is_text(value: Any) -> bool:
    return isinstance(value, str) and bool(value.strip())


def check_columns(table: Table, source: str, source_field: str, targets: list[str]) -> None:
    """The source column and at least one target column must be in the split, or it is refused,
    listing the columns it has. A split may lack some target columns (a training file with one
    summary, a test file with three): there they are just no reference."""
    columns = ", ".join(table.columns) or "none"
    if source_field not in table.columns:
        raise UserError(
            f"data.source_field {source_field!r} is not a column of {source} (columns: {columns}); "
            "set --set data.source_field=COLUMN"
        )
    present = [target for target in targets if target in table.columns]
    if targets == [DEFAULT_TARGET]:
        present += [field for field in REFERENCE_FIELDS if field in table.columns]  # DialogSum's test file
    if not present:
        what = (
            f"data.target_field {targets[0]!r} is not"
            if len(targets) == 1
            else f"none of data.target_field {targets} is"
        )
        raise UserError(
            f"{what} a column of {source} (columns: {columns}); "
            "set --set data.target_field=COLUMN (or [COLUMN1, COLUMN2] for several references)"
        )


def row_references(row: dict[str, Any], targets: list[str]) -> list[str]:
    """The non-empty reference texts of a row, the training target first."""
    if targets == [DEFAULT_TARGET]:
        dialogsum = [row[key] for key in REFERENCE_FIELDS if is_text(row.get(key))]
        if dialogsum:
            return dialogsum
    return [row[key] for key in targets if is_text(row.get(key))]


def normalize_rows(
    table: Table, source: str, source_field: str = "dialogue", targets: list[str] = (DEFAULT_TARGET,)
) -> list[dict[str, Any]]:
    """Map the data's columns onto id/dialogue/summary/references."""
    targets = list(targets)
    if table.rows:  # an empty split is refused as empty by the caller
        check_columns(table, source, source_field, targets)
    out: list[dict[str, Any]] = []
    numbers: list[int] = []
    for number, row in table.rows:
        references = row_references(row, targets)
        dialogue = row.get(source_field)
        if not is_text(dialogue):
            raise UserError(
                f"{source} {table.unit} {number} has no {source_field!r} text; every row needs "
                f"{source_field} and {' or '.join(targets)}"
            )
        if not references:
            also = " (or summary1..3)" if targets == [DEFAULT_TARGET] else ""
            raise UserError(
                f"{source} {table.unit} {number} has no {' or '.join(repr(t) for t in targets)}{also} text; "
                f"every row needs {source_field} and {' or '.join(targets)}"
            )
        out.append(
            {
                "id": row_id(row, f"row_{number}", f"{source} {table.unit} {number}"),
                "dialogue": dialogue,
                "summary": references[0],
                "references": references,
            }
        )
        numbers.append(number)
    check_unique_ids(out, numbers, source, table.unit)
    return merge_repeated_dialogues(out)


def row_id(row: dict[str, Any], default: str, where: str) -> str:
    """The row's id, or ``default`` where it has none (no column, null, or an empty CSV cell). An
    id is text or a number: predictions, summaries and reports name the example by it."""
    value = row.get("id")
    if value is None or value == "":
        return default
    if isinstance(value, dict | list):
        raise UserError(f"{where}: id {value!r} is not text or a number; give each row a text id (or none)")
    return str(value)


def check_unique_ids(rows: list[dict[str, Any]], numbers: list[int], source: str, unit: str) -> None:
    """Predictions, scores and reports name an example by its id: two rows with one id are refused
    (the later one would vanish into the first, or be scored against its references). One dialogue
    repeated once per reference under one id (the hub's DialogSum test layout) is one example and
    keeps it; rows without an id got ``row_N`` (``row_id``)."""
    first: dict[str, tuple[int, dict[str, Any], set[str]]] = {}
    for number, row in zip(numbers, rows):
        seen = first.get(row["id"])
        if seen is None:
            first[row["id"]] = (number, row, set(row["references"]))
            continue
        earlier, first_row, references = seen
        same_dialogue = row["dialogue"] == first_row["dialogue"]
        if same_dialogue and not references.issuperset(row["references"]):
            references.update(row["references"])  # one more reference of the same example
            continue
        detail = " with the same dialogue and summary" if same_dialogue else ""
        raise UserError(
            f"{source}: id {row['id']!r} appears on {unit}s {earlier} and {number}{detail}; "
            "ids must be unique in a split"
        )


def merge_repeated_dialogues(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The hub's test split repeats each dialogue once per reference: fold them into one row."""
    merged: dict[str, dict[str, Any]] = {}
    for row in rows:
        first = merged.get(row["dialogue"])
        if first is None:
            merged[row["dialogue"]] = {**row, "references": list(row["references"])}
        else:
            first["references"].extend(ref for ref in row["references"] if ref not in first["references"])
    return list(merged.values())


def load_split(
    dataset: str,
    split: str,
    limit: int | None = None,
    source_field: str = "dialogue",
    target_field: str | list[str] = DEFAULT_TARGET,
) -> list[dict[str, Any]]:
    """Rows of one split, normalised; errors are UserErrors naming what to fix."""
    targets = [target_field] if isinstance(target_field, str) else list(target_field)
    directory = dataset_dir(dataset)
    if directory is not None:
        path = split_file(directory, split)
        table, source = READERS[path.suffix](path), str(path)
    else:
        table, source = load_hub_split(dataset, split), f"{dataset}[{split}]"
    rows = normalize_rows(table, source, source_field, targets)
    if not rows:
        raise UserError(f"split {split!r} of {dataset} is empty; it needs at least one dialogue")
    return rows[:limit] if limit else rows


def load_data_split(data: DataSection, split: str, limit: int | None = None) -> list[dict[str, Any]]:
    """A split of the recipe's dataset, through its column mapping."""
    return load_split(data.dataset, split, limit, data.source_field, data.target_fields)


def load_hub_split(dataset: str, split: str) -> Table:
    """A split from the Hugging Face hub (or its local cache), with the dataset's own columns."""
    import datasets

    try:
        loaded = datasets.load_dataset(dataset, split=split)
    except ValueError as exc:
        if "split" in str(exc).lower():
            raise UserError(f"split {split!r} does not exist in {dataset}: {exc}") from None
        raise
    except (ConnectionError, OSError, FileNotFoundError) as exc:
        raise UserError(
            f"cannot load dataset {dataset!r} from the hub ({type(exc).__name__}); without network, download it "
            "elsewhere and pass --data DIR with train/validation/test.jsonl"
        ) from None
    return Table([(index, dict(row)) for index, row in enumerate(loaded)], list(loaded.column_names))
