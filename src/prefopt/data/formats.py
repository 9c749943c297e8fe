"""Read preference records from files, folders or the hub; recognise their shape; normalise.

To add a shape: write its normaliser `(record, where, ctx) -> [Pair or Unpaired, ...]` in the
"Shapes" section; add ONE `Shape(name, recognises, normalise, fields, paired)` entry to the SHAPES
table at the place it should be tried (entries are tried in order; the first whose
`recognises(record)` is true wins; `fields` is what the error for an unrecognised record lists); in
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

The paired shapes normalise to Pair (`Pair.conversational` says which), unpaired records to Unpaired
(label True = desirable), for KTO/BCO. `data.fields` renames a file's fields to these names.

Containers: JSONL, JSON (an array, or {"data": [...]}), CSV (a header row; cells holding JSON lists
or objects are decoded; label cells true/false/1/0/yes/no), Parquet, a `datasets.save_to_disk`
folder, a hub dataset id.

A record that cannot be used is an error naming it, or with `on_bad_record="skip"` it is skipped and
counted by reason (`Loaded.skipped`). A pair whose chosen equals its rejected carries no preference
and is always skipped, counted.
"""

from __future__ import annotations

import csv
import json
import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Optional, Union

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
SAME_RESPONSES = "chosen equals rejected"  # skip reasons that are not bad records: always skipped, counted
NO_SCORE_GAP = "no two scores differ by more than data.ratings_min_gap"
BENIGN_SKIPS = (SAME_RESPONSES, NO_SCORE_GAP)
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
    fields: dict = field(default_factory=dict)  # {prefopt name: the file's field name}
    ratings_rule: str = "best_vs_worst"
    ratings_min_gap: float = 0.0  # a pair needs score(chosen) - score(rejected) > this
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


@dataclass
class Loaded:
    """The examples read from one source, the shape they share, and the records skipped (by reason)."""

    items: list  # Pair or Unpaired
    shape: str
    records: int = 0  # records read (a ratings record may give several pairs, or none)
    skipped: Counter = field(default_factory=Counter)  # reason -> count
    examples: dict = field(default_factory=dict)  # reason -> first message (names the record)

    @property
    def paired(self) -> bool:
        """True unless the shape gives Unpaired examples."""
        return is_paired(self.shape)

    def skip(self, reason: str, message: str) -> None:
        """Count one skipped record under `reason`, keeping the first message of each reason."""
        self.skipped[reason] += 1
        self.examples.setdefault(reason, message)

    def report(self) -> str:
        """One line: records read, the shape, examples produced and what was skipped."""
        unit = "pairs" if self.paired else "examples"
        text = f"{self.records} records, shape {self.shape}, {len(self.items)} {unit}"
        if self.skipped:
            text += "; skipped: " + ", ".join(f"{n} {r}" for r, n in self.skipped.most_common())
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


@dataclass(frozen=True)
class Shape:
    """One data shape: its name, how a record of it is recognised from its fields, how such a record
    becomes Pair/Unpaired examples, and whether those are pairs."""

    name: str
    recognises: Callable[[dict], bool]  # tried in SHAPES order on a dict record; the first true one wins
    normalise: Callable[[dict, str, Context], list]  # (record, where, ctx) -> [Pair or Unpaired, ...]
    fields: str  # its fields, for the message when a record matches no shape
    paired: bool = True


# ----------------------------------------------------------------------------------------------
# Reading raw records


def _read_jsonl(path: Path) -> Iterator[tuple[str, object]]:
    n = 0
    with open(path, "rb") as f:
        lineno = 0
        while True:
            raw = f.readline(MAX_LINE_BYTES + 1)
            if not raw:
                break
            lineno += 1
            where = f"{path} line {lineno}"
            if len(raw) > MAX_LINE_BYTES and not raw.endswith(b"\n"):
                raise PrefoptError(
                    f"{where}: the line is longer than {MAX_LINE_BYTES >> 20} MiB; expected one JSON record per "
                    "line (is this really a JSONL file?)."
                )
            if b"\x00" in raw:
                yield (
                    where,
                    BadRecord(f"{where}: binary data (NUL bytes), not JSON text; is this a JSONL file?", "not UTF-8"),
                )
                n += 1
                continue
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                yield where, BadRecord(f"{where}: not UTF-8 text (byte {e.start}); is this a JSONL file?", "not UTF-8")
                n += 1
                continue
            if not line.strip():
                continue
            n += 1
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                yield where, BadRecord(f"{where}: invalid JSON at column {e.colno}: {e.msg}.", "invalid JSON")
                continue
            yield where, record
    if n == 0:
        raise PrefoptError(f"{path}: the file holds no records.")


def _read_json(path: Path) -> Iterator[tuple[str, object]]:
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as e:
        raise PrefoptError(f"{path}: not UTF-8 text (byte {e.start}); is this a JSON file?") from None
    except json.JSONDecodeError as e:
        raise PrefoptError(f"{path} line {e.lineno} column {e.colno}: invalid JSON: {e.msg}.") from None
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list):
        raise PrefoptError(f'{path}: expected a JSON array of records (or {{"data": [...]}}), found {_describe(data)}.')
    if not data:
        raise PrefoptError(f"{path}: the file holds no records.")
    for i, record in enumerate(data):
        yield f"{path} record {i}", record


def _csv_cell(value: str):
    """A CSV cell: JSON lists/objects (message lists, completions) are decoded, the rest stay text."""
    s = value.strip()
    if s[:1] in ("[", "{"):
        try:
            return json.loads(s)
        except json.JSONDecodeError:
            return value
    return value


def _read_csv(path: Path) -> Iterator[tuple[str, object]]:
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise PrefoptError(f"{path}: not UTF-8 text (byte {e.start}); is this a CSV file?") from None
    csv.field_size_limit(MAX_LINE_BYTES)
    reader = csv.reader(text.splitlines(keepends=True))
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
            if len(row) != len(header):
                yield (
                    where,
                    BadRecord(
                        f"{where}: {len(row)} cells, but the header names {len(header)} fields ({', '.join(header)}).",
                        "wrong number of CSV cells",
                    ),
                )
                continue
            yield where, CsvRow({h: _csv_cell(c) for h, c in zip(header, row)})
    except csv.Error as e:
        raise PrefoptError(f"{path} line {reader.line_num}: unreadable CSV: {e}.") from None
    if n == 0:
        raise PrefoptError(f"{path}: the file holds no records (only a header).")


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


def _read_parquet(path: Path) -> Iterator[tuple[str, object]]:
    try:
        ds = _datasets().Dataset.from_parquet(str(path))
    except Exception as e:
        raise PrefoptError(f"{path}: not a readable Parquet file ({type(e).__name__}: {e}).") from None
    return _read_dataset(ds, str(path))


_FILE_READERS = {".jsonl": _read_jsonl, ".json": _read_json, ".csv": _read_csv, ".parquet": _read_parquet}


def _read_file(path: Path) -> Iterator[tuple[str, object]]:
    suffix = path.suffix.lower()
    if path.stat().st_size == 0:
        raise PrefoptError(f"{path}: the file is empty.")
    if suffix not in _FILE_READERS:
        raise PrefoptError(f"{path}: unknown file type '{suffix}'; expected .jsonl, .json, .csv or .parquet.")
    return _FILE_READERS[suffix](path)


def _read_folder(path: Path, split: str) -> Iterator[tuple[str, object]]:
    datasets = _datasets()
    try:
        ds = datasets.load_from_disk(str(path))
    except FileNotFoundError:
        raise PrefoptError(
            f"{path}: a folder, but not one written by datasets' save_to_disk "
            "(no dataset_info.json / dataset_dict.json)."
        ) from None
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise PrefoptError(f"{path}: no split '{split}'; it has {', '.join(ds)} (set data.split).")
        ds = ds[split]
    return _read_dataset(ds, str(path))


def _read_hub(source: str, split: str) -> Iterator[tuple[str, object]]:
    # A hub id is "name" or "owner/name"; anything else that does not exist is a missing path.
    looks_local = source.startswith((".", "/", "~")) or source.count("/") > 1
    if looks_local or source.endswith(tuple(_FILE_READERS)):
        raise PrefoptError(f"{source}: no such file or folder.")
    try:
        ds = _datasets().load_dataset(source, split=split)
    except Exception as e:  # network, missing dataset, bad split: all user-facing
        raise PrefoptError(
            f"{source}: not a local file or folder, and loading it as a hub dataset failed: {e}"
        ) from None
    return _read_dataset(ds, source)


def read_records(source: str, split: str = "train") -> Iterator[tuple[str, object]]:
    """Yield (where, record) from a JSONL/JSON/CSV/Parquet file, a save_to_disk folder or a hub id.
    A record that could not be parsed comes as a BadRecord in place of the record."""
    path = Path(source)
    if path.is_file():
        return _read_file(path)
    if path.is_dir():
        return _read_folder(path, split)
    return _read_hub(source, split)


# ----------------------------------------------------------------------------------------------
# Checks shared by the shapes


def _describe(value) -> str:
    if isinstance(value, str):
        return f"a string ({value[:40]!r}{'…' if len(value) > 40 else ''})"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"a boolean ({str(value).lower()})"
    return f"{type(value).__name__} ({json.dumps(value, default=str)[:60]})"


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
        raise _bad(where, f"{name}.content", f"expected a string, found {_describe(m['content'])}.", "wrong type")
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
    if isinstance(chosen, list) or isinstance(rejected, list):
        return [_implicit_messages(chosen, rejected, where)]
    return [_implicit_strings(chosen, rejected, where, ctx.options)]


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
            "data.fields renames a file's fields, e.g. {prompt: instruction}).",
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


def _has_pair_fields(record) -> bool:
    return all(f in record for f in PAIR_FIELDS)


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
        ),
        Shape(
            "sharegpt",
            lambda r: "conversations" in r and "chosen" in r and "rejected" in r,
            _normalise_sharegpt,
            "ShareGPT conversations, chosen, rejected",
        ),
        Shape(
            "ratings",
            lambda r: "completions" in r or ("responses" in r and "scores" in r),
            _normalise_ratings,
            "prompt, completions",
        ),
        Shape(
            "implicit",
            lambda r: "prompt" not in r and "chosen" in r and "rejected" in r,
            _normalise_implicit,
            "chosen and rejected transcripts",
        ),
        Shape(
            "conversational",
            lambda r: _has_pair_fields(r) and isinstance(r["chosen"], list),
            _normalise_conversational,
            "prompt, chosen, rejected as messages",
        ),
        Shape(
            "standard",
            lambda r: _has_pair_fields(r) and not isinstance(r["chosen"], list),
            _normalise_standard,
            "prompt, chosen, rejected",
        ),
    )
}


def is_paired(shape: str) -> bool:
    """True unless `shape` gives Unpaired examples (an unknown shape counts as paired)."""
    return shape not in SHAPES or SHAPES[shape].paired


# ----------------------------------------------------------------------------------------------
# Recognising, normalising and loading


def recognise(record, where: str) -> str:
    """The shape of one record (a name in SHAPES), from its fields: the first entry that recognises it."""
    if not isinstance(record, dict):
        raise BadRecord(f"{where}: expected a record (a JSON object), found {_describe(record)}.", "not a record")
    for shape in SHAPES.values():
        if shape.recognises(record):
            return shape.name
    missing = [f for f in PAIR_FIELDS if f not in record]
    found = ", ".join(map(str, record)) or "none"
    shapes = "; ".join(f"{s.name} ({s.fields})" for s in SHAPES.values())
    raise BadRecord(
        f"{where}: missing field{'s' if len(missing) > 1 else ''} {', '.join(repr(m) for m in missing)}; "
        f"expected the fields of one of the shapes: {shapes}. "
        f"Fields found: {found} (data.fields renames a file's fields).",
        "missing field",
    )


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
    return SHAPES[shape].normalise(record, where, ctx)


def _remap(record, fields: dict, where: str):
    """Rename the file's field names to prefopt's (data.fields: {prefopt name: file's name})."""
    if not fields or not isinstance(record, dict):
        return record
    out = type(record)(record)
    for ours, theirs in fields.items():
        if theirs in out:
            out[ours] = out.pop(theirs)
        elif ours not in out:
            raise BadRecord(
                f"{where}: missing field '{theirs}' (data.fields maps it to '{ours}'); fields found: "
                f"{', '.join(map(str, record)) or 'none'}.",
                "missing field",
            )
    return out


def _examples_of(record, where: str, ctx: Context) -> list:
    """The examples of one raw record (a BadRecord from the reader is raised), fixing the shape at the first."""
    if isinstance(record, BadRecord):
        raise record
    record = _remap(record, ctx.options.fields, where)
    if ctx.loaded.shape is None:
        ctx.loaded.shape = recognise(record, where)
    return normalise(record, where, ctx.loaded.shape, ctx.options, ctx.rng, ctx.loaded)


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
    ctx = Context(opt, random.Random(opt.seed), Loaded([], None if opt.shape == "auto" else opt.shape))
    loaded = ctx.loaded
    for where, record in read_records(source, split):
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
