"""Bad input, through the command line's entry point: every case exits 2 with one paragraph on
stderr that starts `prefopt: error:` and names the culprit (the config key and the bad value, or the
file and line), shows no traceback, modifies none of the user's files and writes nothing beside them.

Each case builds its inputs in a fresh folder:

    ROOT/in/     everything the user gave: configs, data, model copies, prompt files, run copies
    ROOT/work/   the working directory; outputs and the reference cache go here
    ROOT/cache/  PREFOPT_CACHE

and calls the function `python -m prefopt ...` calls, prefopt.cli.main(argv), once (a few cases call
it twice), in this process: the environment a child would get is set with monkeypatch (PREFOPT_CACHE,
offline hub), the working directory is ROOT/work/, stdout and stderr are captured with capfd, and the
log lines `prefopt` prints through logging.basicConfig (a no-op under pytest, whose log capture
already holds the root logger) go to the captured stderr through a handler of the same format. The
exit code is main's return value (SystemExit's code where argparse exits); an exception escaping
main fails the case, as the traceback a user would see. ROOT/in/ and the shared tiny model folder
are hashed before and after: no file may change, appear or vanish there. `prefopt data check`
reports on stdout instead of raising: its cases read the `--json` report (usable false, the culprit
in its problems or error). docs/errors.md lists every case with the message a user sees.

One case still runs `python -m prefopt` in a child, with a 4 GiB address-space limit (a tiny
training run needs under 3 GiB): the YAML alias bomb, a config that expands into gigabytes, must fail
fast instead of starving the machine, and a limit cannot be set on this process alone. Most cases
fail at config validation, before any model is loaded (well under a second each in-process); the
finished run the eval/report/score cases need is trained once per session, in-process too.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import random
import re
import resource
import shutil
import signal
import subprocess
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Union

import pytest
import yaml

# Part of the default run (the `slow` marker deselects nothing by default; it says these cases load
# the embedded model's tokenizer through tiny_dir, and one starts an interpreter).
pytestmark = pytest.mark.slow

TIMEOUT = 120  # seconds per command
MEMORY_LIMIT = 4 << 30  # bytes of address space for the child (the alias-bomb case)
OUTPUT_CAP = 1 << 20  # bytes of stdout / stderr kept per command
# What a child gets besides os.environ (OMP_* and TOKENIZERS_PARALLELISM: see conftest.py, which
# sets them before torch is imported; in this process they cannot change any more).
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
MAX_MESSAGE = 2000  # characters: one paragraph, never the repr of a huge value
NAN = float("nan")
INF = float("inf")

PAIRS = [
    {"prompt": f"Q{i}: what is {i} plus {i}?", "chosen": f" {2 * i}.", "rejected": f" maybe {i + 1}."} for i in range(4)
]
UNPAIRED = [{"prompt": f"Q{i}?", "completion": f" {i}.", "label": i % 2 == 0} for i in range(4)]

# One culprit requirement: a regex (case-insensitive) the message must match; a tuple: any of them.
Culprit = Union[str, tuple]


def lit(s: str) -> str:
    """A regex for `s` verbatim."""
    return re.escape(s)


def word(s: str) -> str:
    """A regex for `s` as a whole token: '-1' matches 'found -1.' but not 'pytest-12'."""
    return r"(?<![\w.])" + re.escape(s) + r"(?![\w])"


NAN_RE = r"(?<![\w])nan(?![\w])"
INF_RE = r"(?<![\w])inf(inity)?(?![\w])|infinite|∞"


def limit_memory():
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))


def run_prefopt(argv: list, cwd: Path, cache: Path) -> tuple[Optional[int], str, str]:
    """(exit code or None on timeout, stdout, stderr) of `python -m prefopt ARGV` in a child with
    MEMORY_LIMIT of address space: only for the case that needs the limit (see the docstring)."""
    env = {
        **os.environ,
        **OFFLINE_ENV,
        "PREFOPT_CACHE": str(cache),
        "OMP_NUM_THREADS": "1",
        "OMP_WAIT_POLICY": "PASSIVE",
        "TOKENIZERS_PARALLELISM": "false",
    }
    logs = cwd.parent / "logs"
    logs.mkdir(exist_ok=True)
    n = len(list(logs.glob("*.out")))
    out_path, err_path = logs / f"{n}.out", logs / f"{n}.err"
    with open(out_path, "wb") as out, open(err_path, "wb") as err:
        try:
            rc = subprocess.run(
                [sys.executable, "-m", "prefopt", *map(str, argv)],
                cwd=cwd,
                env=env,
                stdout=out,
                stderr=err,
                timeout=TIMEOUT,
                preexec_fn=limit_memory,
            ).returncode
        except subprocess.TimeoutExpired:
            rc = None
    return rc, _read_capped(out_path), _read_capped(err_path)


def _read_capped(path: Path, cap: int = OUTPUT_CAP) -> str:
    with open(path, "rb") as f:
        data = f.read(cap + 1)
    text = data[:cap].decode("utf-8", "replace")
    return text + (f"\n[... more than {cap} bytes]" if len(data) > cap else "")


def _capped(text: str, cap: int = OUTPUT_CAP) -> str:
    data = text.encode("utf-8", "replace")
    return data[:cap].decode("utf-8", "replace") + (f"\n[... more than {cap} bytes]" if len(data) > cap else "")


# --- in-process runs -------------------------------------------------------------------------------


class CaseTimeout(BaseException):
    """Raised in main() after TIMEOUT seconds (a BaseException: no `except Exception` in the code
    under test swallows it)."""


@contextlib.contextmanager
def _deadline(seconds: float):
    def expire(signum, frame):
        raise CaseTimeout()

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@contextlib.contextmanager
def _cli_logging(stream):
    """What main's logging.basicConfig sets up in a fresh interpreter: INFO and above from every
    logger that propagates to the root, as `prefopt: MESSAGE` on `stream`. Under pytest the root
    logger already has handlers (its log capture), so basicConfig itself does nothing. transformers'
    own handler (its loggers do not propagate) holds the stderr of the time transformers was
    imported; it writes to `stream` meanwhile."""
    root = logging.getLogger()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("prefopt: %(message)s"))
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    hf = getattr(sys.modules.get("transformers.utils.logging"), "_default_handler", None)
    hf_stream = hf.setStream(stream) if isinstance(hf, logging.StreamHandler) else None
    try:
        yield
    finally:
        root.removeHandler(handler)
        root.setLevel(level)
        if hf_stream is not None:
            hf.setStream(hf_stream)


def _child_environment(mp: pytest.MonkeyPatch, cwd: Path, cache: Path) -> None:
    """The environment and working directory run_prefopt gives a child, on this process (undone
    with `mp`). The hub libraries read their offline switches into constants when imported:
    those are set too."""
    for key, value in {**OFFLINE_ENV, "PREFOPT_CACHE": str(cache)}.items():
        mp.setenv(key, value)
    import datasets.config
    import huggingface_hub.constants

    mp.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    mp.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    mp.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)
    mp.chdir(cwd)


def call_main(argv: list, cwd: Path, cache: Path, mp: pytest.MonkeyPatch) -> tuple[Optional[int], Optional[str]]:
    """(exit code as `python -m prefopt ARGV` would end with, None after TIMEOUT seconds; the
    exception that escaped main, or None) of prefopt.cli.main(ARGV) in this process, its output on
    the current sys.stdout / sys.stderr (an escaped exception's traceback on stderr, as Python
    prints it). Variables main sets in os.environ are taken back afterwards."""
    from prefopt.cli import main

    _child_environment(mp, cwd, cache)
    environ = dict(os.environ)
    escaped = None
    try:
        with _cli_logging(sys.stderr), _deadline(TIMEOUT):
            try:
                rc = main([str(a) for a in argv])
            except SystemExit as e:  # argparse; `python -m prefopt` exits with this code too
                if e.code is None or isinstance(e.code, int):
                    rc = e.code or 0
                else:
                    print(e.code, file=sys.stderr)
                    rc = 1
            except CaseTimeout:
                rc = None
            except Exception as e:
                traceback.print_exc()
                rc, escaped = 1, f"{type(e).__name__}: {e}"[:500]
    finally:
        for key in set(os.environ) - set(environ):
            del os.environ[key]
        os.environ.update({k: v for k, v in environ.items() if os.environ.get(k) != v})
    return rc, escaped


def snapshot(root: Path) -> dict[str, Optional[str]]:
    """relative path -> sha256 (files) or None (folders), everything under `root`."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else None
        for p in sorted(root.rglob("*"))
    }


def deep_merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


@dataclass
class Case:
    argv: list  # after `python -m prefopt`
    culprit: list  # each a Culprit, all required in the error message
    forbid: tuple = ()  # substrings the message must not contain
    rc: int = 2
    report: bool = False  # `data check --json`: the verdict is the JSON report on stdout
    check: Optional[Callable[[str, str], list]] = None  # (stdout, stderr) -> problems, after the run
    child: bool = False  # run `python -m prefopt` in a memory-limited child (run_prefopt), not in-process


class Ctx:
    """One case's folders and the helpers that fill ROOT/in/."""

    def __init__(self, root: Path, tiny: Path, request):
        self.root, self.tiny, self.request = root, tiny, request
        self.inp, self.work, self.cache = root / "in", root / "work", root / "cache"
        self.escaped: list = []  # exceptions that escaped main() in this case's calls
        for d in (self.inp, self.inp / "data", self.work, self.cache):
            d.mkdir(parents=True, exist_ok=True)

    def run(self, argv: list) -> tuple[Optional[int], str, str]:
        """(exit code or None on timeout, stdout, stderr) of prefopt.cli.main(ARGV), in this process,
        in ROOT/work/ with PREFOPT_CACHE=ROOT/cache/ (see call_main)."""
        capfd = self.request.getfixturevalue("capfd")
        capfd.readouterr()  # what came before is not this command's
        rc, escaped = call_main(argv, self.work, self.cache, self.request.getfixturevalue("monkeypatch"))
        out, err = capfd.readouterr()
        if escaped is not None:
            self.escaped.append(escaped)
        return rc, _capped(out), _capped(err)

    def jsonl(self, name: str, records: list) -> Path:
        path = self.inp / "data" / name
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
        return path

    @property
    def data(self) -> Path:
        path = self.inp / "data" / "pairs.jsonl"
        return path if path.exists() else self.jsonl("pairs.jsonl", PAIRS)

    def base(self, model: Optional[Path] = None) -> dict:
        return {
            "model": {"name": str(model or self.tiny)},
            "data": {"train": str(self.data), "max_length": 64, "max_prompt_length": 32},
            "reference": {"cache_dir": str(self.work / "ref-cache")},
            "train": {
                "output_dir": str(self.work / "out"),
                "max_steps": 1,
                "batch_size": 1,
                "progress": False,
                "bf16": False,
                "gradient_checkpointing": False,
            },
        }

    def config(self, over: Optional[dict] = None, name: str = "cfg.yaml", model: Optional[Path] = None) -> Path:
        path = self.inp / name
        path.write_text(yaml.safe_dump(deep_merge(self.base(model), over or {}), sort_keys=False))
        return path

    def model_copy(self) -> Path:
        return Path(shutil.copytree(self.tiny, self.inp / "model"))

    def run_copy(self) -> Path:
        run = self.request.getfixturevalue("finished_run")
        return Path(shutil.copytree(run, self.inp / "run"))

    def read_only(self, path: Path) -> Path:
        path.mkdir(parents=True, exist_ok=True)
        path.chmod(0o555)
        self.request.addfinalizer(lambda: path.chmod(0o755))
        if os.access(path, os.W_OK):
            pytest.skip("a 0o555 folder is still writable here (running as root): the read-only case cannot be set up")
        return path

    def train(self, over: Optional[dict] = None, **kw) -> list:
        return ["train", self.config(over, **kw)]


CASES: dict[str, Callable[[Ctx], Case]] = {}


def case(name: str):
    def register(fn):
        assert name not in CASES, name
        CASES[name] = fn
        return fn

    return register


# --- model folder --------------------------------------------------------------------------------


def _corrupt_weights(c: Ctx, make: Callable[[bytes], bytes]) -> Case:
    model = c.model_copy()
    weights = model / "model.safetensors"
    weights.write_bytes(make(weights.read_bytes()))
    return Case(c.train(model=model), [lit("model.safetensors")])


@case("model-safetensors-truncated")
def _(c):
    return _corrupt_weights(c, lambda b: b[: len(b) // 2])


@case("model-safetensors-random-bytes")
def _(c):
    return _corrupt_weights(c, lambda b: random.Random(0).randbytes(4096))


@case("model-safetensors-empty")
def _(c):
    return _corrupt_weights(c, lambda b: b"")


@case("model-safetensors-huge-header")
def _(c):
    return _corrupt_weights(c, lambda b: (2**60).to_bytes(8, "little") + b[8:])


@case("tokenizer-corrupt")
def _(c):
    model = c.model_copy()
    (model / "tokenizer.json").write_bytes(b"garbage{\x00 not json")
    return Case(c.train(model=model), [lit("tokenizer")])


@case("tokenizer-missing")
def _(c):
    model = c.model_copy()
    for f in list(model.glob("tokenizer*")) + list(model.glob("special_tokens_map.json")):
        f.unlink()
    return Case(c.train(model=model), [lit("tokenizer")])


@case("model-fake-gguf")
def _(c):
    gguf = c.inp / "fake.gguf"
    gguf.write_bytes(random.Random(1).randbytes(4096))
    return Case(c.train({"model": {"name": str(gguf)}}), [lit("fake.gguf")])


@case("model-name-regular-file")
def _(c):
    data = c.data
    return Case(c.train({"model": {"name": str(data)}}), [lit(str(data))], forbid=("does not exist",))


# --- output and cache folders ----------------------------------------------------------------------


@case("output-dir-is-a-file")
def _(c):
    taken = c.inp / "taken.txt"
    taken.write_text("do not overwrite me\n")
    return Case(c.train({"train": {"output_dir": str(taken)}}), [lit("output_dir")])


@case("output-dir-under-a-file")
def _(c):
    taken = c.inp / "taken.txt"
    taken.write_text("do not overwrite me\n")
    return Case(c.train({"train": {"output_dir": str(taken / "sub")}}), [lit("output_dir")])


@case("output-dir-read-only")
def _(c):
    ro = c.read_only(c.inp / "ro-out")
    return Case(c.train({"train": {"output_dir": str(ro)}}), [lit("output_dir")])


@case("output-dir-is-the-model-folder")
def _(c):
    model = c.model_copy()
    return Case(c.train({"train": {"output_dir": str(model)}}, model=model), [lit("output_dir")])


@case("cache-dir-is-a-file")
def _(c):
    taken = c.inp / "cache.txt"
    taken.write_text("not a folder\n")
    return Case(c.train({"reference": {"cache_dir": str(taken)}}), [lit("cache_dir")])


@case("cache-dir-read-only")
def _(c):
    ro = c.read_only(c.inp / "ro-cache")
    return Case(c.train({"reference": {"cache_dir": str(ro)}}), [lit("cache_dir")])


@case("reference-cache-corrupt-is-recomputed")
def _(c):
    """Not an error: a corrupt cache file is said, recomputed and rewritten; the run succeeds."""
    cfg = c.config()
    rc, _, err = c.run(["train", cfg])
    assert rc == 0, f"the first (good) run failed: {err[-2000:]}"
    files = sorted((c.work / "ref-cache").glob("*.safetensors"))
    assert len(files) == 1, files
    cached = files[0]
    garbage = b"garbage, not safetensors\n" * 4
    cached.write_bytes(garbage)

    def check(out: str, err: str) -> list:
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        problems = []
        if cached.name not in err:
            problems.append(f"stderr does not name the corrupt cache file {cached.name}")
        if cached.read_bytes() == garbage:
            problems.append("the corrupt cache file was not rewritten")
        else:
            try:
                load_file(str(cached))
            except (SafetensorError, OSError) as e:
                problems.append(f"the rewritten cache file is not valid safetensors: {e}")
        return problems

    return Case(["train", cfg, "--train.output_dir", c.work / "out2"], [], rc=0, check=check)


# --- config file ---------------------------------------------------------------------------------


def _yaml_file(c: Ctx, name: str, content: bytes) -> Case:
    path = c.inp / name
    path.write_bytes(content)
    return Case(["train", path], [lit(name)])


@case("yaml-list")
def _(c):
    return _yaml_file(c, "list.yaml", b"- model\n- train\n")


@case("yaml-scalar")
def _(c):
    return _yaml_file(c, "scalar.yaml", b"hello\n")


@case("yaml-scalar-zero")  # `0` and `false` must not read as an empty config
def _(c):
    return _yaml_file(c, "zero.yaml", b"0\n")


@case("yaml-not-utf8")
def _(c):
    return _yaml_file(c, "notutf8.yaml", b"\xff\xfe train: {}")


@case("yaml-alias-bomb")
def _(c):
    """Billion laughs: 9 levels of lists of 9 aliases (9**9 leaves once expanded), at a key whose
    type is wrong, so a message that shows the value would expand it."""
    names = "abcdefghi"
    lines = [f"  - &a [{', '.join(['lol'] * 9)}]"]
    lines += [f"  - &{n} [{', '.join(['*' + p] * 9)}]" for p, n in zip(names, names[1:])]
    base = c.base()
    text = yaml.safe_dump({k: v for k, v in base.items() if k != "train"}, sort_keys=False)
    text += "train:\n" + "".join(f"  {k}: {json.dumps(v)}\n" for k, v in base["train"].items() if k != "batch_size")
    text += "  batch_size:\n" + "\n".join("  " + line for line in lines) + "\n"
    path = c.inp / "bomb.yaml"
    path.write_text(text)
    return Case(["train", path], [(lit("bomb.yaml"), lit("train.batch_size"))], forbid=("MemoryError",), child=True)


@case("yaml-duplicate-section")
def _(c):
    base = c.base()
    first = {"train": {"lr": 1.0e-3}}
    path = c.inp / "dup.yaml"
    path.write_text(yaml.safe_dump(first) + yaml.safe_dump(base, sort_keys=False))  # `train:` twice
    assert path.read_text().count("\ntrain:") + path.read_text().startswith("train:") == 2
    return Case(["train", path], [lit("train")])


# --- config values -------------------------------------------------------------------------------

LORA = {"enabled": True, "r": 4}
VALUES = {
    # id: (override, culprits besides the key)
    "train.lr-nan": ({"train": {"lr": NAN}}, [NAN_RE]),
    "train.lr-inf": ({"train": {"lr": INF}}, [INF_RE]),
    "train.epochs-nan": ({"train": {"epochs": NAN}}, [NAN_RE]),
    "train.epochs-inf": ({"train": {"epochs": INF}}, [INF_RE]),
    "loss.beta-nan": ({"loss": {"beta": NAN}}, [NAN_RE]),
    "loss.beta-inf": ({"loss": {"beta": INF}}, [INF_RE]),
    "train.weight_decay-nan": ({"train": {"weight_decay": NAN}}, [NAN_RE]),
    "train.logging_steps-0": ({"train": {"logging_steps": 0}}, []),
    "train.num_workers-minus-1": ({"train": {"num_workers": -1}}, [word("-1")]),
    "train.scheduler-linearr": ({"train": {"scheduler": "linearr"}}, [word("linearr")]),
    "model.attn_implementation-bogus": ({"model": {"attn_implementation": "bogus"}}, [word("bogus")]),
    "lora.dropout-2": ({"lora": {**LORA, "dropout": 2}}, []),
    "lora.target_modules-nope_proj": ({"lora": {**LORA, "target_modules": ["nope_proj"]}}, [word("nope_proj")]),
    "train.seed-minus-1": ({"train": {"seed": -1}}, [word("-1")]),
    "train.max_steps-0": ({"train": {"max_steps": 0}}, []),
    "train.max_grad_norm-minus-1": ({"train": {"max_grad_norm": -1}}, [word("-1")]),
    "lora.alpha-minus-8": ({"lora": {**LORA, "alpha": -8}}, [word("-8")]),
}


def _value_case(case_id: str):
    over, extra = VALUES[case_id]
    key = case_id.split("-", 1)[0]
    return lambda c: Case(c.train(over), [lit(key), *extra])


for _id in VALUES:
    case(_id)(_value_case(_id))


# --- data ----------------------------------------------------------------------------------------

DEEP = 100_000


def _deep_file(c: Ctx) -> Path:
    path = c.inp / "data" / "deep.jsonl"
    path.write_text(
        '{"prompt": ' + "[" * DEEP + "]" * DEEP + ', "chosen": " a", "rejected": " b"}\n' + json.dumps(PAIRS[0]) + "\n"
    )
    return path


@case("data-deeply-nested-json-train")
def _(c):
    deep = _deep_file(c)
    return Case(c.train({"data": {"train": str(deep)}}), [lit("deep.jsonl"), r"line 1\b"])


@case("data-deeply-nested-json-check")
def _(c):
    deep = _deep_file(c)
    return Case(
        ["data", "check", deep, "--config", c.config(), "--json"], [lit("deep.jsonl"), r"line 1\b"], report=True
    )


@case("data-check-unpaired-data-for-paired-loss")
def _(c):
    kto = c.jsonl("kto.jsonl", UNPAIRED)
    cfg = c.config({"loss": {"name": "sigmoid"}})
    return Case(["data", "check", kto, "--config", cfg, "--json"], [(lit("sigmoid"), lit("unpaired"))], report=True)


# --- eval, report, score arguments ---------------------------------------------------------------


def _prompts(c: Ctx) -> Path:
    path = c.inp / "prompts.txt"
    path.write_text("The movie was\nI think that\n")
    return path


@case("eval-samples-0")
def _(c):
    run = c.run_copy()
    return Case(["eval", "--model", run, "--prompts", _prompts(c), "--samples", "0"], [lit("--samples")])


@case("eval-max-new-tokens-minus-1")
def _(c):
    run = c.run_copy()
    return Case(["eval", "--model", run, "--prompts", _prompts(c), "--max-new-tokens", "-1"], [lit("--max-new-tokens")])


@case("report-metrics-not-utf8")
def _(c):
    run = c.run_copy()
    (run / "metrics.jsonl").write_bytes(b'\xff\xfe{"step": 1, "loss": 0.69}\n')
    return Case(["report", run], [lit("metrics.jsonl")])


@case("report-out-is-a-file")
def _(c):
    run = c.run_copy()
    taken = c.inp / "taken.html"
    taken.write_text("<p>mine</p>\n")
    return Case(["report", run, "--out", taken], [lit("taken.html")])


@case("score-out-is-the-data-file")
def _(c):
    run = c.run_copy()
    data = c.data
    return Case(["score", "--model", run, "--data", data, "--out", data], [lit("pairs.jsonl")])


# --- the shared finished run and the test ---------------------------------------------------------


@pytest.fixture(scope="session")
def finished_run(tmp_path_factory, tiny_dir) -> Path:
    """A finished `prefopt train` run folder: 1 step on the tiny model, LoRA off."""
    root = tmp_path_factory.mktemp("finished-run")
    c = Ctx(root, Path(tiny_dir), None)
    cfg = c.config({"train": {"output_dir": str(root / "run")}})
    out, err = io.StringIO(), io.StringIO()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc, escaped = call_main(["train", cfg], c.work, c.cache, mp)
    if rc != 0:
        pytest.fail(f"the shared run failed (rc {rc}, {escaped or 'no exception'}): {err.getvalue()[-3000:]}")
    return root / "run"


def error_message(err: str) -> tuple[Optional[str], list]:
    """(the paragraph from `prefopt: error:` to the end of stderr, problems with its form)."""
    lines = [line for line in err.splitlines() if line.startswith("prefopt: error:")]
    if not lines:
        return None, ["no line starting `prefopt: error:` on stderr"]
    message = err[err.index("prefopt: error:") :].strip()
    problems = []
    if len(lines) > 1:
        problems.append(f"{len(lines)} lines start `prefopt: error:` (expected one)")
    if "\n\n" in message:
        problems.append("the message is more than one paragraph")
    if len(message) > MAX_MESSAGE:
        problems.append(f"the message is {len(message)} characters long (at most {MAX_MESSAGE})")
    return message, problems


def culprit_problems(text: str, culprits: list, forbid) -> list:
    problems = []
    for cul in culprits:
        alternatives = cul if isinstance(cul, tuple) else (cul,)
        if not any(re.search(a, text, re.IGNORECASE) for a in alternatives):
            problems.append(f"does not name {' or '.join(alternatives)}")
    problems += [f"says {f!r}" for f in forbid if f.lower() in text.lower()]
    return problems


@pytest.mark.parametrize("case_id", list(CASES))
def test_bad_input(case_id, tmp_path_factory, tiny_dir, request, monkeypatch, capfd):
    c = Ctx(tmp_path_factory.mktemp("case"), Path(tiny_dir), request)  # a neutral name: no key in the path
    spec = CASES[case_id](c)
    watched = {"in": c.inp, "model": Path(tiny_dir)}
    before = {k: snapshot(p) for k, p in watched.items()}

    rc, out, err = run_prefopt(spec.argv, c.work, c.cache) if spec.child else c.run(spec.argv)

    problems = [f"an exception escaped main(): {e}" for e in c.escaped]
    if rc is None:
        problems.append(f"did not finish within {TIMEOUT} s")
    elif rc != spec.rc:
        problems.append(f"exit code {rc}, expected {spec.rc}")
    if "Traceback" in err or "Traceback" in out:
        problems.append("a traceback")
    if "MemoryError" in err:
        problems.append("MemoryError")
    if spec.report:
        try:
            report = json.loads(out)
        except ValueError:
            report = None
            problems.append("stdout is not the JSON report")
        if report is not None:
            if report.get("usable", True):
                problems.append("the report says usable")
            text = " ".join(map(str, report.get("problems", []))) + " " + str(report.get("error", ""))
            problems += [f"the report's problems {p}" for p in culprit_problems(text, spec.culprit, spec.forbid)]
    elif spec.rc == 2:
        message, form = error_message(err)
        problems += form
        if message is not None:
            problems += [f"the message {p}" for p in culprit_problems(message, spec.culprit, spec.forbid)]
    if spec.check is not None:
        problems += spec.check(out, err)
    for name, path in watched.items():
        after = snapshot(path)
        changed = sorted(p for p in before[name] if p in after and before[name][p] != after[p])
        gone = sorted(set(before[name]) - set(after))
        new = sorted(set(after) - set(before[name]))
        for what, paths in (("modified", changed), ("removed", gone), ("written", new)):
            if paths:
                problems.append(f"{what} in the user's {name} folder: {', '.join(paths[:5])}")
    assert not problems, f"{case_id}: " + "; ".join(problems) + f"\n--- stderr (tail) ---\n{err[-3000:]}"
