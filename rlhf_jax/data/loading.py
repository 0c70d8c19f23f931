"""Sources -> rows -> tokenised records, with bad rows reported (or skipped and counted).

A source is a `datasets.Dataset`, a local JSON / JSONL / Parquet / CSV file, a directory saved
with `Dataset.save_to_disk`, a Hugging Face hub id (loaded with `datasets.load_dataset`), or
"synthetic:<kind>" for the embedded task. Rows always pass through `datasets`; when Arrow cannot
even parse a local JSON file (a field whose type changes between rows), the file is re-read line
by line so the error names the row and field instead of Arrow's column.

CSV cells hold only scalars: plain-text rows load from CSV, but message lists (conversational
rows) and the lists of ranked rows do not. Such a cell arrives as the list's text, and is a bad
row (naming the row and field) rather than text to train on. An empty cell of a number column
(a pair's margin) is a missing value; one holding "nan", "inf" or "-inf" (any case) is a bad
row, as a non-finite number in JSON Lines is, though the CSV reader would read it as missing.

Checked before rows are used: a text file must be UTF-8 (the first bad byte is named by offset
and line) and not empty; each message role must be one the tokenizer's chat template handles
(`tokenize.role_problem`); exact duplicate rows are counted, and kept or dropped
(`duplicates`), in the summary.
"""

from __future__ import annotations

import codecs
import collections
import csv
import dataclasses
import hashlib
import io
import json
import logging
import math
import pathlib
import re
from typing import Any

from rlhf_jax import errors
from rlhf_jax.data import arithmetic, formats, synthetic, tokenize

__all__ = ["DatasetStats", "load_rows", "prepare", "KINDS", "synthetic_gold_function"]

log = logging.getLogger(__name__)

# kind -> the normaliser for its rows
KINDS = formats.NORMALIZERS

_FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}


@dataclasses.dataclass
class DatasetStats:
  source: str
  rows: int = 0
  kept: int = 0
  truncated: int = 0
  skipped: collections.Counter = dataclasses.field(default_factory=collections.Counter)
  duplicates: int = 0  # rows identical to an earlier row (or to a row of `exclude`)
  duplicates_dropped: bool = False
  # A digest of every row read, so a held-out file can be checked against the training rows.
  row_keys: set = dataclasses.field(default_factory=set, repr=False)

  def summary(self) -> str:
    skipped = ", ".join(f"{n} {why}" for why, n in sorted(self.skipped.items())) or "none"
    duplicates = f"{self.duplicates} {'dropped' if self.duplicates_dropped else 'kept'}"
    return (f"{self.source}: {self.kept}/{self.rows} rows kept; truncated {self.truncated}; "
            f"skipped: {skipped}; exact duplicates: {duplicates}")


def _row_key(row) -> bytes:
  """A digest of a row's whole content (every field), the same for rows that are equal."""
  text = json.dumps(row, sort_keys=True, default=repr, ensure_ascii=False)
  return hashlib.blake2b(text.encode(), digest_size=16).digest()


def _json_lines(text: str) -> list[tuple[int, str]] | None:
  """(1-based line number, line) of each row of a JSON Lines text (blank lines hold none), or
  None when the text is one JSON array."""
  if text.lstrip()[:1] == "[":
    return None
  return [(number, line) for number, line in enumerate(text.splitlines(), 1) if line.strip()]


def _csv_lines(text: str) -> list[int]:
  """The 1-based line on which each CSV row starts, after the header (empty lines hold no row,
  as for datasets' CSV reader; a quoted cell may span lines)."""
  reader = csv.reader(io.StringIO(text))
  starts, end = [], 0
  for record in reader:
    start, end = end + 1, reader.line_num
    if record:
      starts.append(start)
  return starts[1:]  # the first is the header


def _csv_cells(text: str) -> list[dict[str, str]]:
  """The cells of each CSV row as written, by column name, rows aligned with `_csv_lines`."""
  records = [record for record in csv.reader(io.StringIO(text)) if record]
  if not records:
    return []
  header = records[0]
  return [dict(zip(header, record)) for record in records[1:]]


def _row_lines(name: str) -> list[int] | None:
  """For a local line-based file (JSON Lines, CSV), the line number of each row; None for any
  other source."""
  path = pathlib.Path(name)
  if path.suffix not in (".json", ".jsonl", ".csv") or not path.is_file():
    return None
  if path.suffix == ".csv":
    return _csv_lines(path.read_text())
  lines = _json_lines(path.read_text())
  return None if lines is None else [number for number, _ in lines]


def _locate_json_error(path: pathlib.Path, original: Exception):
  """Re-reads a JSON(L) file Arrow rejected, to name the line (or row) and field at fault."""
  text = path.read_text()
  lines = _json_lines(text) if path.suffix == ".jsonl" or text.lstrip()[:1] != "[" else None
  if lines is None:
    try:
      rows = json.loads(text)
    except json.JSONDecodeError as err:
      raise formats.DataError(str(path), None, None, f"invalid JSON: {err}") from original
    located = [(index, {}, row) for index, row in enumerate(rows)]
  else:
    located = []
    for index, (number, line) in enumerate(lines):
      try:
        located.append((index, {"line": number}, json.loads(line)))
      except json.JSONDecodeError as err:
        raise formats.DataError(str(path), index, None, f"expected a JSON object, got invalid "
                                f"JSON ({err})", line=number) from original
  types: dict[str, tuple[str, str]] = {}
  for index, where, row in located:
    if not isinstance(row, dict):
      raise formats.DataError(str(path), index, None,
                              f"expected a JSON object, got {type(row).__name__}",
                              **where) from original
    label = f"line {where['line']}" if where else f"row {index}"
    for key, value in row.items():
      kind = type(value).__name__
      if value is not None and key in types and types[key][0] != kind:
        first_kind, first_label = types[key]
        raise formats.DataError(
            str(path), index, key, f"expected {first_kind} as on {first_label} (every row must "
            f"use the same type for a field), got {kind}", **where) from original
      if value is not None:
        types.setdefault(key, (kind, label))
  raise formats.DataError(str(path), None, None, f"datasets could not load it: {original}")


# A message list that a CSV writer turned into its Python or JSON text.
_MESSAGES_AS_TEXT = re.compile(r"""^\s*\[\s*\{\s*['"](role|content)['"]\s*:""")


def _non_finite(cell: str) -> float | None:
  """The number a CSV cell spells when it is "nan", "inf", "-inf", ... (any case); else None."""
  try:
    value = float(cell)
  except ValueError:
    return None
  return None if math.isfinite(value) else value


def _check_csv_row(row, source: str, index: int, number_columns=(), cells=None):
  """A CSV row's cells: no message list written as text; no "nan"/"inf" in a number column
  (`number_columns`), which the reader turned into a missing value. `cells()` gives the rows'
  cells as written (read only when a number column is missing a value)."""
  for field, value in (row.items() if isinstance(row, dict) else ()):
    if isinstance(value, str) and _MESSAGES_AS_TEXT.match(value):
      raise formats.DataError(source, index, field,
                              "holds a message list written as text: CSV cannot hold lists; "
                              "write conversational rows as JSON Lines or Parquet")
    if value is None and field in number_columns and cells is not None:
      written = cells()
      cell = written[index].get(field, "") if index < len(written) else ""
      if (number := _non_finite(cell.strip())) is not None:
        raise formats.DataError(source, index, field, f"expected a finite number, got {number!r}")


def load_rows(source: Any, *, split: str = "train", kind: str | None = None, num_rows=None,
              subset: str | None = None):
  """Returns (rows, name): an indexable sequence of dict rows and a name for error messages."""
  import datasets

  if isinstance(source, datasets.Dataset):
    return source, getattr(source, "info", None) and source.info.dataset_name or "<Dataset>"
  if isinstance(source, (list, tuple)):
    # Used as they are: Dataset.from_list takes its columns from the first row and would drop
    # fields that only later rows have.
    return list(source), "<rows>"
  source = str(source)
  if source.startswith("synthetic:"):
    return _synthetic_rows(source, kind, num_rows), source
  path = pathlib.Path(source)
  if path.is_dir() and (path / "dataset_info.json").exists():
    return datasets.load_from_disk(str(path)), source
  if path.is_dir() and (path / "dataset_dict.json").exists():  # a saved DatasetDict: pick the split
    splits = datasets.load_from_disk(str(path))
    if split not in splits:
      raise formats.DataError(source, None, None, f"has splits {sorted(splits)}, not {split!r} "
                              "(set data.split / data.eval_split)")
    return splits[split], f"{source}[{split}]"
  if path.suffix in _FILE_BUILDERS:
    if not path.exists():
      raise formats.DataError(source, None, None, "the data file does not exist")
    _check_file_text(path, source)
    try:
      return datasets.load_dataset(_FILE_BUILDERS[path.suffix], data_files=str(path),
                                   split="train"), source
    except Exception as err:  # Arrow's schema errors come wrapped in several types
      if "corresponds to no data" in str(err):  # datasets' words for a split of no rows
        raise formats.DataError(source, None, None, _NO_ROWS) from err
      if _FILE_BUILDERS[path.suffix] == "json":
        _locate_json_error(path, err)
      raise formats.DataError(source, None, None, "datasets could not load it: "
                              f"{errors.one_line(err) or type(err).__name__}") from err
  if path.exists():
    raise formats.DataError(source, None, None, f"unsupported data file type {path.suffix!r}; "
                            f"use one of {sorted(_FILE_BUILDERS)} or a saved Dataset directory")
  try:
    return datasets.load_dataset(source, subset, split=split), source  # a hub id
  except (FileNotFoundError, ConnectionError) as err:  # DatasetNotFoundError; offline
    raise formats.DataError(source, None, None, "expected a local data file, a saved Dataset "
                            "directory or a hub dataset id that can be reached, got none of them "
                            f"({type(err).__name__}: {err})") from err


_NO_ROWS = "the data file is empty: it holds no rows (a CSV header or an empty JSON list only)"


def _check_file_text(path: pathlib.Path, source: str):
  """An empty file, or a text file (JSON, JSONL, CSV) that is not UTF-8, is a DataError naming
  the first bad byte's offset and line; read in chunks, so a large file costs no memory."""
  if path.stat().st_size == 0:
    raise formats.DataError(source, None, None, "the data file is empty (0 bytes)")
  if path.suffix not in (".json", ".jsonl", ".csv"):
    return
  decoder = codecs.getincrementaldecoder("utf-8")()
  offset, lines, blank = 0, 1, True
  with path.open("rb") as file:
    while chunk := file.read(1 << 20):
      pending = len(decoder.getstate()[0])  # bytes of a character the last chunk cut in two
      try:
        blank = not decoder.decode(chunk).strip() and blank
      except UnicodeDecodeError as err:
        data, start = err.object, err.start
        at = offset - pending + start
        line = lines + data[:start].count(b"\n")  # pending bytes hold no newline
        raise formats.DataError(
            source, None, None, f"expected UTF-8 text, got the byte 0x{data[start]:02x} at byte "
            f"offset {at} (re-save the file as UTF-8)", line=line) from None
      offset += len(chunk)
      lines += chunk.count(b"\n")
  if blank:
    raise formats.DataError(source, None, None, "the data file is empty (whitespace only)")


def _synthetic_rows(source: str, kind: str | None, num_rows):
  """'synthetic:<kind>[:seed]' -> rows of an embedded task: the review task's sft | pair |
  unpaired | ranked | prompt, or the arithmetic task's arith_sft | arith_prompt | arith_eval
  (held-out operand pairs)."""
  import datasets

  parts = source.split(":")
  seed = int(parts[2]) if len(parts) > 2 else 0
  task, arith = synthetic.SyntheticTask(seed=seed), arithmetic.ArithmeticTask(seed=seed)
  which = parts[1] if len(parts) > 1 and parts[1] else kind
  n = num_rows or 2048
  makers = {"sft": task.sft_rows, "pair": task.preference_rows,
            "unpaired": task.unpaired_rows, "ranked": task.ranked_rows,
            "prompt": task.prompt_rows, "arith_sft": arith.sft_rows,
            "arith_prompt": arith.prompt_rows, "arith_eval": arith.eval_rows}
  if which not in makers:
    raise formats.DataError(source, None, None, f"expected a synthetic kind in {sorted(makers)}, "
                            f"got {which!r}")
  return datasets.Dataset.from_list(makers[which](n))


def synthetic_gold_function(source) -> str | None:
  """The gold reward ('module:name') of an embedded task's prompts, or None for other data."""
  if not isinstance(source, str) or not source.startswith("synthetic:"):
    return None
  kind = source.split(":")[1]
  if kind.startswith("arith_"):
    return "rlhf_jax.rewards:math_answer"  # the rows' answer column is the reference
  return "rlhf_jax.data.synthetic:gold_reward_fn"


def prepare(kind: str, source: Any, tokenizer, config: tokenize.TokenizeConfig, *,
            on_bad_row: str = "raise", split: str = "train", num_rows: int | None = None,
            rows=None, subset: str | None = None, options: dict | None = None,
            duplicates: str = "keep", exclude: set | None = None):
  """Loads, normalises and tokenises a dataset. Returns (records, DatasetStats).

  on_bad_row: "raise" stops at the first bad row with a DataError naming source, row and field;
  "skip" drops it and counts it by reason (logged, and in the returned stats). Never silent.
  duplicates: rows identical to an earlier one (every field equal) are counted in the stats and
  "keep" keeps them, "drop" drops them; `exclude` (another load's `stats.row_keys`, e.g. the
  training rows when this is the held-out file) counts and, with "drop", drops its rows too.
  subset: a hub dataset's configuration (e.g. "main" for openai/gsm8k); options: keyword
  arguments of the kind's normaliser (prompts: prompt_column, chat, system_prompt).
  """
  if kind not in KINDS:
    raise ValueError(f"unknown data kind {kind!r}; expected one of {sorted(KINDS)}")
  if on_bad_row not in ("raise", "skip"):
    raise ValueError(f"on_bad_row must be 'raise' or 'skip', got {on_bad_row!r}")
  if duplicates not in ("keep", "drop"):
    raise ValueError(f"duplicates must be 'keep' or 'drop', got {duplicates!r}")
  if rows is None:
    rows, name = load_rows(source, split=split, kind=kind, num_rows=num_rows, subset=subset)
  else:
    name = str(source)
  stats = DatasetStats(source=name, duplicates_dropped=duplicates == "drop")
  normalize = KINDS[kind]
  is_csv = name.lower().endswith(".csv")
  features = getattr(rows, "features", None) or {}
  number_columns = {column for column, feature in features.items()
                    if str(getattr(feature, "dtype", "")).startswith("float")}
  cells_read = []

  def cells():  # the CSV file's cells as written, read once at the first missing number
    if not cells_read:
      path = pathlib.Path(name)
      cells_read.append(_csv_cells(path.read_text()) if path.is_file() else [])
    return cells_read[0]

  records = []
  lines = None  # the file's line of each row, read at the first bad row of a line-based file
  for index, row in enumerate(rows):
    stats.rows += 1
    key = _row_key(row)
    if key in stats.row_keys or (exclude and key in exclude):
      stats.duplicates += 1
      if duplicates == "drop":
        continue
    stats.row_keys.add(key)
    try:
      if is_csv:
        _check_csv_row(row, name, index, number_columns, cells)
      example = normalize(row, name, index, **(options or {}))
      _check_roles(example, row, tokenizer, name, index)
      record = tokenize.tokenize_example(example, tokenizer, config, name, index)
    except formats.DataError as err:
      if err.row is not None and err.line is None:
        lines = _row_lines(name) if lines is None else lines
        if lines and err.row < len(lines):
          located = err.at_line(lines[err.row])
          if on_bad_row == "raise":
            raise located from err
          err = located
      if on_bad_row == "raise":
        raise
      stats.skipped[_reason(err)] += 1
      log.warning("skipping bad row: %s", err)
      continue
    except tokenize.SkipRow as skip:
      stats.skipped[str(skip)] += 1
      continue
    stats.truncated += int(record.truncated)
    records.append(record)
  if records and isinstance(records[0], tokenize.TokenizedPrompt):
    lines = _row_lines(name) if lines is None else lines  # for reward functions' messages
    if lines:
      records = [dataclasses.replace(r, line=lines[r.row]) if r.row < len(lines) else r
                 for r in records]
  stats.kept = len(records)
  if stats.rows == 0:
    raise formats.DataError(name, None, None, "holds no rows")
  if not records:
    raise formats.DataError(name, None, None, f"no usable rows ({stats.summary()})")
  log.info("data %s", stats.summary())
  return records, stats


def _check_roles(example, row, tokenizer, source: str, index: int):
  """A message whose role the tokenizer's chat template does not handle is a DataError naming
  the role, its field and the roles the template does handle (never text the template drops or
  writes as <unk> tokens). Each role is probed once (`tokenize.role_problem`)."""
  if tokenizer is None or getattr(tokenizer, "chat_template", None) is None:
    return  # plain text; or conversational rows, which tokenize rejects without a template
  texts = [getattr(example, name, None) for name in ("prompt", "completion", "chosen",
                                                       "rejected")]
  roles = {m["role"] for text in [*texts, *getattr(example, "completions", ())]
           if isinstance(text, tuple) for m in text}
  for role in sorted(roles):
    problem = tokenize.role_problem(tokenizer, role)
    if problem is not None:
      handled = tokenize.template_roles(tokenizer, also=roles)
      raise formats.DataError(source, index, _role_field(row, role),
                              f"role {role!r} is not one the tokenizer's chat template handles "
                              f"({problem}); it handles the roles {handled}")


def _role_field(row, role: str) -> str | None:
  """The field of the first message of `role` in a raw row, e.g. "messages[2].role"."""
  for key, value in (row.items() if isinstance(row, dict) else ()):
    for i, item in enumerate(value if isinstance(value, (list, tuple)) else ()):
      nested = item if isinstance(item, (list, tuple)) else [item]  # ranked rows' completions
      for j, message in enumerate(nested):
        if isinstance(message, dict) and message.get("role") == role:
          return f"{key}[{i}][{j}].role" if nested is item else f"{key}[{i}].role"
  return None


def _reason(err: formats.DataError) -> str:
  return f"{err.field or 'row'}: {err.what.split(' (')[0][:60]}"
