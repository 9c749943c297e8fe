"""The sandboxed test runner: scores, reasons, code extraction, and hostile or broken programs —
each must score 0 with a reason, in bounded time, leaving no process and no file behind."""

from __future__ import annotations

import contextlib
import os
import stat
import sys
import tempfile
import time
from pathlib import Path

import pytest

from prefopt.errors import PrefoptError
from prefopt.evaluation import sandbox
from prefopt.evaluation.sandbox import extract_code, run_tests, score_many

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the sandbox is for Linux")

ROOT = os.geteuid() == 0
ADD = "def add(a, b):\n    return a + b\n"
ADD_TESTS = ["assert add(1, 2) == 3", "assert add(-1, 1) == 0", "assert add(2, 2) == 4"]
# small limits keep the hostile cases quick; every bound below allows for a busy 2-core machine
FAST = dict(timeout=4.0, test_timeout=0.5)
SLACK = 3.0


@pytest.fixture(autouse=True)
def nothing_left_behind(monkeypatch):
    """After every run of a test: no process of its sandbox user (before the sweep that frees the user
    id for the next run: the namespace or the process-group kill must have ended them all) and no
    working folder. Only this test's runs are watched (another test file may run sandboxes meanwhile)."""
    folders, leftovers = [], []
    real_user, real_mkdtemp = sandbox._sandbox_user, tempfile.mkdtemp

    @contextlib.contextmanager
    def watched_user():
        with real_user() as uid:
            yield uid
            if uid is not None:
                end = time.monotonic() + 2.0  # killed processes of a dead namespace take a moment to go
                while sandbox.processes_of(uid) and time.monotonic() < end:
                    time.sleep(0.01)
                leftovers.extend(sandbox.processes_of(uid))

    def watched_mkdtemp(*args, **kwargs):
        folders.append(real_mkdtemp(*args, **kwargs))
        return folders[-1]

    monkeypatch.setattr(sandbox, "_sandbox_user", watched_user)
    monkeypatch.setattr(sandbox.tempfile, "mkdtemp", watched_mkdtemp)
    yield
    assert leftovers == []
    assert [f for f in folders if Path(f).exists()] == []


def hostile(code: str, tests=("assert True",), **limits):
    """Run `code`, check it scores 0 within the wall-clock bound, return the result and the time."""
    lim = {**FAST, **limits}
    t0 = time.monotonic()
    result = run_tests(code, list(tests), **lim)
    seconds = time.monotonic() - t0
    assert result.score == 0.0 and result.passed == 0 and result.binary == 0.0, result
    assert result.reason, result
    assert seconds < lim["timeout"] + SLACK, (seconds, result)
    return result, seconds


# ----------------------------------------------------------------------------------------------
# Scores and reasons


def test_each_test_counts_and_binary_needs_all():
    r = run_tests(ADD, ADD_TESTS + ["assert add(2, 2) == 5"], entry_point="add")
    assert (r.passed, r.total, r.score, r.binary) == (3, 4, 0.75, 0.0)
    assert r.reason == "test 4: AssertionError" and r.tests == (None, None, None, "AssertionError")
    ok = run_tests(ADD, ADD_TESTS, entry_point="add")
    assert (ok.score, ok.binary, ok.reason) == (1.0, 1.0, None)
    assert ok.seconds > 0


def test_a_string_of_tests_is_split_into_statements():
    tests = "assert add(1, 1) == 2\nfor i in range(3):\n    assert add(i, 0) == i\nassert add(0, 0) == 1\n"
    assert len(sandbox.split_tests(tests)) == 3
    r = run_tests(ADD, tests)
    assert (r.passed, r.total) == (2, 3)


def test_failures_of_the_candidate_as_a_whole():
    assert run_tests("def add(a, b) return a", ADD_TESTS).reason.startswith("syntax error: ")
    assert run_tests("x = 1", ADD_TESTS, entry_point="add").reason == "no function 'add'"
    assert run_tests("add = 3", ADD_TESTS, entry_point="add").reason == "no function 'add'"
    r = run_tests("raise ValueError('boom')\n" + ADD, ADD_TESTS)
    assert r.reason == "error: ValueError: boom" and r.passed == 0
    r = run_tests("def add(a, b):\n    return undefined_name\n", ADD_TESTS)
    assert r.passed == 0 and r.reason == "test 1: NameError: name 'undefined_name' is not defined"


def test_tests_run_in_separate_copies_of_the_namespace():
    code = "seen = []\ndef f(x):\n    seen.append(x)\n    return len(seen)\n"
    # the candidate's own state is shared (its functions see one module), test variables are not
    r = run_tests(code, ["y = 1\nassert f(0) == 1", "assert 'y' not in globals()", "assert f(0) == 2"])
    assert r.score == 1.0, r


def test_standard_modules_are_importable_and_main_blocks_do_not_run():
    code = "import math, collections, itertools, functools, re, string, heapq\nfrom typing import List\n"
    code += "def f(xs: List[int]) -> int:\n    return math.prod(xs)\n"
    code += "if __name__ == '__main__':\n    print(f(input()))\n"
    assert run_tests(code, ["assert f([2, 3]) == 6"], entry_point="f").score == 1.0


def test_bad_arguments_are_clear_errors():
    with pytest.raises(PrefoptError, match="non-empty list of test sources"):
        run_tests(ADD, [])
    with pytest.raises(PrefoptError, match="not valid Python"):
        run_tests(ADD, "assert (")
    with pytest.raises(PrefoptError, match="entry_point must be a Python name"):
        run_tests(ADD, ADD_TESTS, entry_point="add me")
    with pytest.raises(PrefoptError, match="timeout: must be a number"):
        run_tests(ADD, ADD_TESTS, timeout=0)


# ----------------------------------------------------------------------------------------------
# Extraction of code from a chat answer


@pytest.mark.parametrize(
    "answer, code",
    [
        ("Here:\n```python\ndef f():\n    return 1\n```\nDone.", "def f():\n    return 1\n"),
        ("```\nx = 0\n```\n```py\ny = 1\n```", "y = 1\n"),  # a python block wins over an earlier plain one
        ("```Python3\nz = 2\n```", "z = 2\n"),
        ("```text\nnot code\n```\n```js\nlet a\n```", "not code\n"),  # else the first block of any label
        ("Sure!\n```python\ndef f():\n    return 1", "def f():\n    return 1"),  # unclosed: to the end
        ("1. the code:\n   ```python\n   def g():\n       pass\n   ```", "def g():\n    pass\n"),  # dedented
        ("def h(x):\n    return x\n", "def h(x):\n    return x\n"),  # bare code
        ("Here it is:\ndef h(x):\n    return x\nIt returns x.", "def h(x):\n    return x\n"),  # code in prose
        (
            "import math\ndef r(x):\n    return math.sqrt(x)\n\nThat is all.\n",
            "import math\ndef r(x):\n    return math.sqrt(x)\n\n",
        ),
        ("The answer is 42.", "The answer is 42."),  # none of these: unchanged, fails as a syntax error
        ("Use def f(: here", "Use def f(: here"),
    ],
)
def test_extract_code_rules(answer, code):
    assert extract_code(answer) == code


def test_extracted_prose_fails_with_a_syntax_error():
    r = run_tests(extract_code("I would write a function that adds them."), ADD_TESTS)
    assert r.score == 0 and r.reason.startswith("syntax error")


# ----------------------------------------------------------------------------------------------
# Hostile and broken programs: score 0, a reason, bounded time, nothing left behind


def test_infinite_loop_at_top_level():
    r, s = hostile("while True:\n    pass\n")
    assert r.reason == "timeout"


def test_infinite_loop_in_one_test_fails_that_test_only():
    code = "def f(x):\n    while x < 0:\n        pass\n    return x\n"
    t0 = time.monotonic()
    r = run_tests(code, ["assert f(1) == 1", "assert f(-1) == -1", "assert f(2) == 2"], **FAST)
    assert (r.passed, r.total, r.reason) == (2, 3, "test 2: timeout")
    assert time.monotonic() - t0 < FAST["test_timeout"] + SLACK


def test_code_that_never_returns():
    assert hostile("import time\ntime.sleep(1e9)\n")[0].reason == "timeout"
    assert hostile("import os\nr, w = os.pipe()\nos.read(r, 1)\n")[0].reason == "timeout"  # a blocked read
    assert hostile("x = input()\n")[0].reason == "error: EOFError: EOF when reading a line"  # stdin is empty


def test_alarm_ignored_and_exceptions_swallowed_still_end_by_the_wall_clock():
    code = "import signal\nsignal.signal(signal.SIGALRM, signal.SIG_IGN)\nwhile True:\n    pass\n"
    assert hostile(code, timeout=2.0)[0].reason == "timeout"
    code = "while True:\n    try:\n        while True:\n            pass\n    except BaseException:\n        pass\n"
    assert hostile(code, timeout=2.0)[0].reason == "timeout"


def test_fork_bomb():
    r, s = hostile("import os\nwhile True:\n    os.fork()\n")
    assert "Resource temporarily unavailable" in r.reason or r.reason == "timeout"
    # one that survives its failed forks keeps forking until the alarm
    r, s = hostile("import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n")


def test_escaped_processes_are_killed():
    code = "import os, time\nif os.fork() == 0:\n    os.setsid()\n    time.sleep(1000)\n    os._exit(0)\n" + ADD
    r = run_tests(code, ADD_TESTS, **FAST)
    assert r.score == 1.0  # the candidate passed; the sleeper it left must be gone (fixture)


def test_huge_allocation():
    assert hostile("x = bytearray(10 * 2**30)\n")[0].reason == "memory"
    assert hostile("x = [0] * (10 * 2**30 // 8)\n")[0].reason == "memory"
    r = run_tests("def f():\n    return len(bytearray(10 * 2**30))\n", ["assert f() > 0", "assert 1 == 1"], **FAST)
    assert (r.passed, r.reason) == (1, "test 1: memory")


def test_sys_exit_and_os_exit():
    assert hostile("import sys\nsys.exit(0)\n")[0].reason == "exit"
    assert hostile("import os\nos._exit(0)\n")[0].reason == "exit (status 0)"
    # exiting from inside a test, after passing the others, still scores 0
    r, _ = hostile(ADD + "import sys\n", ADD_TESTS + ["sys.exit(0)"])
    assert r.reason == "exit"


def test_output_flood():
    r, s = hostile("while True:\n    print('x' * 10000)\n")
    assert r.reason == "output limit" and len(r.output) <= 2000


def test_crash_is_a_signal():
    assert hostile("import ctypes\nctypes.string_at(0)\n")[0].reason == "killed by signal 11"


def test_deep_recursion_is_bounded():
    hostile("import sys\nsys.setrecursionlimit(10**7)\ndef f(n):\n    return f(n + 1)\nf(0)\n", timeout=3.0)


def test_big_file_is_refused():
    r, _ = hostile("open('big', 'wb').write(b'x' * 50_000_000)\n")
    assert "File too large" in r.reason


@pytest.mark.skipif(not ROOT, reason="the canary must belong to root and the sandbox run as another user")
def test_files_outside_the_working_directory_survive():
    folder = Path(tempfile.mkdtemp(prefix="prefopt-canary-"))
    try:
        folder.chmod(0o777)  # even in a folder anyone may write to
        canary = folder / "canary"
        canary.write_text("keep")
        canary.chmod(0o666)
        for code in (
            f"import os\nos.remove({str(canary)!r})\n",
            f"open({str(canary)!r}, 'w').write('gone')\n",
            f"import shutil\nshutil.rmtree({str(folder)!r})\n",
            f"import os\nos.chmod({str(canary)!r}, 0)\n",
        ):
            hostile(code)
            assert canary.read_text() == "keep" and stat.S_IMODE(canary.stat().st_mode) == 0o666
    finally:
        for p in folder.iterdir():
            p.unlink()
        folder.rmdir()


@pytest.mark.skipif(not ROOT, reason="the sandbox drops privileges only when started by root")
def test_isolation_in_effect_as_root():
    names = sandbox.isolation()
    assert "user" in names
    code = "import os\nassert os.getuid() != 0 and os.geteuid() != 0 and os.getgroups() == []\n"
    assert run_tests(code, ["pass"]).score == 1.0
    if "network" in names:  # no network: a namespace of its own, with only a loopback interface
        code = "lines = open('/proc/self/net/dev').read().splitlines()[2:]\n"
        code += "assert [line.split(':')[0].strip() for line in lines] == ['lo']\n"
        assert run_tests(code, ["pass"]).score == 1.0
    if "filesystem" in names:  # what it writes anywhere it may write is gone afterwards
        code = (
            "open('/tmp/prefopt-left-behind', 'w').write('x')\nopen('/dev/shm/prefopt-left-behind', 'w').write('x')\n"
        )
        assert run_tests(code, ["pass"]).score == 1.0
        assert not Path("/tmp/prefopt-left-behind").exists() and not Path("/dev/shm/prefopt-left-behind").exists()
        hostile("open('/var/tmp/prefopt-left-behind', 'w').write('x')\n")  # read-only
        assert not Path("/var/tmp/prefopt-left-behind").exists()
    if "pid" in names:
        code = "import os\nos.kill(1, 9)\n"  # init of its namespace, not the machine's: refused
        assert "Operation not permitted" in hostile(code)[0].reason


def test_reports_cannot_be_forged_by_printing_or_by_forked_children():
    fake = '{"test": 0, "error": null}\n{"done": true}\n'
    code = f"import os\nprint({fake!r})\nos.write(3, {fake.encode()!r})\nos._exit(0)\n"
    assert hostile(code)[0].reason == "exit (status 0)"
    # a forked child returns into the harness: it must not report the tests a second time
    r = run_tests("import os\nos.fork()\n" + ADD, ADD_TESTS, **FAST)
    assert (r.passed, r.total) == (3, 3)


# ----------------------------------------------------------------------------------------------
# Many runs in parallel


def test_score_many_keeps_order_and_bounds_hostile_runs():
    items = [(ADD, ADD_TESTS), ("while True:\n    pass\n", ADD_TESTS), (ADD, ADD_TESTS[:1], "add")] * 3
    items += [("import os\nwhile True:\n    os.fork()\n", ["pass"]), ("x = bytearray(10 * 2**30)", ["pass"])]
    t0 = time.monotonic()
    results = score_many(items, workers=2, **FAST)
    assert [r.score for r in results] == [1.0, 0.0, 1.0] * 3 + [0.0, 0.0]
    assert time.monotonic() - t0 < 3 * FAST["timeout"]  # three looping runs, two at a time, ~0.5 s each
    with pytest.raises(PrefoptError, match="item 0 must be"):
        score_many([ADD])


def test_plain_path_without_privileges(monkeypatch):
    """The path taken when not started by root (rlimits, timeouts, process group; no namespaces),
    exercised with harmless programs only."""
    monkeypatch.setattr(sandbox, "_PRIVILEGED", False)
    r = run_tests(ADD, ADD_TESTS + ["assert add(1, 1) == 3"], **FAST)
    assert (r.passed, r.total, r.isolation) == (3, 4, ())
    assert run_tests("import time\ntime.sleep(100)\n", ["pass"], **FAST).reason == "timeout"
    assert run_tests("x = bytearray(2 * 2**30)\n", ["pass"], **FAST).reason == "memory"


def test_malformed_reports_score_zero_and_never_crash_the_caller():
    """Records come from the sandboxed program, which can learn the nonce: a line nested too deep
    for json, or a record of the wrong shape, is dropped or read as a tampered report (score 0),
    never an exception in the caller."""
    nonce = "n" * 32
    assert sandbox._records((nonce + "[" * 200_000 + "\n").encode(), nonce) == []
    setup = {"setup": ["user"]}
    for forged in (
        [setup, {"worker": {"signal": [1]}}],  # an unhashable signal
        [setup, {"candidate": None}, {"test": 0, "error": None}, {"test": [0]}, {"done": True}],
    ):
        result = sandbox._result({"records": forged, "output": b"", "stop": None}, 1, 0.1)
        assert (result.passed, result.score, result.reason) == (0, 0.0, "report tampered"), forged
