"""Run untrusted Python (a model's answer) against unit tests in a sandboxed child process.

    result = run_tests(code, ["assert add(1, 2) == 3", "assert add(-1, 1) == 0"], entry_point="add")
    result.passed, result.total, result.score, result.binary, result.reason, result.seconds
    results = score_many([(code, tests), (code2, tests2, "entry"), ...])   # parallel over the cores
    extract_code(answer)                                                    # the code of a chat answer

Each test (an assert statement or a small block) counts on its own: score = passed / total, and
`binary` is 1.0 only when every test passed. A run that does not end normally — wall-clock timeout,
output flood, `sys.exit`/`os._exit`, a crash — scores 0 with the reason, as does candidate code that
does not compile, raises at import or lacks the entry point.

How a run is isolated (docs/code.md lists what is and what is not): a fresh interpreter
(`python -I -S -u`), a clean environment, rlimits on memory (address space), CPU time, file size,
open files, processes and core dumps, a wall-clock limit enforced from outside and a per-test
alarm inside, a cap on what it prints, its own session, killed whole afterwards. Run by root on
Linux it also gets an unprivileged user id of its own (one per concurrent run, from SANDBOX_UID),
new network, IPC, PID and mount namespaces, a read-only root filesystem with a private size-limited
/tmp (its working directory) and /dev/shm, and no way to gain privileges (no_new_privs, nosuid);
whatever it started is killed and nothing it wrote survives the run. Without root only the rlimits,
the timeouts and the process-group kill apply, in a temporary directory removed afterwards.

Process tree of one run:

    caller (any thread)  ->  launcher: `python -I -S -u -c _BOOT`, root when the caller is; reads the
                             job from stdin, creates the namespaces and the private filesystem
                         ->  init: PID 1 of the new PID namespace; waits for the worker, reports how
                             it ended; when it exits, the kernel kills everything left in the namespace
                         ->  worker: limits set, privileges dropped; runs the candidate and the tests

The worker reports on a pipe of its own (fd 3), one line per event, each prefixed with a random
nonce, so what the candidate prints cannot pose as a result and a process it forks reports nothing.
Code running inside the worker can still read the nonce or redefine `==`: the sandbox protects the
machine, not the score against code written to game it.
"""

from __future__ import annotations

import ast
import builtins
import contextlib
import ctypes
import fcntl
import grp
import json
import logging
import math
import os
import platform
import pwd
import re
import resource
import secrets
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional, Sequence, Union

from prefopt.errors import PrefoptError

# The sandbox user ids: SANDBOX_UID, SANDBOX_UID + 1, ... (one per concurrent run, as user and
# group). 65000-65533 is a range Debian reserves and never assigns; an id with a passwd or group
# entry is skipped.
SANDBOX_UID = 65100
SLOTS = 64
_SLOT_WAIT = 120.0  # seconds a run waits for a free sandbox user id before SandboxError
_LOCK_DIR = Path("/run/prefopt-sandbox") if os.path.isdir("/run") else Path(tempfile.gettempdir()) / "prefopt-sandbox"
log = logging.getLogger("prefopt")
_SRC = Path(__file__).resolve().parents[2]  # the folder holding the prefopt package
_BOOT = "import sys; sys.path.insert(0, sys.argv[1]); from prefopt.evaluation.sandbox import _launcher; _launcher()"
_ENV = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LC_ALL": "C.UTF-8"}
# standard modules imported before privileges are dropped: importable by the candidate even where the
# interpreter's own files are not readable by the sandbox user (an interpreter under /root)
PRELOADED = (
    "array", "bisect", "cmath", "collections", "copy", "dataclasses", "datetime", "decimal", "enum", "fractions",
    "functools", "heapq", "itertools", "json", "math", "operator", "random", "re", "statistics", "string",
    "textwrap", "time", "typing", "unicodedata",
)  # fmt: skip
_OUTPUT_KEPT = 2000  # characters of the program's output kept in Result.output
_REPORT_CAP = 1 << 20  # bytes of report a run may send (a flood ends the run)
# how long a stage may overrun its alarm before the run is stopped from outside (the alarm repeats
# _ALARM_PATIENCE times, 0.25 s apart, then the harness gives up by itself)
_STAGE_GRACE = 2.0
_PRIVILEGED = True  # as root: own user ids and namespaces (tests turn it off to exercise the plain path)

# Linux constants (sched.h, linux/mount.h, linux/prctl.h)
CLONE_NEWNS, CLONE_NEWIPC, CLONE_NEWNET, CLONE_NEWPID = 0x00020000, 0x08000000, 0x40000000, 0x20000000
MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REC, MS_PRIVATE = 2, 4, 8, 0x4000, 1 << 18
MOUNT_ATTR_RDONLY, MOUNT_ATTR_NOSUID, AT_RECURSIVE, AT_FDCWD = 0x1, 0x2, 0x8000, -100
PR_SET_PDEATHSIG, PR_SET_DUMPABLE, PR_SET_NO_NEW_PRIVS = 1, 4, 38
SYS_MOUNT_SETATTR = {"x86_64": 442, "aarch64": 442}.get(platform.machine())


class SandboxError(RuntimeError):
    """The sandbox itself could not run (not the candidate's fault): the message says why."""


@dataclass(frozen=True)
class Limits:
    """What one run may use. `timeout` is wall-clock seconds for the whole run (interpreter start,
    the candidate's top-level code and every test), enforced from outside; `test_timeout` bounds the
    candidate's top-level code and each test separately (a test over it fails, the next one runs)."""

    timeout: float = 10.0
    test_timeout: float = 2.0
    memory_mb: int = 512  # address space of each process
    processes: int = 8  # processes and threads (as root: of the run's own user id)
    file_mb: float = 1.0  # largest file it may write
    disk_mb: int = 16  # its private /tmp (root on Linux)
    open_files: int = 64
    output_kb: int = 1024  # stdout + stderr; more ends the run ("output limit")

    def __post_init__(self):
        for name, low in (("timeout", 0.1), ("test_timeout", 0.01), ("memory_mb", 64), ("processes", 1)):
            if not isinstance(getattr(self, name), (int, float)) or getattr(self, name) < low:
                raise PrefoptError(f"sandbox limit {name}: must be a number >= {low}, found {getattr(self, name)!r}.")
        for name in ("file_mb", "disk_mb", "open_files", "output_kb"):
            if not isinstance(getattr(self, name), (int, float)) or getattr(self, name) <= 0:
                raise PrefoptError(f"sandbox limit {name}: must be a number > 0, found {getattr(self, name)!r}.")


@dataclass(frozen=True)
class Result:
    """The outcome of one run. `score` = passed / total; `binary` = 1.0 when every test passed.
    `reason` is None when every test passed, else why not: the first failing test ("test 2:
    AssertionError"), or why the run failed as a whole ("syntax error: ...", "no function 'f'",
    "error: NameError: ...", "timeout", "memory", "exit", "output limit", "killed by signal 9",
    ...), in which case `passed` is 0. `tests` holds, per test, None (passed) or why it failed."""

    passed: int
    total: int
    reason: Optional[str]
    seconds: float
    tests: tuple = ()
    output: str = ""  # the start of what the program printed (stdout and stderr)
    isolation: tuple = ()  # the isolation measures in effect (see isolation())
    score: float = field(init=False)

    def __post_init__(self):
        object.__setattr__(self, "score", self.passed / self.total if self.total else 0.0)

    @property
    def binary(self) -> float:
        """1.0 when every test passed, else 0.0."""
        return 1.0 if self.total and self.passed == self.total else 0.0


Tests = Union[Sequence[str], str]


# ----------------------------------------------------------------------------------------------
# The API


def run_tests(code: str, tests: Tests, *, entry_point: Optional[str] = None, **limits) -> Result:
    """Run `code` and then each of `tests` in a sandboxed child process (see the module docstring).
    `tests`: a list of test sources (each counts once), or one string, split into its top-level
    statements. `entry_point`: a function the code must define (else it scores 0, "no function
    'NAME'"). `limits`: any field of Limits (timeout, test_timeout, memory_mb, ...)."""
    return _run(code, split_tests(tests), entry_point, Limits(**limits))


def score_many(items: Sequence, *, workers: Optional[int] = None, **limits) -> list[Result]:
    """run_tests for each item — (code, tests) or (code, tests, entry_point) — `workers` at a time
    (default: the number of CPU cores); results in the order of `items`."""
    lim = Limits(**limits)
    jobs = []
    for i, item in enumerate(items):
        if not isinstance(item, (tuple, list)) or len(item) not in (2, 3):
            raise PrefoptError(f"score_many: item {i} must be (code, tests) or (code, tests, entry_point).")
        jobs.append((item[0], split_tests(item[1]), item[2] if len(item) == 3 else None))
    workers = max(1, min(workers or os.cpu_count() or 1, len(jobs) or 1, SLOTS))
    if workers == 1:
        return [_run(*job, lim) for job in jobs]
    with ThreadPoolExecutor(workers, thread_name_prefix="sandbox") as pool:
        return list(pool.map(lambda job: _run(*job, lim), jobs))


def isolation() -> tuple:
    """The isolation measures a run gets on this machine, by name: "user" (its own unprivileged
    user id), "network", "ipc", "pid", "mount" (namespaces), "filesystem" (read-only root, private
    /tmp and /dev/shm), "proc" (a /proc showing only its processes); the rlimits, timeouts and the
    kill always apply."""
    return run_tests("", ["pass"]).isolation


def split_tests(tests: Tests) -> list[str]:
    """The tests one by one: a list as given (non-empty strings); a single string split into its
    top-level statements (so "assert a\\nassert b" is two tests, a for loop with asserts one)."""
    if isinstance(tests, str):
        try:
            tree = ast.parse(tests)
        except SyntaxError as e:
            raise PrefoptError(f"tests: not valid Python ({e.msg}, line {e.lineno}).") from None
        tests = [ast.get_source_segment(tests, node) for node in tree.body]
    tests = list(tests)
    if not tests or not all(isinstance(t, str) and t.strip() for t in tests):
        raise PrefoptError(f"tests: expected a non-empty list of test sources (strings), found {tests!r:.200}.")
    return tests


_FENCE = re.compile(r"^[ \t]*```[ \t]*([^\s`]*)[^\n]*\n(.*?)(?:^[ \t]*```|\Z)", re.MULTILINE | re.DOTALL)
_PYTHON_LABELS = ("python", "py", "python3", "py3")


def extract_code(answer: str) -> str:
    """The code of a chat answer, by these rules, in order:

    1. the first fenced block (a line starting with ```) labelled python, py, python3 or py3 (any
       case), up to the next line starting with ``` (an unclosed fence runs to the end);
    2. else the first fenced block with any label, or none;
    3. else the whole answer, if it parses as Python;
    4. else the code in the prose: from the first line that starts, unindented, with `def`,
       `async def`, `class`, `import`, `from` or `@`, up to the last line that keeps it parsing as
       Python (the longest such run);
    5. else the whole answer, unchanged (the run then fails with its syntax error).

    A block's text is dedented (a fence indented in a list item); nothing else is changed.
    """
    blocks = [(m.group(1).lower(), m.group(2)) for m in _FENCE.finditer(answer)]
    for label, body in blocks:
        if label in _PYTHON_LABELS:
            return textwrap.dedent(body)
    if blocks:
        return textwrap.dedent(blocks[0][1])
    if _parses(answer):
        return answer
    return _code_in_prose(answer) or answer


_CODE_START = ("def ", "async def ", "class ", "import ", "from ", "@")


def _code_in_prose(answer: str) -> Optional[str]:
    """Rule 4 of extract_code: the longest run of lines from the first unindented definition or
    import that parses as Python, or None."""
    lines = answer.splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith(_CODE_START)), None)
    if start is None:
        return None
    for end in range(len(lines), start, -1)[:200]:  # bounded: an answer is a few dozen lines
        code = "\n".join(lines[start:end]) + "\n"
        if _parses(code):
            return code
    return None


def _parses(text: str) -> bool:
    """Whether `text` parses as Python (it is never run here)."""
    try:
        ast.parse(text)
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return False
    return True


# ----------------------------------------------------------------------------------------------
# The caller's side: one run


def _run(code: str, tests: list[str], entry_point: Optional[str], limits: Limits) -> Result:
    """One sandboxed run of `code` against `tests`, as a Result."""
    if not isinstance(code, str):
        raise PrefoptError(f"run_tests: code must be a string, found {type(code).__name__}.")
    if entry_point is not None and not (isinstance(entry_point, str) and entry_point.isidentifier()):
        raise PrefoptError(f"run_tests: entry_point must be a Python name, found {entry_point!r}.")
    with _sandbox_user() as uid:
        start = time.monotonic()  # after the wait for a free sandbox user: that is not the run's time
        raw = _supervise({"code": code, "tests": tests, "entry_point": entry_point}, limits, uid, start)
    result = _result(raw, len(tests), time.monotonic() - start)
    _warn_if_weak(result.isolation)
    return result


_ESSENTIAL = ("user", "network", "filesystem")  # without these the code runs as the caller, online
_warned_weak = False


def _warn_if_weak(isolation: tuple) -> None:
    """Once per process: a warning when a run lacked an essential isolation (not root, or the
    kernel refused namespaces), naming what was missing (docs/code.md says what each one is)."""
    global _warned_weak
    missing = [m for m in _ESSENTIAL if m not in isolation]
    if missing and not _warned_weak:
        _warned_weak = True
        log.warning(
            "the code sandbox runs without %s isolation here (it needs root and Linux namespaces): candidate "
            "code runs with rlimits, timeouts and a process-group kill only; see docs/code.md",
            ", ".join(missing),
        )


def _supervise(job: dict, limits: Limits, uid: Optional[int], start: float) -> dict:
    """Start the launcher, hand it the job, collect its reports and output until it ends or a
    limit is hit, then kill its process group and clean up. Returns the raw outcome."""
    workdir = Path(tempfile.mkdtemp(prefix="prefopt-sandbox-"))  # used when no private /tmp can be made
    if uid is not None:
        os.chown(workdir, uid, uid)
    nonce = secrets.token_hex(16)
    report_r, report_w = os.pipe()
    if report_w < 3:  # the caller runs without stdio: keep the report pipe clear of fds 0-2
        moved = fcntl.fcntl(report_w, fcntl.F_DUPFD_CLOEXEC, 3)
        os.close(report_w)
        report_w = moved
    job = {
        **job,
        "nonce": nonce,
        "report_fd": report_w,
        "parent": os.getpid(),
        "uid": uid,
        "workdir": str(workdir),
        "src": str(_SRC),
        "limits": asdict(limits),
    }
    try:
        proc = subprocess.Popen(
            [sys.executable, "-I", "-S", "-u", "-c", _BOOT, str(_SRC)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            pass_fds=(report_w,),
            cwd="/",
            env=_ENV,
            start_new_session=True,
        )
    except OSError as e:
        os.close(report_r)
        shutil.rmtree(workdir, ignore_errors=True)
        raise SandboxError(f"cannot start {sys.executable}: {e}") from None
    finally:
        os.close(report_w)
    raw = {}
    try:
        with contextlib.suppress(BrokenPipeError):
            proc.stdin.write(json.dumps(job).encode())
            proc.stdin.close()
        raw = _collect(proc, report_r, nonce, limits, start)
        raw["launcher"] = _exit_status(proc.pid, wait=0.5 if raw["stop"] is None else 0.0)
        return raw
    finally:
        _kill_group(proc)
        os.close(report_r)
        proc.stdout.close()
        shutil.rmtree(workdir, ignore_errors=True)
        if uid is not None and "filesystem" not in _isolation_of(raw):
            _sweep_files(uid)


def _isolation_of(raw: dict) -> tuple:
    """The isolation names a raw outcome's setup record announced (none when it has none)."""
    for rec in raw.get("records", ()):
        if "setup" in rec and isinstance(rec["setup"], list):
            return tuple(str(name) for name in rec["setup"])
    return ()


def _collect(proc, report_r: int, nonce: str, limits: Limits, start: float) -> dict:
    """Read the program's output and reports until both pipes close (the run is over), the wall
    clock runs out, a stage (the candidate's top-level code or a test: the time between two reports)
    overruns its alarm by _STAGE_GRACE, the output exceeds its cap, or the launcher has exited while
    something it left still holds a pipe. Returns the verified records, the start of the output and
    why it was stopped."""
    deadline = start + limits.timeout
    cap = int(limits.output_kb * 1024)
    out, out_len, report = bytearray(), 0, bytearray()
    stop, exited_at, stage_deadline = None, None, math.inf
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout.fileno(), selectors.EVENT_READ, "out")
    sel.register(report_r, selectors.EVENT_READ, "report")
    try:
        while sel.get_map() and stop is None:
            now = time.monotonic()
            if now >= min(deadline, stage_deadline):
                stop = "timeout"
                break
            if exited_at is None and _exit_status(proc.pid) is not None:
                exited_at = now
            if exited_at is not None and now - exited_at > 0.25:
                break
            for key, _ in sel.select(min(deadline - now, stage_deadline - now, 0.1 if exited_at else 0.25)):
                data = os.read(key.fd, 65536)
                if not data:
                    sel.unregister(key.fd)
                elif key.data == "out":
                    out_len += len(data)
                    out += data[: max(0, 4 * _OUTPUT_KEPT - len(out))]
                    if out_len > cap:
                        stop = "output limit"
                else:
                    report += data
                    stage_deadline = time.monotonic() + limits.test_timeout + _STAGE_GRACE
                    if len(report) > _REPORT_CAP:
                        stop = "output limit"
    finally:
        sel.close()
    return {"records": _records(report, nonce), "output": out, "stop": stop}


def _records(report: bytes, nonce: str) -> list[dict]:
    """The report lines that carry the nonce, decoded; anything else is ignored."""
    records = []
    for line in report.decode("utf-8", "replace").splitlines():
        if line.startswith(nonce):
            with contextlib.suppress(ValueError, RecursionError):  # nesting too deep: RecursionError
                rec = json.loads(line[len(nonce) :])
                if isinstance(rec, dict):
                    records.append(rec)
    return records


def _exit_status(pid: int, wait: float = 0.0):
    """The waitid result of the exited child `pid`, without reaping it (so that its pid, which is
    also its process group id, cannot be reused before the group is killed); None while it runs."""
    end = time.monotonic() + wait
    while True:
        try:
            info = os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:
            return None
        if info is not None or time.monotonic() >= end:
            return info
        time.sleep(0.01)


def _kill_group(proc) -> None:
    """SIGKILL to the run's process group (the launcher, init, and whatever stayed in the group),
    then reap the launcher."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def _result(raw: dict, total: int, seconds: float) -> Result:
    """A Result from the raw outcome of a run (see Result for what the fields say)."""
    records, stop = raw["records"], raw["stop"]
    output = raw["output"].decode("utf-8", "replace")[:_OUTPUT_KEPT]
    setup = _isolation_of(raw)
    if not any("setup" in r for r in records) and stop is None:
        status = raw.get("launcher")
        raise SandboxError(f"the sandbox did not start (launcher {_describe_status(status)}): {output[-1500:]}")

    def failed(reason: str) -> Result:
        return Result(0, total, reason, round(seconds, 3), (reason,) * total, output, setup)

    if stop is not None:
        return failed(stop)
    try:  # the records come from the sandboxed program: any that are malformed score 0
        return _verdict(records, total, seconds, output, setup, failed)
    except (TypeError, KeyError, AttributeError, ValueError, RecursionError):
        return failed("report tampered")


def _verdict(records: list, total: int, seconds: float, output: str, setup: tuple, failed) -> Result:
    """The Result of a run that was not stopped from outside, from its verified records."""
    candidate = next((r for r in records if "candidate" in r), None)
    outcomes = [r for r in records if "test" in r]
    done = any("done" in r for r in records)
    if any("abandoned" in r for r in records):
        return failed("timeout")
    if any("exit" in r for r in records):
        return failed("exit")
    if not done:
        ended = [r["worker"] for r in records if "worker" in r]
        return failed(_describe_worker(ended[-1] if ended else None))
    if candidate is None:
        return failed("crashed")
    if candidate["candidate"] is not None:
        why = str(candidate["candidate"])
        return failed(why if why.startswith(("syntax error", "no function", "timeout", "memory")) else f"error: {why}")
    if [r.get("test") for r in outcomes] != list(range(total)):
        return failed("report tampered")
    errors = tuple(None if r.get("error") is None else str(r["error"]) for r in outcomes)
    first = next((i for i, e in enumerate(errors) if e is not None), None)
    reason = None if first is None else f"test {first + 1}: {errors[first]}"
    passed = sum(e is None for e in errors)
    return Result(passed, total, reason, round(seconds, 3), errors, output, setup)


def _describe_worker(ended: Optional[dict]) -> str:
    """Why a worker that did not finish its report ended, from init's record."""
    if not isinstance(ended, dict):
        return "crashed"
    if ended.get("signal"):
        sig = ended["signal"]
        if not isinstance(sig, int):
            return "report tampered"
        named = {signal.SIGXCPU: "cpu limit", signal.SIGXFSZ: "file size limit"}
        return named.get(sig, f"killed by signal {sig}")
    return f"exit (status {ended.get('exit')})"


def _describe_status(info) -> str:
    """A launcher's exit as words."""
    if info is None:
        return "did not exit"
    if info.si_code == os.CLD_EXITED:
        return f"exited with status {info.si_status}"
    return f"killed by signal {info.si_status}"


# ----------------------------------------------------------------------------------------------
# The caller's side: sandbox user ids, and cleaning up after them


@contextlib.contextmanager
def _sandbox_user():
    """As root: a free sandbox user id, held (by a lock file, across processes) for the block and
    cleared of leftover processes before and after it. Otherwise: None."""
    if os.geteuid() != 0 or not _PRIVILEGED:
        yield None
        return
    _LOCK_DIR.mkdir(mode=0o700, exist_ok=True)
    st = _LOCK_DIR.lstat()
    if st.st_uid != 0 or st.st_mode & 0o022 or not _LOCK_DIR.is_dir() or _LOCK_DIR.is_symlink():
        raise SandboxError(f"{_LOCK_DIR} must be a folder owned by root and writable by root only.")
    give_up = time.monotonic() + _SLOT_WAIT
    while True:
        if time.monotonic() > give_up:
            raise SandboxError(
                f"no free sandbox user id in {SANDBOX_UID}-{SANDBOX_UID + SLOTS - 1} after {_SLOT_WAIT:.0f} s: "
                f"every one is named on this machine or held by a run (lock files in {_LOCK_DIR})."
            )
        for slot in range(SLOTS):
            uid = SANDBOX_UID + slot
            if _id_taken(uid):
                continue
            fd = os.open(_LOCK_DIR / f"slot-{slot}", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                continue
            try:
                _sweep(uid)
                yield uid
            finally:
                _sweep(uid)
                os.close(fd)
            return
        time.sleep(0.05)


def _id_taken(uid: int) -> bool:
    """Whether `uid` is a named user or group on this machine (then it is not used)."""
    for lookup in (pwd.getpwuid, grp.getgrgid):
        try:
            lookup(uid)
            return True
        except KeyError:
            pass
    return False


def processes_of(uid: int) -> list[int]:
    """Process ids whose real or effective user id is `uid` (zombies excluded)."""
    found = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            status = _proc_status(entry.name)
            if status and uid in status[0] and status[1] != "Z":
                found.append(int(entry.name))
    return found


def _proc_status(pid: str):
    """(real and effective uid, state letter) of a process from /proc, or None if it is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            text = f.read()
    except OSError:
        return None
    uids = re.search(r"^Uid:\s+(\d+)\s+(\d+)", text, re.MULTILINE)
    state = re.search(r"^State:\s+(\S)", text, re.MULTILINE)
    if not uids or not state:
        return None
    return {int(uids.group(1)), int(uids.group(2))}, state.group(1)


def _sweep(uid: int, patience: float = 5.0) -> None:
    """SIGKILL every process of `uid` (through a pidfd, so a reused pid is never hit) until none is
    left. With the PID namespace nothing should be left; this catches what escaped without it."""
    end = time.monotonic() + patience
    while True:
        pids = processes_of(uid)
        if not pids:
            return
        for pid in pids:
            try:
                fd = os.pidfd_open(pid)
            except OSError:
                continue
            try:
                status = _proc_status(str(pid))
                if status and uid in status[0]:
                    signal.pidfd_send_signal(fd, signal.SIGKILL)
            except OSError:
                pass
            finally:
                os.close(fd)
        if time.monotonic() > end:
            raise SandboxError(f"processes of sandbox user {uid} survive SIGKILL: {pids[:10]}")
        time.sleep(0.01)


def _sweep_files(uid: int) -> None:
    """Remove what user `uid` left in the shared temporary folders (only needed when the run had no
    private filesystem)."""
    for folder in ("/tmp", "/var/tmp", "/dev/shm"):
        with contextlib.suppress(OSError):
            for entry in os.scandir(folder):
                with contextlib.suppress(OSError):
                    if entry.stat(follow_symlinks=False).st_uid == uid:
                        if entry.is_dir(follow_symlinks=False):
                            shutil.rmtree(entry.path, ignore_errors=True)
                        else:
                            os.unlink(entry.path)


# ----------------------------------------------------------------------------------------------
# The child's side (runs in `python -I -S -u`; only the standard library)


def _launcher() -> None:
    """The sandbox process: read the job, isolate, fork init (PID 1 of the new namespace) and exit
    as it does. Dies with the caller (PR_SET_PDEATHSIG) and by its own alarm if orphaned."""
    job = json.loads(sys.stdin.buffer.read())
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    if job["report_fd"] != 3:
        os.dup2(job["report_fd"], 3)
        os.close(job["report_fd"])
    libc = _libc()
    if libc is not None:
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != job["parent"]:
        os._exit(1)
    signal.alarm(int(math.ceil(job["limits"]["timeout"])) + 5)
    for name in PRELOADED:
        with contextlib.suppress(ImportError):
            __import__(name)
    isolated = _isolate(libc, job) if libc is not None and job["uid"] is not None else {}
    pid = os.fork()
    if pid == 0:
        try:
            _init(libc, job, isolated)
        finally:
            os._exit(70)
    _, status = os.waitpid(pid, 0)
    os._exit(os.waitstatus_to_exitcode(status) % 256)


def _libc():
    """The C library through ctypes (Linux), or None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None


def _isolate(libc, job: dict) -> dict:
    """As root: new network, IPC, PID and mount namespaces (each where the kernel allows it) and,
    with the mount namespace, the private filesystem. Returns what took effect, by name."""
    done = {}
    for name, flag in (("network", CLONE_NEWNET), ("ipc", CLONE_NEWIPC), ("pid", CLONE_NEWPID), ("mount", CLONE_NEWNS)):
        if libc.unshare(flag) == 0:
            done[name] = True
    if done.get("mount") and _private_filesystem(libc, job):
        done["filesystem"] = True
    return done


class _MountAttr(ctypes.Structure):
    _fields_ = [("attr_set", ctypes.c_uint64), ("attr_clr", ctypes.c_uint64), ("propagation", ctypes.c_uint64)]
    _fields_ += [("userns_fd", ctypes.c_uint64)]


def _private_filesystem(libc, job: dict) -> bool:
    """In the new mount namespace: nothing propagates back to the host, the whole tree is read-only
    and nosuid, and /tmp (the working directory's home) and /dev/shm are small private tmpfs."""
    limits = job["limits"]
    if SYS_MOUNT_SETATTR is None or libc.mount(None, b"/", None, MS_REC | MS_PRIVATE, None) != 0:
        return False
    attr = _MountAttr(MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID, 0, 0, 0)
    libc.syscall.restype = ctypes.c_long
    if libc.syscall(SYS_MOUNT_SETATTR, AT_FDCWD, b"/", AT_RECURSIVE, ctypes.byref(attr), ctypes.sizeof(attr)) != 0:
        return False
    tmp = f"size={max(1024, math.ceil(limits['disk_mb'] * 1024))}k,nr_inodes=4096,mode=1777".encode()
    if libc.mount(b"tmpfs", b"/tmp", b"tmpfs", MS_NOSUID | MS_NODEV, tmp) != 0:
        return False
    if os.path.isdir("/dev/shm"):
        libc.mount(b"tmpfs", b"/dev/shm", b"tmpfs", MS_NOSUID | MS_NODEV, b"size=1m,nr_inodes=64,mode=1777")
    os.mkdir("/tmp/sandbox", 0o700)
    if job["uid"] is not None:
        os.chown("/tmp/sandbox", job["uid"], job["uid"])
    return True


def _init(libc, job: dict, isolated: dict) -> None:
    """PID 1 of the run's namespace (a plain middle process without one): mount its /proc, fork the
    worker, reap every child until the worker ends, report how it ended, exit (which, in a PID
    namespace, kills everything the worker left)."""
    if libc is not None:
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if isolated.get("pid") and isolated.get("filesystem"):
        if libc.mount(b"proc", b"/proc", b"proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, None) == 0:
            isolated["proc"] = True
    worker = os.fork()
    if worker == 0:
        try:
            _worker(libc, job, isolated)
        finally:
            os._exit(70)
    while True:
        try:
            pid, status = os.wait()
        except ChildProcessError:
            os._exit(0)
        if pid == worker:
            break
    code = os.waitstatus_to_exitcode(status)
    ended = {"signal": -code} if code < 0 else {"exit": code}
    with contextlib.suppress(OSError):
        os.write(3, (job["nonce"] + json.dumps({"worker": ended}) + "\n").encode())
    os._exit(0)


def _worker(libc, job: dict, isolated: dict) -> None:
    """Set the limits, drop privileges, leave a clean process state, then run the harness."""
    limits, uid = job["limits"], job["uid"]
    workdir = "/tmp/sandbox" if isolated.get("filesystem") else job["workdir"]
    os.chdir(workdir)
    with contextlib.suppress(OSError):
        os.setpriority(os.PRIO_PROCESS, 0, max(10, os.getpriority(os.PRIO_PROCESS, 0)))
    _set_limits(limits, uid)
    if uid is not None:
        os.setgroups([])
        os.setgid(uid)
        os.setuid(uid)
        if os.getuid() != uid or os.geteuid() != uid or os.getegid() != uid:
            os._exit(71)
        isolated["user"] = True
    if libc is not None:
        libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
        libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    os.umask(0o077)
    os.environ.clear()
    os.environ.update({**_ENV, "HOME": workdir, "TMPDIR": workdir})
    sys.path[:] = [p for p in sys.path if p != job["src"]]
    sys.argv = ["solution.py"]
    _harness(job, sorted(isolated))


def _set_limits(limits: dict, uid: Optional[int]) -> None:
    """The rlimits of the worker (hard = soft, so they cannot be raised again)."""
    cpu = int(math.ceil(limits["timeout"])) + 1
    processes = int(limits["processes"])
    if uid is None and sys.platform.startswith("linux"):  # RLIMIT_NPROC counts every process of the user
        processes += _count_own_processes()
    memory = int(limits["memory_mb"]) << 20
    for res, soft, hard in (
        (resource.RLIMIT_AS, memory, memory),
        (resource.RLIMIT_CPU, cpu, cpu + 1),
        (resource.RLIMIT_FSIZE, int(limits["file_mb"] * (1 << 20)), int(limits["file_mb"] * (1 << 20))),
        (resource.RLIMIT_NOFILE, int(limits["open_files"]), int(limits["open_files"])),
        (resource.RLIMIT_CORE, 0, 0),
        (resource.RLIMIT_NPROC, processes, processes),
    ):
        resource.setrlimit(res, (soft, hard))
    if hasattr(resource, "RLIMIT_MSGQUEUE"):
        resource.setrlimit(resource.RLIMIT_MSGQUEUE, (0, 0))


def _count_own_processes() -> int:
    """How many processes (threads included) this process's user runs now, from /proc."""
    uid, count = os.getuid(), 0
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if entry.stat().st_uid == uid:
                    count += len(os.listdir(f"/proc/{entry.name}/task"))
    return count


class _Timeout(BaseException):
    """Raised by the per-test alarm (a BaseException, so `except Exception` does not swallow it)."""


# the per-test alarm: how often it went off in the current stage, and what to do when raising in the
# candidate's code does not end the stage (the exception swallowed, or raised in a fork handler)
_ALARM = {"fired": 0, "give_up": None}
_ALARM_PATIENCE = 4  # repeats (0.25 s apart) after the first, then the run ends as a timeout


def _on_alarm(signum, frame):
    _ALARM["fired"] += 1
    if _ALARM["fired"] > _ALARM_PATIENCE and _ALARM["give_up"] is not None:
        _ALARM["give_up"]()
    raise _Timeout


def _harness(job: dict, isolated: list) -> None:
    """Run the candidate's code, check the entry point, run each test in a copy of its namespace,
    and report each step on fd 3; then exit at once (no atexit handlers of the candidate)."""
    nonce, me, write, dumps, getpid, quit_ = job["nonce"], os.getpid(), os.write, json.dumps, os.getpid, os._exit
    seconds = float(job["limits"]["test_timeout"])

    def send(record: dict) -> None:
        if getpid() != me:  # a process the candidate forked, back in the harness: it reports nothing
            quit_(0)
        write(3, (nonce + dumps(record) + "\n").encode())

    def give_up() -> None:
        send({"abandoned": "timeout"})
        quit_(0)

    _ALARM["give_up"] = give_up
    signal.signal(signal.SIGALRM, _on_alarm)
    send({"setup": isolated})
    namespace = {"__name__": "solution", "__builtins__": builtins}
    try:
        error = _stage(lambda: exec(compile(job["code"], "solution.py", "exec"), namespace), seconds)
        entry = job["entry_point"]
        if error is None and entry and not callable(namespace.get(entry)):
            error = f"no function '{entry}'"
        send({"candidate": error})
        if error is None:
            for i, test in enumerate(job["tests"]):
                scope = dict(namespace)
                send({"test": i, "error": _stage(lambda t=test, s=scope: exec(compile(t, "test", "exec"), s), seconds)})
    except SystemExit:
        send({"exit": True})
    send({"done": True})
    quit_(0)


def _stage(fn, seconds: float) -> Optional[str]:
    """Run `fn` under an alarm of `seconds`, repeating every 0.25 s (a bare `except:` in the candidate
    swallows one); None if it returned, else why not. When raising does not end it within
    _ALARM_PATIENCE repeats, the run ends as a timeout. SystemExit passes through."""
    _ALARM["fired"] = 0
    try:
        try:
            signal.setitimer(signal.ITIMER_REAL, seconds, 0.25)
            fn()
            outcome = None
        except _Timeout:
            outcome = "timeout"
        except MemoryError:
            outcome = "memory"
        except SystemExit:
            raise
        except BaseException as e:
            outcome = _describe(e)
        finally:
            _disarm()
    except _Timeout:  # the alarm went off between the end of `fn` and the disarm
        _disarm()
        outcome = "timeout"
    return outcome


def _disarm() -> None:
    """Stop the alarm, even when it goes off while being stopped."""
    while True:
        try:
            signal.setitimer(signal.ITIMER_REAL, 0)
            return
        except _Timeout:
            continue


def _describe(e: BaseException) -> str:
    """An exception as a short reason: "syntax error: MSG (line N)", or "error: Type: message"."""
    try:
        if isinstance(e, SyntaxError):
            return f"syntax error: {e.msg} (line {e.lineno})"
        text = str(e)
    except BaseException:  # noqa: B036 - the candidate's __str__ may raise anything
        text = "<unprintable>"
    name = type(e).__name__ if isinstance(type(e).__name__, str) else "exception"
    return f"{name}: {text[:200]}" if text else name
