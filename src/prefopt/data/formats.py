"""Read preference records from files, folders or the hub; recognise their shape; normalise.

To add a shape: write its normaliser `(record, where, ctx) -> [Pair or Unpaired, ...]` in the
"Shapes" section; add ONE `Shape(name, recognises, normalise, fields, paired, required)` entry to the
SHAPES table at the place it should be tried (entries are tried in order; the first whose
`recognises(record)` is true wins; `fields` is what the error for an unrecognised record lists;
`required` holds the field sets a record of it has, for naming the shape a record almost matches); in
tests/test_shapes.py, add a case to test_recognition_follows_the_shapes_table and a test that loads
a small file of it. (Listing it below keeps this docstring true.)

Every record comes out as a Pair or an Unpaired carrying `where` ("file line 7", "file record 3")
so that any later error can name its origin. Shapes, recognised from a record's fields:

    standard        {"prompt": str, "chosen": str, "rejected": str}
    conversational  {"prompt": [messages], "chosen": [messages], "rejected": [messages]}
                    (a message is {"role": system|user|assistant|tool, "content": str})
    implicit        {"chosen": transcript, "rejected": transcript}, no prompt: two whole
                    transcripts (strings with "\\n\\nHuman:"/"\\n\\nAssistant:" turns, as in
                    HH-RLHF, or message lists) sharing a prefix; the prompt is their longest common
                    prefix that ends at a turn boundary, and they must differ only in the last turn
    sharegpt        {"conversations": [{"from": human|gpt|system|..., "value": str}],
                     "chosen": {"from": "gpt", "value": str}, "rejected": {...}}
    unpaired        {"prompt": str | [messages], "completion": str | [messages], "label": bool}
                    {"messages": [..., assistant message], "label": bool}
                    {"conversations": [..., gpt message], "label": bool}
    ratings         {"prompt": str | [messages], "completions": [{"response": str, "score": num}, ...]}
                    or {"prompt", "responses": [str, ...], "scores": [num, ...]}: turned into pairs by
                    a rule (best_vs_worst, best_vs_random, all_pairs) and a minimum score gap
    ultrafeedback   {"prompt": str, "chosen": [user turn(s)..., assistant], "rejected": [the same
                    turns..., assistant]} (HuggingFaceH4/ultrafeedback_binarized, argilla's cleaned
                    copies): as TRL's maybe_extract_prompt, the prompt is the turns chosen and rejected
                    share (as for implicit message lists) and the string prompt, which repeats the last
                    user turn, is not used. When it is not that turn's text (stripped), the turns still
                    win (they are what the responses answered) and the record is counted in
                    `Loaded.notes`, which `prefopt data check` and training's log report.
    argilla         {"instruction": str, "chosen_response": str, "rejected_response": str}
                    (argilla/ultrafeedback-binarized-preferences): a standard pair
    orca            {"system": str (optional, may be empty), "question": str, "chosen": str,
                    "rejected": str} (Intel/orca_dpo_pairs): a conversational pair, prompt
                    [system (when not empty), user question], responses one assistant message each

Message lists may also come as TRL's maybe_convert_to_chatml accepts them ({"from", "value"}
messages in prompt/chosen/rejected/completion/messages) or OpenAI-style (content as a list of
{"type": "text", "text"} parts, joined; the "developer" role, read as system).

The paired shapes normalise to Pair (`Pair.conversational` says which), unpaired records to Unpaired
(label True = desirable), for KTO/BCO. `data.fields` renames a file's fields to these names, in the
direction of datasets' `rename_column(original, new)`: {your column: prefopt's name}, e.g.
{instruction: prompt, response_j: chosen, response_k: rejected}. A column it names that the data
lacks is an error naming the source and its columns; a mapping written the old way round
({prefopt's name: your column}, read so before) is recognised and the error shows it turned round.
A record that matches no shape but almost matches one (a field misspelt, or under a common other
name) is an error naming the shape, what is missing and the data.fields entry that fixes it.

Scores: with `data.min_score_gap` set, a pair whose score_chosen - score_rejected (or another
SCORE_FIELDS pair) is not more than the gap is skipped, counted; data without scores is an error.

Containers: JSONL, JSON (an array, or {"data": [...]}), CSV and TSV (a header row; cells holding JSON
lists or objects are decoded; label cells true/false/1/0/yes/no), these four also compressed (.gz,
.bz2, .xz after the type: pairs.jsonl.gz), Parquet, a `datasets.save_to_disk` folder, a hub dataset
id; a folder of splits or a hub id may name its split as `source:split` (see sources.py).

A record nested more than MAX_DEPTH levels deep (lists and objects inside each other), or deeper
than Python's JSON parser allows, is a bad record like the others: the code that walks records
(validation, comparison, chat templates) recurses and must not meet unbounded depth.

A record that cannot be used is an error naming it, or with `on_bad_record="skip"` it is skipped and
counted by reason (`Loaded.skipped`). A pair whose chosen equals its rejected carries no preference
and is always skipped, counted.
"""

from __future__ import annotations

import csv
import difflib
import json
import os
import random
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Optional, Union

from prefopt.data import sources
from prefopt.errors import PrefoptError

ROLES = ("system", "user", "assistant", "tool")
PAIR_FIELDS = ("prompt", "chosen", "rejected")
RATING_RULES = ("best_vs_worst", "best_vs_random", "all_pairs")
SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "model": "assistant",
    "chatgpt": "assistant",
    "bard": "assistant",
    "system": "system",
    "function_call": "assistant",
    "observation": "tool",
    "tool": "tool",
}
MAX_LINE_BYTES = 16 << 20  # a JSONL line longer than this is refused, not read into memory whole
MAX_DEPTH = 100  # lists/objects inside each other in one record (the record itself is 1); a real one needs ~5
TOO_DEEP = "nested too deeply"  # the skip reason of records nested deeper than MAX_DEPTH or the JSON parser allows
PARSER_LIMIT = "nested deeper than Python's JSON parser allows (lists or objects inside each other)"
_DEPTH_RULE = "a preference record needs a few levels (a record, its message lists, their messages)"
SAME_RESPONSES = "chosen equals rejected"  # skip reasons that are not bad records: always skipped, counted
NO_SCORE_GAP = "no two scores differ by more than data.ratings_min_gap"
SCORE_GAP = "scores not more than data.min_score_gap apart"
BENIGN_SKIPS = (SAME_RESPONSES, NO_SCORE_GAP, SCORE_GAP)
NO_SCORES = "no scores for data.min_score_gap"  # a bad record: a pair without scores where others had them
PROMPT_MISMATCH = "prompt field is not the conversation's last user turn"  # a note: the record is used
# (chosen's score, rejected's score) field names, in the order they are looked for, for data.min_score_gap
SCORE_FIELDS = (
    ("score_chosen", "score_rejected"),  # HuggingFaceH4/ultrafeedback_binarized
    ("chosen_score", "rejected_score"),
    ("chosen_rating", "rejected_rating"),  # argilla/dpo-mix-7k
    ("chosen-rating", "rejected-rating"),  # argilla/ultrafeedback-binarized-preferences-cleaned
    ("chosen_avg_rating", "rejected_avg_rating"),  # argilla/ultrafeedback-binarized-preferences
)
# the fields of the general shapes: a data.fields value among them is read as the target of a rename
MAIN_FIELDS = frozenset(
    ("prompt", "chosen", "rejected", "completion", "label", "messages", "conversations", "completions", "responses")
)
MESSAGE_FIELDS = ("prompt", "chosen", "rejected", "completion", "messages")  # may hold message lists
# common names of prefopt's fields in public data, for the hint when a record almost matches a shape
FIELD_ALIASES = {
    "instruction": "prompt",
    "question": "prompt",
    "query": "prompt",
    "input": "prompt",
    "response_j": "chosen",
    "chosen_response": "chosen",
    "accepted": "chosen",
    "preferred": "chosen",
    "better": "chosen",
    "good": "chosen",
    "positive": "chosen",
    "response_k": "rejected",
    "rejected_response": "rejected",
    "dispreferred": "rejected",
    "worse": "rejected",
    "bad": "rejected",
    "negative": "rejected",
    "response": "completion",
    "output": "completion",
    "answer": "completion",
    "desirable": "label",
    "is_desirable": "label",
}
TEXT_KEYS = ("response", "text", "completion", "content", "output", "answer")
SCORE_KEYS = ("score", "rating", "overall_score", "reward")

Messages = list  # list of {"role", "content"}


# ----------------------------------------------------------------------------------------------
# What reading produces


@dataclass
class Pair:
    """A preference pair: `chosen` is preferred to `rejected` as a reply to `prompt` (strings or message lists)."""

    prompt: Union[str, Messages]
    chosen: Union[str, Messages]
    rejected: Union[str, Messages]
    where: str = ""

    @property
    def conversational(self) -> bool:
        """True when the pair holds message lists rather than strings."""
        return isinstance(self.chosen, list)


@dataclass
class Unpaired:
    """One completion of `prompt` labelled desirable (True) or undesirable (False), for KTO/BCO."""

    prompt: Union[str, Messages]
    completion: Union[str, Messages]
    label: bool
    where: str = ""

    @property
    def conversational(self) -> bool:
        """True when the example holds message lists rather than strings."""
        return isinstance(self.completion, list)


@dataclass
class Options:
    """How to read a source: the config's `data` keys that concern reading."""

    shape: str = "auto"  # auto | one of SHAPES
    fields: dict = field(default_factory=dict)  # {the file's field name: prefopt name}, as rename_column
    ratings_rule: str = "best_vs_worst"
    ratings_min_gap: float = 0.0  # a pair needs score(chosen) - score(rejected) > this
    min_score_gap: Optional[float] = None  # pairs with score_chosen - score_rejected <= this are skipped; None: off
    user_marker: str = "\n\nHuman:"  # turn markers of implicit string transcripts
    assistant_marker: str = "\n\nAssistant:"
    on_bad_record: str = "error"  # error | skip (counted)
    seed: int = 0  # for best_vs_random

    def validate(self) -> None:
        """A PrefoptError naming the data.* key whose value is not one of its choices."""
        if self.shape != "auto" and self.shape not in SHAPES:
            raise PrefoptError(f"data.shape must be auto or one of {', '.join(SHAPES)}, found '{self.shape}'.")
        if self.ratings_rule not in RATING_RULES:
            raise PrefoptError(
                f"data.ratings_rule must be one of {', '.join(RATING_RULES)}, found '{self.ratings_rule}'."
            )
        if self.on_bad_record not in ("error", "skip"):
            raise PrefoptError(f"data.on_bad_record must be error or skip, found '{self.on_bad_record}'.")
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in self.fields.items()):
            raise PrefoptError(f"data.fields must map field names to field names, found {self.fields}.")
        gap = self.min_score_gap
        if gap is not None and (isinstance(gap, bool) or not isinstance(gap, (int, float)) or not gap >= 0):
            raise PrefoptError(f"data.min_score_gap must be a number >= 0 (or null: off), found {gap!r}.")


@dataclass
class Loaded:
    """The examples read from one source, the shape they share, and the records skipped (by reason)."""

    items: list  # Pair or Unpaired
    shape: str
    records: int = 0  # records read (a ratings record may give several pairs, or none)
    skipped: Counter = field(default_factory=Counter)  # reason -> count
    examples: dict = field(default_factory=dict)  # reason -> first message (names the record)
    notes: Counter = field(default_factory=Counter)  # used records with something worth a look: reason -> count
    note_examples: dict = field(default_factory=dict)  # reason -> first message
    split: Optional[str] = None  # the split read (None for a file or a single-dataset folder)

    @property
    def paired(self) -> bool:
        """True unless the shape gives Unpaired examples."""
        return is_paired(self.shape)

    def skip(self, reason: str, message: str) -> None:
        """Count one skipped record under `reason`, keeping the first message of each reason."""
        self.skipped[reason] += 1
        self.examples.setdefault(reason, message)

    def note(self, reason: str, message: str) -> None:
        """Count one record that was used but deserves a look, keeping the first message of each reason."""
        self.notes[reason] += 1
        self.note_examples.setdefault(reason, message)

    def report(self) -> str:
        """One line: records read, the shape, examples produced, what was skipped and noted."""
        unit = "pairs" if self.paired else "examples"
        text = f"{self.records} records, shape {self.shape}, {len(self.items)} {unit}"
        if self.skipped:
            text += "; skipped: " + ", ".join(f"{n} {r}" for r, n in self.skipped.most_common())
        if self.notes:
            text += "; noted: " + ", ".join(f"{n} {r}" for r, n in self.notes.most_common())
        return text


class BadRecord(PrefoptError):
    """One record cannot be used; `reason` is a short category for counting."""

    def __init__(self, message: str, reason: str):
        super().__init__(message)
        self.reason = reason


class CsvRow(dict):
    """A record read from CSV: every value was a string cell."""


@dataclass
class Context:
    """What a shape's normaliser may use besides the record: the options, a seeded RNG (for
    best_vs_random) and the Loaded being filled (to count records that give no example)."""

    options: Options
    rng: random.Random
    loaded: Loaded
    source: str = ""  # the source being read, for errors about the whole source
    fields_checked: bool = False  # data.fields was checked against the first record
    scored: bool = False  # a record had scores (for data.min_score_gap)


@dataclass(frozen=True)
class Shape:
    """One data shape: its name, how a record of it is recognised from its fields, how such a record
    becomes Pair/Unpaired examples, and whether those are pairs."""

    name: str
    recognises: Callable[[dict], bool]  # tried in SHAPES order on a dict record; the first true one wins
    normalise: Callable[[dict, str, Context], list]  # (record, where, ctx) -> [Pair or Unpaired, ...]
    fields: str  # its fields, for the message when a record matches no shape
    paired: bool = True
    # the field sets a record of it has (any one of them), for naming the shape a record almost matches
    required: tuple = ()


# ----------------------------------------------------------------------------------------------
# Reading raw records


def _jsonl_lines(path: Path, compression: Optional[str]) -> Iterator[tuple[int, bytes]]:
    """(line number, raw bytes) of each line of a JSONL file, decompressed; a line longer than
    MAX_LINE_BYTES, or compressed data that breaks off, is an error naming the line."""
    lineno = 0
    with sources.opener(path, compression)(path, "rb") as f:
        while True:
            try:
                raw = f.readline(MAX_LINE_BYTES + 1)
            except sources.DECOMPRESS_ERRORS as e:
                raise PrefoptError(f"{path} line {lineno + 1}: {sources.decompress_failure(compression, e)}") from None
            if not raw:
                return
            lineno += 1
            if len(raw) > MAX_LINE_BYTES and not raw.endswith(b"\n"):
                raise PrefoptError(
                    f"{path} line {lineno}: the line is longer than {MAX_LINE_BYTES >> 20} MiB; expected one JSON "
                    "record per line (is this really a JSONL file?)."
                )
            yield lineno, raw


_BLANK = object()  # what _jsonl_record gives for a blank line (a line "null" is a record: None)


def _jsonl_record(raw: bytes, where: str):
    """One JSONL line as a record, a BadRecord saying why it is not one, or _BLANK for a blank line."""
    if b"\x00" in raw:
        return BadRecord(f"{where}: binary data (NUL bytes), not JSON text; is this a JSONL file?", "not UTF-8")
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return BadRecord(f"{where}: not UTF-8 text (byte {e.start}); is this a JSONL file?", "not UTF-8")
    if not line.strip():
        return _BLANK
    try:
        return json.loads(line)
    except json.JSONDecodeError as e:
        return BadRecord(f"{where}: invalid JSON at column {e.colno}: {e.msg}.", "invalid JSON")
    except RecursionError:
        return BadRecord(f"{where}: {PARSER_LIMIT}; {_DEPTH_RULE}.", TOO_DEEP)


def _read_jsonl(path: Path, compression: Optional[str] = None) -> Iterator[tuple[str, object]]:
    n = 0
    for lineno, raw in _jsonl_lines(path, compression):
        where = f"{path} line {lineno}"
        record = _jsonl_record(raw, where)
        if record is _BLANK:
            continue
        n += 1
        yield where, record
    if n == 0:
        raise PrefoptError(f"{path}: the file holds no records.")


_JSON_NESTING = re.compile(r'"(?:[^"\\]|\\.)*"|[\[\]{}]')  # a string (skipped) or a bracket


def _deep_line(text: str, limit: int) -> int:
    """The line of JSON `text` where lists/objects first nest more than `limit` deep (1 if never)."""
    depth = 0
    for m in _JSON_NESTING.finditer(text):
        token = m.group()
        if token in "[{":
            depth += 1
            if depth > limit:
                return text.count("\n", 0, m.start()) + 1
        elif token in "]}":
            depth -= 1
    return 1


def _read_json(path: Path, compression: Optional[str] = None) -> Iterator[tuple[str, object]]:
    raw = sources.read_bytes(path, compression)
    try:
        text = raw.decode("utf-8")
        data = json.loads(text)
    except UnicodeDecodeError as e:
        raise PrefoptError(f"{path}: not UTF-8 text (byte {e.start}); is this a JSON file?") from None
    except json.JSONDecodeError as e:
        raise PrefoptError(f"{path} line {e.lineno} column {e.colno}: invalid JSON: {e.msg}.") from None
    except RecursionError:
        line = _deep_line(text, MAX_DEPTH + 1)  # + 1: the array around the records
        raise PrefoptError(f"{path} line {line}: {PARSER_LIMIT}; {_DEPTH_RULE}.") from None
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list):
        raise PrefoptError(f'{path}: expected a JSON array of records (or {{"data": [...]}}), found {_describe(data)}.')
    if not data:
        raise PrefoptError(f"{path}: the file holds no records.")
    for i, record in enumerate(data):
        yield f"{path} record {i}", record


def _csv_cell(value: str):
    """A CSV cell: JSON lists/objects (message lists, completions) are decoded, the rest stay text.
    JSON nested deeper than the parser allows raises RecursionError (the caller names the cell)."""
    s = value.strip()
    if s[:1] in ("[", "{"):
        try:
            return json.loads(s)
        except json.JSONDecodeError:
            return value
    return value


def _csv_record(header: list[str], row: list[str], where: str) -> Union[CsvRow, BadRecord]:
    """One CSV row as a record, or the BadRecord saying why it is not one."""
    if len(row) != len(header):
        return BadRecord(
            f"{where}: {len(row)} cells, but the header names {len(header)} fields ({', '.join(header)}).",
            "wrong number of CSV cells",
        )
    record = CsvRow()
    for h, c in zip(header, row):
        try:
            record[h] = _csv_cell(c)
        except RecursionError:
            return _bad(where, h, f"{PARSER_LIMIT}; {_DEPTH_RULE}.", TOO_DEEP)
    return record


def _read_csv(path: Path, compression: Optional[str] = None, delimiter: str = ",") -> Iterator[tuple[str, object]]:
    kind = "TSV" if delimiter == "\t" else "CSV"
    try:
        text = sources.read_bytes(path, compression).decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise PrefoptError(f"{path}: not UTF-8 text (byte {e.start}); is this a {kind} file?") from None
    csv.field_size_limit(MAX_LINE_BYTES)
    reader = csv.reader(text.splitlines(keepends=True), delimiter=delimiter)
    try:
        header = next(reader, None)
        if not header or not any(h.strip() for h in header):
            raise PrefoptError(f"{path}: expected a header row naming the fields (prompt, chosen, rejected, ...).")
        header = [h.strip() for h in header]
        n = 0
        start = reader.line_num + 1
        for row in reader:
            where = f"{path} line {start}"
            start = reader.line_num + 1
            if not row or not any(c.strip() for c in row):
                continue
            n += 1
            yield where, _csv_record(header, row, where)
    except csv.Error as e:
        raise PrefoptError(f"{path} line {reader.line_num}: unreadable {kind}: {e}.") from None
    if n == 0:
        raise PrefoptError(f"{path}: the file holds no records (only a header).")


def _read_tsv(path: Path, compression: Optional[str] = None) -> Iterator[tuple[str, object]]:
    return _read_csv(path, compression, delimiter="\t")


def _datasets():
    """The `datasets` library, imported on first use: only Parquet files, save_to_disk folders and
    hub ids need it, and importing it takes ~0.6 s (reading a JSONL file takes ~0.01 s to import)."""
    import datasets  # lazy on purpose: see the docstring

    return datasets


def _read_dataset(ds, name: str) -> Iterator[tuple[str, object]]:
    if len(ds) == 0:
        raise PrefoptError(f"{name}: the dataset holds no records.")
    for i, record in enumerate(ds):
        yield f"{name} record {i}", record


def _read_parquet(path: Path, compression: Optional[str] = None) -> Iterator[tuple[str, object]]:
    if compression:
        raise PrefoptError(f"{path}: a Parquet file is compressed inside; give it as .parquet, not {compression}.")
    try:
        ds = _datasets().Dataset.from_parquet(str(path))
    except Exception as e:
        raise PrefoptError(f"{path}: not a readable Parquet file ({type(e).__name__}: {e}).") from None
    return _read_dataset(ds, str(path))


_FILE_READERS = {
    ".jsonl": _read_jsonl,
    ".json": _read_json,
    ".csv": _read_csv,
    ".tsv": _read_tsv,
    ".parquet": _read_parquet,
}
_FILE_TYPES = ".jsonl, .json, .csv, .tsv or .parquet (the first four also compressed: .gz, .bz2 or .xz)"


def _read_file(path: Path) -> Iterator[tuple[str, object]]:
    kind, compression = sources.file_kind(path)
    if path.stat().st_size == 0:
        raise PrefoptError(f"{path}: the file is empty.")
    if kind not in _FILE_READERS:
        shown = kind + (compression or "") or "(no suffix)"
        raise PrefoptError(f"{path}: unknown file type '{shown}'; expected {_FILE_TYPES}.")
    return _FILE_READERS[kind](path, compression)


def _read_folder(path: Path, split: str, named: bool) -> tuple[Iterator[tuple[str, object]], Optional[str]]:
    """The records of a save_to_disk folder and the split read (None for a single dataset). `named`: the
    split was given with the source (`folder:split`), so a folder without splits is an error."""
    datasets = _datasets()
    try:
        ds = datasets.load_from_disk(str(path))
    except FileNotFoundError:
        raise PrefoptError(
            f"{path}: a folder, but not one written by datasets' save_to_disk "
            "(no dataset_info.json / dataset_dict.json)."
        ) from None
    if not isinstance(ds, datasets.DatasetDict):
        if named:
            raise PrefoptError(f"{path}:{split}: the folder holds one dataset, without splits; give it as {path}.")
        return _read_dataset(ds, str(path)), None
    if split not in ds:
        raise PrefoptError(
            f"{path}: no split '{split}'; it has {', '.join(ds)} (name one with the source, as "
            f"{path}:{next(iter(ds))}, or set data.split)."
        )
    return _read_dataset(ds[split], f"{path}:{split}"), split


def _read_hub(source: str, split: str) -> Iterator[tuple[str, object]]:
    # A hub id is "name" or "owner/name"; anything else that does not exist is a missing path.
    looks_local = source.startswith((".", "/", "~")) or source.count("/") > 1
    if looks_local or sources.file_kind(Path(source))[0] in _FILE_READERS:
        raise PrefoptError(f"{source}: no such file or folder.")
    try:
        ds = _datasets().load_dataset(source, split=split)
    except Exception as e:  # network, missing dataset, bad split: all user-facing
        raise PrefoptError(
            f"{source}: not a local file or folder, and loading it as a hub dataset failed: {e}"
        ) from None
    return _read_dataset(ds, f"{source}:{split}")


def open_source(source: str, split: str = "train") -> tuple[Iterator[tuple[str, object]], Optional[str]]:
    """(the records of `source`, the split read: None for a file or a single-dataset folder). A
    `:split` suffix on `source` (sources.parse_source) wins over `split`."""
    if not isinstance(source, (str, os.PathLike)):
        return _read_in_memory(source, split)
    base, named = sources.parse_source(str(source))
    path = Path(base)
    if path.is_file():
        if named:
            raise PrefoptError(f"{source}: a file has no splits; give it as {base}.")
        return _read_file(path), None
    if path.is_dir():
        return _read_folder(path, named or split, named is not None)
    return _read_hub(base, named or split), named or split


def describe_source(source) -> str:
    """How messages name `source`: its path or hub id, or what an in-memory source is."""
    if isinstance(source, (str, os.PathLike)):
        return str(source)
    rows = f"{len(source)} " if hasattr(source, "__len__") else ""
    return f"the {type(source).__name__} given ({rows}records)" if rows else f"the {type(source).__name__} given"


def _read_in_memory(source, split: str) -> tuple[Iterator[tuple[str, object]], Optional[str]]:
    """(records, split) of a datasets.Dataset, a DatasetDict (its `split`) or a list of dicts."""
    if type(source).__name__ in ("DatasetDict", "IterableDatasetDict"):
        if split not in source:
            raise PrefoptError(f"the DatasetDict given has no split '{split}'; its splits: {', '.join(source)}.")
        return _read_dataset(source[split], f"dataset[{split!r}]"), split
    if isinstance(source, dict):
        raise PrefoptError("the data given is one dict; give a list of records, a datasets.Dataset or a file path.")
    if not hasattr(source, "__iter__"):
        raise PrefoptError(
            f"the data given is a {type(source).__name__}; give a list of records, a datasets.Dataset, "
            "a DatasetDict or a file path."
        )
    return _read_dataset(source, "dataset"), None


def read_records(source: str, split: str = "train") -> Iterator[tuple[str, object]]:
    """Yield (where, record) from a JSONL/JSON/CSV/TSV (maybe compressed) or Parquet file, a save_to_disk
    folder or a hub id, of `split` or the split named with the source (`source:split`). A record that
    could not be parsed comes as a BadRecord in place of the record."""
    return open_source(source, split)[0]


# ----------------------------------------------------------------------------------------------
# Checks shared by the shapes


def _too_deep(value, limit: int) -> bool:
    """True when lists/dicts nest more than `limit` levels in `value` (itself one); walked without recursion."""
    stack = [(value, 1)]
    while stack:
        v, depth = stack.pop()
        if depth > limit:
            return True
        children = v.values() if isinstance(v, dict) else v
        stack.extend((c, depth + 1) for c in children if isinstance(c, (dict, list, tuple)))
    return False


def _check_depth(record, where: str) -> None:
    """A BadRecord naming the field when `record` nests more than MAX_DEPTH levels deep."""
    if not isinstance(record, (dict, list, tuple)) or not _too_deep(record, MAX_DEPTH):
        return
    field_name = None
    if isinstance(record, dict):
        field_name = next(
            (str(k) for k, v in record.items() if isinstance(v, (dict, list, tuple)) and _too_deep(v, MAX_DEPTH - 1)),
            None,
        )
    raise _bad(where, field_name, f"lists or objects nest more than {MAX_DEPTH} levels deep; {_DEPTH_RULE}.", TOO_DEEP)


def _json_preview(value, limit: int) -> str:
    """The first `limit` characters of `value` as JSON, encoding no more of it than that (a deep or
    huge value is not walked whole)."""
    out, n = [], 0
    for chunk in json.JSONEncoder(default=str).iterencode(value):
        out.append(chunk)
        n += len(chunk)
        if n >= limit:
            break
    return "".join(out)[:limit]


def _describe(value) -> str:
    if isinstance(value, str):
        return f"a string ({value[:40]!r}{'…' if len(value) > 40 else ''})"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"a boolean ({str(value).lower()})"
    return f"{type(value).__name__} ({_json_preview(value, 60)})"


def _bad(where: str, field_name: Optional[str], message: str, reason: str) -> BadRecord:
    loc = f"{where}, field '{field_name}'" if field_name else where
    return BadRecord(f"{loc}: {message}", reason)


def _text(value, where: str, name: str) -> str:
    if not isinstance(value, str):
        raise _bad(where, name, f"expected a string, found {_describe(value)}.", "wrong type")
    return value


def _response_text(value, where: str, name: str) -> str:
    _text(value, where, name)
    if not value.strip():
        raise _bad(where, name, "the response is empty.", "empty response")
    return value


def _check_message(m, previous: Optional[str], where: str, name: str) -> str:
    """Message `name` is {"role", "content"} with a known role that may follow `previous`; its role."""
    if not isinstance(m, dict) or "role" not in m or "content" not in m:
        raise _bad(
            where,
            name,
            f'expected a message {{"role": ..., "content": ...}}, found {_describe(m)}.',
            "malformed message",
        )
    role = m["role"]
    if role not in ROLES:
        raise _bad(where, f"{name}.role", f"unknown role {role!r}; expected one of {', '.join(ROLES)}.", "unknown role")
    if not isinstance(m["content"], str):
        parts = (
            " (of content parts, only text ones are read: no images or audio)" if isinstance(m["content"], list) else ""
        )
        raise _bad(
            where, f"{name}.content", f"expected a string{parts}, found {_describe(m['content'])}.", "wrong type"
        )
    if role == "system" and previous not in (None, "system"):
        raise _bad(where, f"{name}.role", "a system message may only open the conversation.", "non-alternating turns")
    if role in ("user", "assistant") and role == previous:
        raise _bad(
            where,
            f"{name}.role",
            f"two '{role}' turns in a row; user and assistant turns must alternate.",
            "non-alternating turns",
        )
    return role


def _check_last_role(value: Messages, where: str, name: str, final_role: Optional[str], prompt: bool) -> None:
    last = value[-1]["role"]
    if final_role and last != final_role:
        raise _bad(where, name, f"the last message must have role '{final_role}', found '{last}'.", "wrong final role")
    if prompt and last not in ("user", "tool"):
        raise _bad(where, name, f"a prompt must end with a user (or tool) turn, found '{last}'.", "wrong final role")


def _check_messages(
    value, where: str, name: str, *, final_role: Optional[str] = None, prompt: bool = False
) -> Messages:
    """A list of {"role", "content"} messages. Turns alternate (system messages first; tool messages
    answer an assistant turn); a prompt ends with a user or tool turn."""
    if not isinstance(value, list) or not value:
        raise _bad(where, name, f"expected a non-empty list of messages, found {_describe(value)}.", "wrong type")
    previous = None
    for k, m in enumerate(value):
        previous = _check_message(m, previous, where, f"{name}[{k}]")
    _check_last_role(value, where, name, final_role, prompt)
    return value


def _check_response_messages(value, prompt: Messages, where: str, name: str) -> Messages:
    msgs = _check_messages(value, where, name, final_role="assistant")
    if msgs[0]["role"] != "assistant":
        raise _bad(
            where,
            f"{name}[0].role",
            f"a response starts with an assistant turn, found '{msgs[0]['role']}'.",
            "wrong final role",
        )
    if not msgs[-1]["content"].strip():
        raise _bad(where, f"{name}[{len(msgs) - 1}].content", "the response is empty.", "empty response")
    _check_messages(prompt + msgs, where, f"prompt + {name}")  # turns alternate across the boundary
    return msgs


def _label(record, where: str) -> bool:
    label = record["label"]
    if isinstance(record, CsvRow) and isinstance(label, str):
        lowered = label.strip().lower()
        if lowered in ("true", "1", "yes"):
            return True
        if lowered in ("false", "0", "no"):
            return False
    if not isinstance(label, bool):
        raise _bad(where, "label", f"expected true or false, found {_describe(label)}.", "label not boolean")
    return label


def _from_sharegpt_message(m, where: str, label: str) -> dict:
    if not isinstance(m, dict) or "from" not in m or "value" not in m:
        raise _bad(
            where,
            label,
            f'expected a ShareGPT message {{"from": ..., "value": ...}}, found {_describe(m)}.',
            "malformed message",
        )
    role = SHAREGPT_ROLES.get(m["from"]) if isinstance(m["from"], str) else None
    if role is None:
        raise _bad(
            where,
            f"{label}.from",
            f"unknown speaker {m['from']!r}; expected one of {', '.join(SHAREGPT_ROLES)}.",
            "unknown role",
        )
    if not isinstance(m["value"], str):
        raise _bad(where, f"{label}.value", f"expected a string, found {_describe(m['value'])}.", "wrong type")
    return {"role": role, "content": m["value"]}


def _from_sharegpt(value, where: str, name: str) -> Messages:
    """A ShareGPT message or list of them -> {"role", "content"} messages."""
    if not (isinstance(value, dict) or (isinstance(value, list) and value)):
        raise _bad(
            where,
            name,
            f'expected a ShareGPT message {{"from", "value"}} or a non-empty list of them, found {_describe(value)}.',
            "wrong type",
        )
    if isinstance(value, dict):
        return [_from_sharegpt_message(value, where, name)]
    return [_from_sharegpt_message(m, where, f"{name}[{k}]") for k, m in enumerate(value)]


def _number(value, where: str, name: str) -> float:
    if isinstance(value, str):  # CSV cells, and datasets that store scores as text
        try:
            return float(value)
        except ValueError:
            pass
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
        raise _bad(where, name, f"expected a number, found {_describe(value)}.", "score not a number")
    return float(value)


def _common_prefix(a, b) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


# ----------------------------------------------------------------------------------------------
# Shapes: one normaliser each, (record, where, ctx) -> [Pair or Unpaired, ...]; the SHAPES table
# below pairs each with its recogniser.


def _normalise_standard(record, where: str, ctx: Context) -> list[Pair]:
    prompt = _text(record["prompt"], where, "prompt")
    chosen = _response_text(record["chosen"], where, "chosen")
    rejected = _response_text(record["rejected"], where, "rejected")
    return [Pair(prompt, chosen, rejected, where)]


def _normalise_conversational(record, where: str, ctx: Context) -> list[Pair]:
    prompt = _check_messages(record["prompt"], where, "prompt", prompt=True)
    chosen = _check_response_messages(record["chosen"], prompt, where, "chosen")
    rejected = _check_response_messages(record["rejected"], prompt, where, "rejected")
    return [Pair(prompt, chosen, rejected, where)]


def _implicit_messages(chosen, rejected, where: str) -> Pair:
    """Two message-list transcripts -> a Pair whose prompt is every turn but the last."""
    _check_messages(chosen, where, "chosen", final_role="assistant")
    _check_messages(rejected, where, "rejected", final_role="assistant")
    n = _common_prefix(chosen, rejected)
    if n == len(chosen) == len(rejected):  # the same conversation: a pair with chosen == rejected (skipped)
        n -= 1
    # the prompt ends before the first differing turn, which must be each one's last (assistant) turn
    if n == 0 or n != len(chosen) - 1 or n != len(rejected) - 1:
        raise _bad(
            where,
            None,
            f"chosen and rejected differ at message {n}, before their last turn "
            f"({len(chosen)} and {len(rejected)} messages); an implicit-prompt pair must share every "
            "turn but the final assistant reply.",
            "transcripts diverge before the last turn",
        )
    prompt = chosen[:n]
    return Pair(
        prompt,
        _check_response_messages(chosen[n:], prompt, where, "chosen"),
        _check_response_messages(rejected[n:], prompt, where, "rejected"),
        where,
    )


def _implicit_strings(chosen, rejected, where: str, opt: Options) -> Pair:
    """Two string transcripts -> a Pair whose prompt is their shared prefix up to the last assistant marker."""
    _text(chosen, where, "chosen")
    _text(rejected, where, "rejected")
    marker = opt.assistant_marker
    cut = chosen.rfind(marker, 0, _common_prefix(chosen, rejected))  # the last marker wholly inside the prefix
    if cut < 0:
        raise _bad(
            where,
            None,
            f"chosen and rejected share no prefix ending at a turn boundary ({marker!r}); an "
            "implicit-prompt pair is two transcripts that differ only in the last assistant turn "
            "(set data.assistant_marker for other turn markers).",
            "no shared prompt",
        )
    end = cut + len(marker)
    prompt, c, r = chosen[:end], chosen[end:], rejected[end:]
    for name, resp in (("chosen", c), ("rejected", r)):
        if opt.user_marker and opt.user_marker in resp:
            raise _bad(
                where,
                name,
                f"the transcripts diverge before the last turn: after the shared prompt, "
                f"{name} holds another {opt.user_marker.strip()!r} turn.",
                "transcripts diverge before the last turn",
            )
        _response_text(resp, where, name)
    return Pair(prompt, c, r, where)


def _normalise_implicit(record, where: str, ctx: Context) -> list[Pair]:
    chosen, rejected = record["chosen"], record["rejected"]
    try:
        if isinstance(chosen, list) or isinstance(rejected, list):
            return [_implicit_messages(chosen, rejected, where)]
        return [_implicit_strings(chosen, rejected, where, ctx.options)]
    except BadRecord as e:  # an implicit pair is any chosen + rejected without a prompt: maybe it is not one
        near = _near_miss(record)
        if near is None or near[2]:
            raise
        found = ", ".join(map(str, record))
        raise BadRecord(f"{e} The fields found ({found}) also {_looks_like(record, near)}.", e.reason) from None


def _normalise_sharegpt(record, where: str, ctx: Context) -> list[Pair]:
    prompt = _check_messages(
        _from_sharegpt(record["conversations"], where, "conversations"), where, "conversations", prompt=True
    )
    chosen = _check_response_messages(_from_sharegpt(record["chosen"], where, "chosen"), prompt, where, "chosen")
    rejected = _check_response_messages(
        _from_sharegpt(record["rejected"], where, "rejected"), prompt, where, "rejected"
    )
    return [Pair(prompt, chosen, rejected, where)]


def _unpaired_transcript(record, where: str, label: bool) -> Unpaired:
    """{"messages" or "conversations": [..., assistant turn], "label"} -> the last turn is the completion."""
    key = "messages" if "messages" in record else "conversations"
    messages = record[key] if key == "messages" else _from_sharegpt(record[key], where, key)
    messages = _check_messages(messages, where, key, final_role="assistant")
    if len(messages) < 2:
        raise _bad(where, key, "needs a prompt turn before the final assistant message.", "missing prompt")
    if not messages[-1]["content"].strip():
        raise _bad(where, f"{key}[{len(messages) - 1}].content", "the response is empty.", "empty response")
    return Unpaired(messages[:-1], messages[-1:], label, where)


def _normalise_unpaired(record, where: str, ctx: Context) -> list[Unpaired]:
    label = _label(record, where)
    if "messages" in record or "conversations" in record:
        return [_unpaired_transcript(record, where, label)]
    if "prompt" not in record:
        raise _bad(
            where, None, "missing field 'prompt' (an unpaired example has prompt, completion, label).", "missing field"
        )
    prompt, completion = record["prompt"], record["completion"]
    if isinstance(completion, list) or isinstance(prompt, list):
        p = _check_messages(prompt, where, "prompt", prompt=True)
        return [Unpaired(p, _check_response_messages(completion, p, where, "completion"), label, where)]
    return [Unpaired(_text(prompt, where, "prompt"), _response_text(completion, where, "completion"), label, where)]


def _rated_prompt(record, where: str) -> Union[str, Messages]:
    if "prompt" not in record:
        raise _bad(
            where,
            None,
            "missing field 'prompt' (rated completions need prompt and completions; "
            "data.fields renames a file's fields, e.g. {instruction: prompt}).",
            "missing field",
        )
    prompt = record["prompt"]
    if isinstance(prompt, list):
        return _check_messages(prompt, where, "prompt", prompt=True)
    return _text(prompt, where, "prompt")


def _scored_completion(c, where: str, name: str) -> tuple[float, str]:
    """One {response-ish: str, score-ish: num} object -> (score, response)."""
    if not isinstance(c, dict):
        raise _bad(where, name, f"expected an object with a response and a score, found {_describe(c)}.", "wrong type")
    tkey = next((t for t in TEXT_KEYS if t in c), None)
    skey = next((s for s in SCORE_KEYS if s in c), None)
    if tkey is None or skey is None:
        want = f"one of {', '.join(TEXT_KEYS)}" if tkey is None else f"one of {', '.join(SCORE_KEYS)}"
        raise _bad(where, name, f"expected {want}; fields found: {', '.join(map(str, c)) or 'none'}.", "missing field")
    return _number(c[skey], where, f"{name}.{skey}"), _response_text(c[tkey], where, f"{name}.{tkey}")


def _scored(record, where: str) -> list[tuple[float, str]]:
    """(score, response) of each rated completion, in file order."""
    if "completions" in record:
        comps = record["completions"]
        if not isinstance(comps, list):
            raise _bad(
                where,
                "completions",
                f"expected a list of {{response, score}} objects, found {_describe(comps)}.",
                "wrong type",
            )
        return [_scored_completion(c, where, f"completions[{k}]") for k, c in enumerate(comps)]
    responses, scores = record["responses"], record["scores"]
    if not isinstance(responses, list) or not isinstance(scores, list) or len(responses) != len(scores):
        raise _bad(
            where,
            "scores",
            f"expected two lists of the same length (responses, scores), found "
            f"{_describe(responses)} and {_describe(scores)}.",
            "wrong type",
        )
    return [
        (_number(s, where, f"scores[{k}]"), _response_text(resp, where, f"responses[{k}]"))
        for k, (resp, s) in enumerate(zip(responses, scores))
    ]


def _rated_pairs(scored: list[tuple[float, str]], opt: Options, rng: random.Random) -> list[tuple[str, str]]:
    """(chosen, rejected) responses picked by data.ratings_rule among scores more than the minimum gap apart."""
    order = sorted(range(len(scored)), key=lambda i: -scored[i][0])  # stable: ties keep file order
    gap = opt.ratings_min_gap
    if opt.ratings_rule == "all_pairs":
        return [
            (scored[i][1], scored[j][1])
            for a, i in enumerate(order)
            for j in order[a + 1 :]
            if scored[i][0] - scored[j][0] > gap
        ]
    best = order[0]
    lower = [j for j in order[1:] if scored[best][0] - scored[j][0] > gap]
    if not lower:
        return []
    worse = lower[-1] if opt.ratings_rule == "best_vs_worst" else rng.choice(lower)
    return [(scored[best][1], scored[worse][1])]


def _normalise_ratings(record, where: str, ctx: Context) -> list[Pair]:
    prompt = _rated_prompt(record, where)
    scored = _scored(record, where)
    if len(scored) < 2:
        raise _bad(
            where,
            "completions",
            f"needs at least two rated completions, found {len(scored)}.",
            "fewer than two rated completions",
        )
    picked = _rated_pairs(scored, ctx.options, ctx.rng)
    if not picked:
        ctx.loaded.skip(
            NO_SCORE_GAP, f"{where}: no two completions' scores differ by more than {ctx.options.ratings_min_gap}."
        )
    if isinstance(prompt, list):  # conversational: each response is one assistant message
        picked = [([{"role": "assistant", "content": c}], [{"role": "assistant", "content": r}]) for c, r in picked]
    return [Pair(prompt, c, r, where) for c, r in picked]


def _normalise_ultrafeedback(record, where: str, ctx: Context) -> list[Pair]:
    """{"prompt": str, "chosen": [prompt turns, assistant], "rejected": [the same turns, assistant]}: the
    prompt is the turns chosen and rejected share (as TRL's maybe_extract_prompt); the string prompt
    repeats the last user turn. When it does not, the turns are used and the record is noted."""
    prompt = _text(record["prompt"], where, "prompt")
    pair = _implicit_messages(record["chosen"], record["rejected"], where)
    last_user = next((m["content"] for m in reversed(pair.prompt) if m["role"] == "user"), None)
    if last_user is None or last_user.strip() != prompt.strip():
        ctx.loaded.note(
            PROMPT_MISMATCH,
            f"{where}: field 'prompt' ({_describe(prompt)}) is not the last user turn of chosen and rejected "
            f"({_describe(last_user)}); the conversation's turns are used.",
        )
    return [pair]


def _normalise_argilla(record, where: str, ctx: Context) -> list[Pair]:
    """{"instruction", "chosen_response", "rejected_response"} strings: a standard pair."""
    return [
        Pair(
            _text(record["instruction"], where, "instruction"),
            _response_text(record["chosen_response"], where, "chosen_response"),
            _response_text(record["rejected_response"], where, "rejected_response"),
            where,
        )
    ]


def _normalise_orca(record, where: str, ctx: Context) -> list[Pair]:
    """{"system": str (optional, may be empty), "question": str, "chosen": str, "rejected": str}: a
    conversational pair whose prompt is the system message (when not empty) and the question."""
    prompt = [{"role": "user", "content": _text(record["question"], where, "question")}]
    system = record.get("system")
    if system is not None and _text(system, where, "system").strip():
        prompt.insert(0, {"role": "system", "content": system})
    chosen = _response_text(record["chosen"], where, "chosen")
    rejected = _response_text(record["rejected"], where, "rejected")
    return [
        Pair(prompt, [{"role": "assistant", "content": chosen}], [{"role": "assistant", "content": rejected}], where)
    ]


def _has_pair_fields(record) -> bool:
    return all(f in record for f in PAIR_FIELDS)


def _opens_with_prompt_turn(value) -> bool:
    """True for a message list whose first message is a system or user turn (a whole conversation)."""
    return isinstance(value, list) and bool(value) and isinstance(value[0], dict) and value[0].get("role") in ROLES[:2]


_PAIR = (PAIR_FIELDS,)

# The shapes, in the order recognition tries them: the first whose `recognises` is true wins.
SHAPES: dict[str, Shape] = {
    s.name: s
    for s in (
        Shape(
            "unpaired",
            lambda r: "label" in r and ("completion" in r or "messages" in r or "conversations" in r),
            _normalise_unpaired,
            "prompt, completion, label; or messages, label",
            paired=False,
            required=(("prompt", "completion", "label"), ("messages", "label"), ("conversations", "label")),
        ),
        Shape(
            "sharegpt",
            lambda r: "conversations" in r and "chosen" in r and "rejected" in r,
            _normalise_sharegpt,
            "ShareGPT conversations, chosen, rejected",
            required=(("conversations", "chosen", "rejected"),),
        ),
        Shape(
            "ratings",
            lambda r: "completions" in r or ("responses" in r and "scores" in r),
            _normalise_ratings,
            "prompt, completions",
            required=(("prompt", "completions"), ("prompt", "responses", "scores")),
        ),
        Shape(
            "argilla",
            lambda r: "instruction" in r and "chosen_response" in r and "rejected_response" in r,
            _normalise_argilla,
            "instruction, chosen_response, rejected_response",
            required=(("instruction", "chosen_response", "rejected_response"),),
        ),
        Shape(
            "orca",
            lambda r: "question" in r and "prompt" not in r and "chosen" in r and "rejected" in r,
            _normalise_orca,
            "system, question, chosen, rejected",
            required=(("question", "chosen", "rejected"),),
        ),
        Shape(
            "implicit",
            lambda r: "prompt" not in r and "chosen" in r and "rejected" in r,
            _normalise_implicit,
            "chosen and rejected transcripts",
            required=(("chosen", "rejected"),),
        ),
        Shape(
            "ultrafeedback",
            lambda r: _has_pair_fields(r) and isinstance(r["prompt"], str) and _opens_with_prompt_turn(r["chosen"]),
            _normalise_ultrafeedback,
            "prompt as text, chosen and rejected as whole conversations",
            required=_PAIR,
        ),
        Shape(
            "conversational",
            lambda r: _has_pair_fields(r) and isinstance(r["chosen"], list),
            _normalise_conversational,
            "prompt, chosen, rejected as messages",
            required=_PAIR,
        ),
        Shape(
            "standard",
            lambda r: _has_pair_fields(r) and not isinstance(r["chosen"], list),
            _normalise_standard,
            "prompt, chosen, rejected",
            required=_PAIR,
        ),
    )
}
# every field name a shape reads: the names data.fields renames a file's fields to
PREFOPT_FIELDS = frozenset(
    {f for s in SHAPES.values() for req in s.required for f in req}
    | {f for pair in SCORE_FIELDS for f in pair}
    | {"system"}
)


def is_paired(shape: str) -> bool:
    """True unless `shape` gives Unpaired examples (an unknown shape counts as paired)."""
    return shape not in SHAPES or SHAPES[shape].paired


# ----------------------------------------------------------------------------------------------
# Recognising, normalising and loading


def _chatml_message(m):
    """One message in {"role", "content": str} form where it was ShareGPT-style ({"from", "value"}),
    had OpenAI text parts ([{"type": "text", "text"}]) or the OpenAI "developer" role; else as it was."""
    if not isinstance(m, dict):
        return m
    if "from" in m and "value" in m and "role" not in m:
        speaker = m["from"]
        m = {
            "role": SHAREGPT_ROLES.get(speaker, speaker) if isinstance(speaker, str) else speaker,
            "content": m["value"],
        }
    parts = m.get("content")
    if isinstance(parts, list) and parts and all(_is_text_part(p) for p in parts):
        m = {**m, "content": "".join(p["text"] for p in parts)}
    if m.get("role") == "developer":
        m = {**m, "role": "system"}
    return m


def _is_text_part(part) -> bool:
    return isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)


def _needs_chatml(value) -> bool:
    return isinstance(value, list) and any(
        isinstance(m, dict) and ("from" in m or isinstance(m.get("content"), list) or m.get("role") == "developer")
        for m in value
    )


def _as_chatml(record):
    """`record` with the message lists of its prompt, chosen, rejected, completion and messages fields in
    {"role", "content"} form (TRL's maybe_convert_to_chatml, plus OpenAI text parts). Records with
    ShareGPT `conversations` are left to the sharegpt and unpaired shapes."""
    if not isinstance(record, dict) or "conversations" in record:
        return record
    changed = {k: [_chatml_message(m) for m in record[k]] for k in MESSAGE_FIELDS if _needs_chatml(record.get(k))}
    if not changed:
        return record
    out = type(record)(record)
    out.update(changed)
    return out


def _shape_of(record) -> Optional[str]:
    """The first shape in SHAPES that recognises `record` (a dict), or None."""
    return next((s.name for s in SHAPES.values() if s.recognises(record)), None)


def recognise(record, where: str) -> str:
    """The shape of one record (a name in SHAPES), from its fields: the first entry that recognises it.
    A record that matches none is a BadRecord saying which shape it almost matches and how to fix it."""
    if not isinstance(record, dict):
        raise BadRecord(f"{where}: expected a record (a JSON object), found {_describe(record)}.", "not a record")
    shape = _shape_of(_as_chatml(record))
    if shape is not None:
        return shape
    found = ", ".join(map(str, record)) or "none"
    near = _near_miss(record)
    if near is not None:
        return _raise_near_miss(record, where, near, found)
    missing = [f for f in PAIR_FIELDS if f not in record]
    shapes = "; ".join(f"{s.name} ({s.fields})" for s in SHAPES.values())
    raise BadRecord(
        f"{where}: missing field{'s' if len(missing) > 1 else ''} {', '.join(repr(m) for m in missing)}; "
        f"expected the fields of one of the shapes: {shapes}. "
        f"Fields found: {found} (data.fields renames a file's fields: {{your name: prefopt's name}})"
        f"{_sft_hint(record)}.",
        "missing field",
    )


def _resembling(name: str, spare: list) -> Optional[str]:
    """The field of `spare` that looks like prefopt's `name`: a common alias of it, or a close spelling
    (not one of prefopt's own names: `completion` is not a misspelt `completions`)."""
    alias = next((k for k in spare if FIELD_ALIASES.get(k.lower()) == name), None)
    if alias is not None:
        return alias
    close = difflib.get_close_matches(name, [k for k in spare if k not in PREFOPT_FIELDS], n=1, cutoff=0.6)
    return close[0] if close else None


def _near_miss(record) -> Optional[tuple[tuple, dict, list]]:
    """(the field set of a shape, {record's field: that shape's name}, [fields still missing]) for the
    shape `record` almost has: one of its fields present, every other present, renamed or (one) missing."""
    best, best_score = None, None
    for shape in SHAPES.values():
        for req in shape.required:
            present = [f for f in req if f in record]
            if not present:
                continue
            spare = [k for k in record if isinstance(k, str) and k not in req]
            renames, missing = {}, []
            for f in (f for f in req if f not in record):
                match = _resembling(f, spare)
                if match is None:
                    missing.append(f)
                else:
                    renames[match] = f
                    spare.remove(match)
            score = (len(missing), -len(present), len(renames))
            if len(missing) <= 1 and (renames or missing) and (best_score is None or score < best_score):
                best, best_score = (req, renames, missing), score
    return best


def _looks_like(record, near: tuple) -> str:
    """'look like the X shape (its fields) with 'a' named 'b': set data.fields: {b: a}' (and what is
    still missing) for the near miss `near` of `record`."""
    req, renames, missing = near
    renamed = {**{k: v for k, v in record.items() if k not in renames}, **{v: record[k] for k, v in renames.items()}}
    name = _shape_of(renamed) if not missing else None
    names = [name] if name else [s.name for s in SHAPES.values() if req in s.required]
    shown = names[0] if len(names) == 1 else f"{', '.join(names[:-1])} or {names[-1]}"
    text = f"look like the {shown} shape ({', '.join(req)})"
    if renames:
        named = ", ".join(f"'{v}' named '{k}'" for k, v in renames.items())
        text += f" with {named}: set data.fields: {_flow_map(renames)}"
    if missing:
        text += f"{' and' if renames else ','} nothing in the record resembles '{missing[0]}'"
    return text


def _raise_near_miss(record, where: str, near: tuple, found: str):
    """The BadRecord for a record that almost has the fields of a shape: what is missing, what to set."""
    absent = list(near[1].values()) + near[2]
    raise BadRecord(
        f"{where}: missing field{'s' if len(absent) > 1 else ''} {', '.join(repr(f) for f in absent)}; the fields "
        f"found ({found}) {_looks_like(record, near)}{'' if near[1] else _sft_hint(record)}.",
        "missing field",
    )


def _sft_hint(record) -> str:
    """A note when `record` is one of TRL's non-preference types (language modelling, prompt-only,
    prompt-completion), else ''."""
    keys = {k for k in record if k in ("prompt", "completion", "messages", "chosen", "rejected", "label")}
    kind = {
        frozenset({"messages"}): "language-modelling (SFT)",
        frozenset({"prompt"}): "prompt-only",
        frozenset({"prompt", "completion"}): "prompt-completion (SFT)",
    }.get(frozenset(keys))
    if kind is None:
        return ""
    return (
        f" (this is {kind} data in TRL's terms; preference training needs chosen and rejected responses, "
        "or a label per completion for unpaired losses such as KTO)"
    )


def _flow_map(mapping: dict) -> str:
    """A mapping as a YAML flow mapping, as a config would hold it: {a: b, c: d}."""
    return "{" + ", ".join(f"{k}: {v}" for k, v in mapping.items()) + "}"


def normalise(
    record,
    where: str,
    shape: str,
    opt: Optional[Options] = None,
    rng: Optional[random.Random] = None,
    loaded: Optional[Loaded] = None,
) -> list:
    """One record of `shape` -> a list of Pair/Unpaired (a ratings record may give several)."""
    opt = opt or Options()
    actual = recognise(record, where)
    if actual != shape:
        raise BadRecord(
            f"{where}: this record is {actual}, but earlier records are {shape}; a file must use one shape.",
            "mixed shapes",
        )
    ctx = Context(opt, rng or random.Random(opt.seed), loaded or Loaded([], shape))
    return SHAPES[shape].normalise(_as_chatml(record), where, ctx)


def _check_fields(record, ctx: Context) -> None:
    """At the first record: each column data.fields renames exists, or the error names it (and says so
    when the mapping is written the old way round, {prefopt name: your column})."""
    fields = ctx.options.fields
    if ctx.fields_checked or not fields or not isinstance(record, dict):
        return
    ctx.fields_checked = True
    missing = [k for k in fields if k not in record]
    if not missing:
        return
    # the old way round: prefopt's names as keys, the data's columns (not themselves prefopt's main names) as values
    if all(k in PREFOPT_FIELDS and fields[k] in record and fields[k] not in MAIN_FIELDS for k in missing):
        fixed = _flow_map({v: k for k, v in fields.items()})
        raise PrefoptError(
            f"{ctx.source}: data.fields maps your column to prefopt's name, as datasets' "
            f"rename_column(original, new) does; {_flow_map(fields)} is the other way round (prefopt's name: "
            f"your column), as older versions read it. Write data.fields: {fixed}."
        )
    columns = [str(k) for k in record]
    close = {m: difflib.get_close_matches(m, columns, n=1, cutoff=0.6) for m in missing}
    hints = ", ".join(f"'{c[0]}' for '{m}'" for m, c in close.items() if c)
    raise PrefoptError(
        f"{ctx.source}: data.fields renames {', '.join(repr(m) for m in missing)}, but the data has no such "
        f"column{'s' if len(missing) > 1 else ''}; its columns: {', '.join(columns) or 'none'}"
        + (f"; did you mean {hints}?" if hints else ".")
    )


def _rename(record, fields: dict, where: str):
    """The record with the file's field names renamed to prefopt's (data.fields: {file's name: prefopt's
    name}, the direction of datasets' rename_column); a renamed field wins over one already so named."""
    if not fields or not isinstance(record, dict):
        return record
    for theirs, ours in fields.items():
        if theirs not in record and ours not in record:
            raise BadRecord(
                f"{where}: missing field '{theirs}' (data.fields renames it to '{ours}'); fields found: "
                f"{', '.join(map(str, record)) or 'none'}.",
                "missing field",
            )
    out = type(record)((k, v) for k, v in record.items() if k not in fields)
    out.update((ours, record[theirs]) for theirs, ours in fields.items() if theirs in record)
    return out


def _scores(record, where: str) -> Optional[tuple[float, float]]:
    """(chosen's score, rejected's score) from the first pair of SCORE_FIELDS the record has, or None."""
    for c, r in SCORE_FIELDS:
        if c in record and r in record:
            return _number(record[c], where, c), _number(record[r], where, r)
    return None


def _keeps_score_gap(record, where: str, ctx: Context) -> bool:
    """False, the pair counted as skipped, when data.min_score_gap is set and the pair's scores are not
    more than it apart. Data without scores is an error (a record without them after others had them,
    a bad record)."""
    gap, shape = ctx.options.min_score_gap, ctx.loaded.shape
    if gap is None:
        return True
    if shape == "ratings" or not is_paired(shape):
        instead = "data.ratings_min_gap does that for rated completions" if shape == "ratings" else "it has no pairs"
        raise PrefoptError(
            f"{where}: data.min_score_gap filters preference pairs by their scores, but this is {shape} data "
            f"({instead}); set data.min_score_gap: null."
        )
    scores = _scores(record, where)
    if scores is None:
        names = "; ".join(f"{c} and {r}" for c, r in SCORE_FIELDS)
        text = (
            f"{where}: data.min_score_gap is set, but the record has no scores ({names}); data.fields renames "
            "yours (e.g. {your_chosen_score: score_chosen, your_rejected_score: score_rejected}), or set "
            "data.min_score_gap: null."
        )
        if not ctx.scored:
            raise PrefoptError(text)
        raise BadRecord(text, NO_SCORES)
    ctx.scored = True
    if scores[0] - scores[1] > gap:
        return True
    ctx.loaded.skip(
        SCORE_GAP, f"{where}: the scores differ by {scores[0] - scores[1]:g}, not more than data.min_score_gap {gap:g}."
    )
    return False


def _examples_of(record, where: str, ctx: Context) -> list:
    """The examples of one raw record (a BadRecord from the reader is raised), fixing the shape at the first."""
    if isinstance(record, BadRecord):
        raise record
    _check_depth(record, where)
    _check_fields(record, ctx)
    record = _rename(record, ctx.options.fields, where)
    if ctx.loaded.shape is None:
        ctx.loaded.shape = recognise(record, where)
    items = normalise(record, where, ctx.loaded.shape, ctx.options, ctx.rng, ctx.loaded)
    return items if _keeps_score_gap(record, where, ctx) else []


def _keep(items: list, where: str, loaded: Loaded) -> None:
    """Add `items` to `loaded`, skipping (counted) pairs whose chosen equals their rejected."""
    for item in items:
        if isinstance(item, Pair) and item.chosen == item.rejected:
            loaded.skip(SAME_RESPONSES, f"{where}: chosen equals rejected (no preference to learn).")
            continue
        loaded.items.append(item)


def load(source: str, split: str = "train", limit: Optional[int] = None, options: Optional[Options] = None) -> Loaded:
    """Every record of `source` as Pair/Unpaired, with the shape they share and what was skipped.
    `limit` caps the number of examples produced."""
    opt = options or Options()
    if limit is not None and limit < 1:
        raise PrefoptError(f"data.limit must be >= 1, found {limit}.")
    opt.validate()
    ctx = Context(opt, random.Random(opt.seed), Loaded([], None if opt.shape == "auto" else opt.shape), source)
    loaded = ctx.loaded
    records, loaded.split = open_source(source, split)
    for where, record in records:
        loaded.records += 1
        try:
            items = _examples_of(record, where, ctx)
        except BadRecord as e:
            if opt.on_bad_record == "error":
                raise PrefoptError(f"{e} (data.on_bad_record: skip would skip such records, counted.)") from None
            loaded.skip(e.reason, str(e))
            continue
        _keep(items, where, loaded)
        if limit is not None and len(loaded.items) >= limit:
            del loaded.items[limit:]
            break
    if loaded.shape is None:
        loaded.shape = "unknown"
    return loaded


def options_from(data_cfg) -> Options:
    """Reading options from a config's `data` section."""
    return Options(
        shape=data_cfg.shape,
        fields=dict(data_cfg.fields or {}),
        ratings_rule=data_cfg.ratings_rule,
        ratings_min_gap=data_cfg.ratings_min_gap,
        min_score_gap=getattr(data_cfg, "min_score_gap", None),
        user_marker=data_cfg.user_marker,
        assistant_marker=data_cfg.assistant_marker,
        on_bad_record=data_cfg.on_bad_record,
    )


def load_pairs(
    source: str, split: str = "train", limit: Optional[int] = None, options: Optional[Options] = None
) -> tuple[list, str]:
    """All examples of `source` (Pair or Unpaired) and the shape they share. A bad record is an error
    naming it (or skipped and counted with options.on_bad_record = "skip")."""
    loaded = load(source, split, limit, options)
    return loaded.items, loaded.shape
