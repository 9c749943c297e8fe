"""Where records come from: a source's split suffix, compressed files, and which split evaluation reads.

A source is a file, a `datasets.save_to_disk` folder or a hub dataset id, optionally followed by
`:split` (`data/ufb:train_prefs`, `HuggingFaceH4/ultrafeedback_binarized:test_prefs`). A local path
that exists as written wins over splitting at its last colon; a file has no splits.

Files may be compressed: `.gz`, `.bz2` or `.xz` after the file type (`pairs.jsonl.gz`), read with
Python's standard library; other compressions (zstd, zip, ...) are an error saying to decompress first.

Evaluation never reads the training split silently: `eval_split` picks data.eval's split from its
`:split` suffix, data.eval_split, or else the one split of the source that looks like an evaluation
split (test, validation, eval, ...; `test_prefs` beside `train_prefs`), and is an error listing the
splits when there is no such single split.
"""

from __future__ import annotations

import bz2
import gzip
import json
import lzma
import re
from pathlib import Path
from typing import Callable, Optional

from prefopt.errors import PrefoptError

COMPRESSIONS: dict[str, Callable] = {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open}
# compressions the standard library cannot read: suffix -> what to run
UNSUPPORTED = {".zst": "zstd -d", ".zstd": "zstd -d", ".lz4": "lz4 -d", ".zip": "unzip", ".7z": "7z x"}
DECOMPRESS_ERRORS = (OSError, EOFError, lzma.LZMAError)  # corrupt or truncated compressed data
DATA_SUFFIXES = (".jsonl", ".json", ".csv", ".tsv", ".parquet")  # file types (formats reads each)
EVAL_WORDS = {"test", "eval", "evaluation", "validation", "valid", "val", "dev", "heldout"}
_SPLIT_NAME = re.compile(r"^[\w.-]+$")  # what a split suffix may hold (no slash: hub ids and paths have them)


def parse_source(source: str) -> tuple[str, Optional[str]]:
    """(`source` without its `:split` suffix, the split or None). A path that exists as written is
    never split, so a file or folder whose name holds a colon still reads."""
    if ":" not in source or Path(source).exists():
        return source, None
    base, split = source.rsplit(":", 1)
    if not base or not _SPLIT_NAME.match(split) or file_kind(Path(split))[0] in DATA_SUFFIXES:
        return source, None  # `dir:name.jsonl` is a missing file, not a split
    return base, split


def file_kind(path: Path) -> tuple[str, Optional[str]]:
    """(file type suffix, compression suffix or None): `a.jsonl.gz` -> (".jsonl", ".gz")."""
    suffixes = [s.lower() for s in path.suffixes]
    if not suffixes:
        return "", None
    if suffixes[-1] in COMPRESSIONS or suffixes[-1] in UNSUPPORTED:
        return (suffixes[-2] if len(suffixes) > 1 else ""), suffixes[-1]
    return suffixes[-1], None


def opener(path: Path, compression: Optional[str]) -> Callable:
    """The function that opens `path` for reading bytes, decompressing it when it is compressed."""
    if compression in UNSUPPORTED:
        raise PrefoptError(
            f"{path}: compressed files are read when .gz, .bz2 or .xz, not {compression}; decompress it first "
            f"({UNSUPPORTED[compression]} {path.name}), or compress it with gzip, bz2 or xz."
        )
    return COMPRESSIONS.get(compression, open)


def read_bytes(path: Path, compression: Optional[str]) -> bytes:
    """The bytes of `path`, decompressed; a corrupt compressed file is an error naming it."""
    try:
        with opener(path, compression)(path, "rb") as f:
            return f.read()
    except DECOMPRESS_ERRORS as e:
        raise PrefoptError(f"{path}: {decompress_failure(compression, e)}") from None


def decompress_failure(compression: Optional[str], error: Exception) -> str:
    """What to say when reading a compressed file failed."""
    name = {".gz": "gzip", ".bz2": "bzip2", ".xz": "xz"}.get(compression, compression)
    return f"not a readable {name} file (corrupt or truncated: {error})."


# ----------------------------------------------------------------------------------------------
# Splits


def split_names(source: str) -> Optional[list[str]]:
    """The splits of a DatasetDict folder or a hub dataset; None for a file or a single-dataset folder."""
    path = Path(source)
    if path.is_file():
        return None
    if path.is_dir():
        index = path / "dataset_dict.json"
        if not index.is_file():
            return None
        try:
            return list(json.loads(index.read_text())["splits"])
        except (ValueError, KeyError, TypeError) as e:
            raise PrefoptError(f"{index}: not a readable save_to_disk index ({e}).") from None
    import datasets  # lazy on purpose: importing datasets takes ~0.6 s (see formats._datasets)

    try:
        return list(datasets.get_dataset_split_names(source))
    except Exception as e:  # network, missing dataset: all user-facing
        raise PrefoptError(f"{source}: cannot list its splits as a hub dataset: {e}") from None


def _words(split: str) -> set[str]:
    return set(re.split(r"[_\-.]+", split.lower()))


def _eval_like(splits: list[str], train_split: Optional[str]) -> list[str]:
    """The splits named like an evaluation split; of several, those that share the training split's
    other words (`test_prefs` for `train_prefs`)."""
    found = [s for s in splits if _words(s) & EVAL_WORDS]
    if len(found) > 1 and train_split:
        rest = _words(train_split) - {"train", "training"}
        same = [s for s in found if _words(s) - EVAL_WORDS == rest]
        found = same or found
    return found


def eval_split(source: str, named: Optional[str], same_as_train: bool, train_split: Optional[str]) -> Optional[str]:
    """The split evaluation reads from `source`: `named` (its `:split` suffix or data.eval_split) when
    given, else the one split that looks like an evaluation split; None for a source without splits.
    An error listing the splits when none or several could be it."""
    if named:
        return named
    splits = split_names(source)
    if splits is None:
        return None
    found = _eval_like(splits, train_split if same_as_train else None)
    if len(found) == 1:
        return found[0]
    if not same_as_train and len(splits) == 1:
        return splits[0]
    which = "none" if not found else f"several ({', '.join(found)})"
    what = "the same dataset as data.train" if same_as_train else "a dataset with several splits"
    raise PrefoptError(
        f"{source}: data.eval names {what} but no split, and {which} of its splits ({', '.join(splits)}) "
        f"{'look' if found else 'looks'} like an evaluation split (test, validation, eval); name one: "
        f"data.eval: {source}:<split> "
        "(or set data.eval_split)."
    )
