"""Read preference records from files, folders or the hub; recognise their shape; normalise.

Every record comes out as a plain dict plus `where` ("file line 7", "file record 3") so that any
later error can name its origin. Shapes recognised:

    standard        {"prompt": str, "chosen": str, "rejected": str}
    conversational  {"prompt": [messages], "chosen": [messages], "rejected": [messages]}
                    (a message is {"role": system|user|assistant|tool, "content": str})

    unpaired        {"prompt": str | [messages], "completion": str | [messages], "label": bool}
                    {"messages": [..., assistant message], "label": bool}

The first two normalise to a Pair (`Pair.conversational` says which), unpaired records to an
Unpaired (label True = desirable), for KTO/BCO.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional, Union

from ..errors import PrefoptError

ROLES = ("system", "user", "assistant", "tool")
PAIR_FIELDS = ("prompt", "chosen", "rejected")

Messages = list  # list of {"role", "content"}


@dataclass
class Pair:
    prompt: Union[str, Messages]
    chosen: Union[str, Messages]
    rejected: Union[str, Messages]
    where: str = ""

    @property
    def conversational(self) -> bool:
        return isinstance(self.chosen, list)


@dataclass
class Unpaired:
    prompt: Union[str, Messages]
    completion: Union[str, Messages]
    label: bool
    where: str = ""

    @property
    def conversational(self) -> bool:
        return isinstance(self.completion, list)


# ----------------------------------------------------------------------------------------------
# Reading raw records


def _read_jsonl(path: Path) -> Iterator[tuple[str, object]]:
    with open(path, "rb") as f:
        n = 0
        for lineno, raw in enumerate(f, 1):
            where = f"{path} line {lineno}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise PrefoptError(f"{where}: not UTF-8 text (byte {e.start}); is this a JSONL file?") from None
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise PrefoptError(f"{where}: invalid JSON at column {e.colno}: {e.msg}.") from None
            n += 1
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
        raise PrefoptError(
            f"{path}: expected a JSON array of records (or {{\"data\": [...]}}), found {type(data).__name__}."
        )
    if not data:
        raise PrefoptError(f"{path}: the file holds no records.")
    for i, record in enumerate(data):
        yield f"{path} record {i}", record


def _read_dataset(ds, name: str) -> Iterator[tuple[str, object]]:
    if len(ds) == 0:
        raise PrefoptError(f"{name}: the dataset holds no records.")
    for i, record in enumerate(ds):
        yield f"{name} record {i}", record


def read_records(source: str, split: str = "train") -> Iterator[tuple[str, object]]:
    """Yield (where, record) from a JSONL/JSON/Parquet file, a save_to_disk folder or a hub id."""
    path = Path(source)
    if path.is_file():
        suffix = path.suffix.lower()
        if path.stat().st_size == 0:
            raise PrefoptError(f"{path}: the file is empty.")
        if suffix == ".jsonl":
            return _read_jsonl(path)
        if suffix == ".json":
            return _read_json(path)
        if suffix == ".parquet":
            import datasets

            return _read_dataset(datasets.Dataset.from_parquet(str(path)), str(path))
        raise PrefoptError(f"{path}: unknown file type '{suffix}'; expected .jsonl, .json or .parquet.")
    if path.is_dir():
        import datasets

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
    # A hub id is "name" or "owner/name"; anything else that does not exist is a missing path.
    looks_local = source.startswith((".", "/", "~")) or source.count("/") > 1
    if looks_local or source.endswith((".jsonl", ".json", ".parquet")):
        raise PrefoptError(f"{source}: no such file or folder.")
    import datasets

    try:
        ds = datasets.load_dataset(source, split=split)
    except Exception as e:  # network, missing dataset, bad split: all user-facing
        raise PrefoptError(f"{source}: not a local file or folder, and loading it as a hub dataset failed: {e}") from None
    return _read_dataset(ds, source)


# ----------------------------------------------------------------------------------------------
# Shapes


def _describe(value) -> str:
    if isinstance(value, str):
        return f"a string ({value[:40]!r}{'…' if len(value) > 40 else ''})"
    if value is None:
        return "null"
    return f"{type(value).__name__} ({json.dumps(value, default=str)[:60]})"


def _check_messages(value, where: str, field: str, *, final_role: Optional[str] = None) -> Messages:
    if not isinstance(value, list) or not value:
        raise PrefoptError(f"{where}, field '{field}': expected a non-empty list of messages, found {_describe(value)}.")
    for k, m in enumerate(value):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise PrefoptError(
                f"{where}, field '{field}[{k}]': expected a message {{\"role\": ..., \"content\": ...}}, found {_describe(m)}."
            )
        if m["role"] not in ROLES:
            raise PrefoptError(
                f"{where}, field '{field}[{k}].role': unknown role {m['role']!r}; expected one of {', '.join(ROLES)}."
            )
        if not isinstance(m["content"], str):
            raise PrefoptError(f"{where}, field '{field}[{k}].content': expected a string, found {_describe(m['content'])}.")
    if final_role and value[-1]["role"] != final_role:
        raise PrefoptError(
            f"{where}, field '{field}': the last message must have role '{final_role}', found '{value[-1]['role']}'."
        )
    return value


def recognise(record, where: str) -> str:
    """The shape of one record: 'standard', 'conversational' or 'unpaired'."""
    if not isinstance(record, dict):
        raise PrefoptError(f"{where}: expected a record (a JSON object), found {_describe(record)}.")
    if "label" in record and ("completion" in record or "messages" in record):
        return "unpaired"
    missing = [f for f in PAIR_FIELDS if f not in record]
    if missing:
        found = ", ".join(record) or "none"
        raise PrefoptError(
            f"{where}: missing field{'s' if len(missing) > 1 else ''} {', '.join(repr(m) for m in missing)}; "
            f"expected a preference pair with fields prompt, chosen, rejected (strings, or message lists), "
            f"or an unpaired example with prompt, completion, label (or messages, label). "
            f"Fields found: {found}."
        )
    return "conversational" if isinstance(record["chosen"], list) else "standard"


def _unpaired(record, where: str) -> Unpaired:
    label = record["label"]
    if not isinstance(label, bool):
        raise PrefoptError(f"{where}, field 'label': expected true or false, found {_describe(label)}.")
    if "messages" in record:
        messages = _check_messages(record["messages"], where, "messages", final_role="assistant")
        if len(messages) < 2:
            raise PrefoptError(f"{where}, field 'messages': needs a prompt turn before the final assistant message.")
        return Unpaired(messages[:-1], messages[-1:], label, where)
    if "prompt" not in record:
        raise PrefoptError(f"{where}: missing field 'prompt' (an unpaired example has prompt, completion, label).")
    prompt, completion = record["prompt"], record["completion"]
    if isinstance(completion, list):
        return Unpaired(_check_messages(prompt, where, "prompt"),
                        _check_messages(completion, where, "completion", final_role="assistant"), label, where)
    for f in ("prompt", "completion"):
        if not isinstance(record[f], str):
            raise PrefoptError(f"{where}, field '{f}': expected a string, found {_describe(record[f])}.")
    if not completion.strip():
        raise PrefoptError(f"{where}, field 'completion': the response is empty.")
    return Unpaired(prompt, completion, label, where)


def normalise(record, where: str, shape: str):
    actual = recognise(record, where)
    if actual != shape:
        raise PrefoptError(
            f"{where}: this record is {actual}, but earlier records are {shape}; a file must use one shape."
        )
    if shape == "unpaired":
        return _unpaired(record, where)
    if shape == "standard":
        for f in PAIR_FIELDS:
            if not isinstance(record[f], str):
                raise PrefoptError(f"{where}, field '{f}': expected a string, found {_describe(record[f])}.")
        for f in ("chosen", "rejected"):
            if not record[f].strip():
                raise PrefoptError(f"{where}, field '{f}': the response is empty.")
        return Pair(record["prompt"], record["chosen"], record["rejected"], where)
    prompt = _check_messages(record["prompt"], where, "prompt")
    chosen = _check_messages(record["chosen"], where, "chosen", final_role="assistant")
    rejected = _check_messages(record["rejected"], where, "rejected", final_role="assistant")
    return Pair(prompt, chosen, rejected, where)


def load_pairs(source: str, split: str = "train", limit: Optional[int] = None) -> tuple[list, str]:
    """All records of `source` (Pair or Unpaired) and the shape they share. Any bad record is an
    error naming it."""
    pairs: list = []
    shape = None
    if limit is not None and limit < 1:
        raise PrefoptError(f"data.limit must be >= 1, found {limit}.")
    for where, record in read_records(source, split):
        if shape is None:
            shape = recognise(record, where)
        pairs.append(normalise(record, where, shape))
        if limit is not None and len(pairs) >= limit:
            break
    return pairs, shape
