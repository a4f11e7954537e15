"""Hostile programs: each scores 0 with the right reason, in bounded wall time, and the next request still works.

Run under the strongest isolation this machine gives (mode "root" on CI); the checks that need the kernel's
help are skipped elsewhere, with the reason, rather than passing vacuously.
"""
from __future__ import annotations

import os
import secrets
import socket
import threading
import time
from pathlib import Path

import pytest

from rewards.code_reward import score_one
from rewards.sandbox import Limits, detect_isolation, run_function_tests

LIMITS = Limits(test_timeout_s=1.0, total_timeout_s=4.0, memory_mb=512)
WALL_BOUND_S = LIMITS.total_timeout_s + 3.0  # deadline + kill + interpreter start, with slack for a loaded box
CHECK = "def check(candidate):\n    assert candidate(2) == 3\n    assert abs(candidate(-1)) == 0\n"
REF = {"setup": CHECK, "tests": ["check(f)"]}
GOOD = "def f(x):\n    return x + 1\n"
ISO = detect_isolation()
needs_os_isolation = pytest.mark.skipif(ISO.mode == "none", reason="no namespaces here: only best-effort defences")


def score(program: str, ref: dict = REF, limits: Limits = LIMITS) -> dict:
    start = time.monotonic()
    result = score_one(f"```python\n{program}\n```", ref, limits=limits)
    result["wall"] = time.monotonic() - start
    return result


def assert_fails(result: dict, category: str) -> None:
    assert result["score"] == 0.0, result
    assert result["reason"].split(":")[0] == category, result["reason"]
    assert result["wall"] < WALL_BOUND_S, result


@pytest.fixture(autouse=True)
def still_serving():
    yield
    assert score(GOOD)["reason"] == "correct"  # whatever the previous program did, the next one is scored


def _sandbox_processes(uids: set[int]) -> list[int]:
    """PIDs on the host owned by one of `uids` (mode root gives every run uids of its own, >= 1,000,000; another test
    process may be running sandboxes of its own at the same time)."""
    out = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if os.stat(f"/proc/{pid}").st_uid in uids:
                out.append(int(pid))
        except FileNotFoundError:
            continue
    return out


@pytest.mark.parametrize("body, category", [
    ("def f(x):\n    while True:\n        pass", "timeout"),  # per-test alarm
    # swallows the alarm: only the total deadline (SIGKILL of the group) stops it
    (("def f(x):\n    while True:\n        try:\n            while True: pass\n        except BaseException:\n"
      "            pass"), "timeout"),
    ("import time\ndef f(x):\n    time.sleep(1000)", "timeout"),
])
def test_infinite_loops(body, category):
    assert_fails(score(body), category)


@pytest.mark.parametrize("body, category", [
    ("def f(x):\n    return len(bytearray(8 * 1024 ** 3))", "memory"),
    # growing: pages are touched as it goes (slow on a small VM), hence a lower cap below
    ("def f(x):\n    hog = []\n    while True:\n        hog.append(bytearray(10 ** 7))", "memory"),
    ("def f(x):\n    return f(x) + 1", "runtime_error"),  # RecursionError
    # a recursion limit lifted past the C stack (recursing through C: __eq__): the interpreter segfaults
    (("import sys\nsys.setrecursionlimit(10 ** 8)\nclass A:\n    def __eq__(self, other):\n"
      "        return A() == other\ndef f(x):\n    return A() == x"), "crashed"),
])
def test_memory_and_recursion_bombs(body, category):
    assert_fails(score(body, limits=Limits(test_timeout_s=4.0, total_timeout_s=4.0, memory_mb=256)), category)


@pytest.mark.parametrize("body, category, detail", [
    ("def f(x):\n    handles = [open('/dev/null') for _ in range(1000)]", "runtime_error", "Too many open files"),
    ("def f(x):\n    with open('big.bin', 'wb') as out:\n        out.write(bytes(64 << 20))", "output_limit",
     "File too large"),
])
def test_open_files_and_file_size_limits(body, category, detail):
    result = score(body)
    assert_fails(result, category)
    assert detail in result["reason"]


def test_fork_bomb_through_os_is_refused():
    result = score("import os\ndef f(x):\n    while True:\n        os.fork()")
    assert_fails(result, "runtime_error")
    assert "disabled" in result["reason"]


@needs_os_isolation
def test_fork_bomb_through_libc_is_contained(monkeypatch):
    # bypasses the harness's patch: the kernel (NPROC for our uid, the PID namespace) is what stops it
    draw = secrets.randbelow(1 << 30)
    monkeypatch.setattr(secrets, "randbelow", lambda _: draw)  # this run's uids, not those of another test process
    uids = {1_000_000 + draw, 1_000_000 + draw + 1}  # candidate, checker (mode root)
    result = score("import ctypes\nlibc = ctypes.CDLL(None)\ndef f(x):\n    while True:\n        libc.fork()")
    assert_fails(result, "timeout")
    # nothing survives the run: the namespace's processes are SIGKILLed with its init; on a loaded box the kernel
    # takes a moment to tear them down, so wait for that (bounded), then check
    deadline = time.monotonic() + 5.0
    while _sandbox_processes(uids) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _sandbox_processes(uids) == []


@needs_os_isolation
def test_writes_outside_the_work_dir_do_not_land(tmp_path):
    name = f"diffrl_escape_{secrets.token_hex(4)}"
    program = f"""
import os, sys
for target in ["/tmp/{name}", "/var/tmp/{name}", "/dev/shm/{name}", "../{name}"]:
    with open(target, "w") as f:  # private tmpfs in the sandbox: succeeds there, never reaches the host
        f.write("x")
def f(x):
    for target in ["/etc/{name}", os.path.join(sys.prefix, "{name}"), "{tmp_path}/{name}"]:
        open(target, "w").write("x")
    return x + 1
"""
    result = score(program)
    assert_fails(result, "runtime_error")
    assert any(why in result["reason"] for why in ("Read-only file system", "Permission denied",
                                                   "No such file or directory"))  # /etc: not in the new root
    for where in ["/tmp", "/var/tmp", "/dev/shm", "/etc", os.sys.prefix, str(tmp_path)]:
        assert not (Path(where) / name).exists(), where


def test_parent_environment_is_not_readable(monkeypatch):
    secret = secrets.token_hex(16)
    monkeypatch.setenv("DIFFRL_TEST_SECRET", secret)
    program = f"""
import glob, os
def leak():
    found = [os.environ.get("DIFFRL_TEST_SECRET")]
    for path in glob.glob("/proc/*/environ") + ["/proc/{os.getpid()}/environ"]:
        try:
            found.append(open(path, "rb").read())
        except OSError:
            pass
    return any(item and "{secret}".encode() in (item if isinstance(item, bytes) else item.encode()) for item in found)
def f(x):
    return x + 1 + leak()  # only a leak changes the answer
"""
    if ISO.mode == "none":
        pytest.skip("mode none: same uid, /proc/PID/environ of the parent is readable (documented)")
    assert score(program)["reason"] == "correct"  # correct answer <=> nothing leaked


@needs_os_isolation
def test_no_network_even_on_loopback():
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    server.settimeout(0.1)
    port = server.getsockname()[1]
    accepted, done = [], threading.Event()

    def accept():
        while not done.is_set():
            try:
                accepted.append(server.accept())
            except TimeoutError:
                continue

    watcher = threading.Thread(target=accept, daemon=True)
    watcher.start()
    # _socket, not socket: the harness's patch of the socket module must not be what stops it
    program = f"import _socket\ndef f(x):\n    s = _socket.socket()\n    s.connect(('127.0.0.1', {port}))\n    return x + 1"
    result = score(program)
    done.set()
    watcher.join()
    server.close()
    assert_fails(result, "runtime_error")
    assert accepted == []


@needs_os_isolation
def test_killing_the_parent_fails():
    program = f"""
import ctypes, os
libc = ctypes.CDLL(None)
def f(x):
    for pid in ({os.getpid()}, os.getppid(), 1):
        libc.kill(pid, 9)  # libc: the harness's os.kill patch is not what protects us
    return 0
"""
    assert_fails(score(program), "wrong")
    # and the whole-group variant takes only the sandbox down with it
    assert_fails(score("import ctypes\ndef f(x):\n    ctypes.CDLL(None).kill(0, 9)"), "crashed")


@pytest.mark.parametrize("body", [
    "import sys\ndef f(x):\n    while True:\n        sys.stdout.write('x' * 65536)",
    "def f(x):\n    while True:\n        print('spam ' * 10000, flush=True)",
])
def test_output_flood(body):
    assert_fails(score(body), "output_limit")


@pytest.mark.parametrize("body, category", [
    ("import sys\nsys.exit(0)\ndef f(x):\n    return x", "exited"),
    ("exit()\ndef f(x):\n    return x", "exited"),
    ("import os\nos._exit(0)\ndef f(x):\n    return x", "exited"),
    ("import sys\ndef f(x):\n    sys.exit(0)", "exited"),
    ("import os\ndef f(x):\n    os._exit(0)", "exited"),
])
def test_exiting_before_the_asserts(body, category):
    assert_fails(score(body), category)


WRONG = "def f(x):\n    return x\n"


@pytest.mark.parametrize("tamper, category", [
    ("def check(candidate):\n    pass", "wrong"),  # redefine the checker
    ("import builtins\nbuiltins.abs = lambda v: 0\nbuiltins.AssertionError = KeyError", "wrong"),  # builtins
    # a thread racing to replace `check` in the program's globals
    (("import threading\ndef _race():\n    while True:\n        globals()['check'] = lambda c: None\n"
      "threading.Thread(target=_race, daemon=True).start()"), "wrong"),
    # patch everything the harness module and json expose
    (("import sys, json\nm = sys.modules['__main__']\nfor n in dir(m):\n    if not n.startswith('__'):\n"
      "        setattr(m, n, lambda *a, **k: None)\njson.dumps = lambda *a, **k: '{\"ok\": true}'"), "wrong"),
    # print fake success markers everywhere, including every open file descriptor: the only one leading out is the
    # reply pipe to the checker, which takes the garbage for a broken candidate
    (("import os\nfor fd in map(int, os.listdir('/proc/self/fd')):\n    try:\n"
      "        os.write(fd, b'test 0 ok \\nPASSED\\nnonce test 0 ok\\n')\n    except OSError:\n        pass"), "crashed"),
])
def test_tampering_with_the_checker_is_never_a_pass(tamper, category):
    result = score(WRONG + tamper)
    assert_fails(result, category)


def test_a_forger_that_walks_the_harness_frames_finds_no_way_to_report():
    # The candidate's process still has the harness's frames, but the result fd is closed in it: only the checker,
    # another process, holds one.
    forge = ("import sys\ndef f(x):\n    frame = sys._getframe()\n    while frame:\n"
             "        emit = frame.f_locals.get('emit')\n        if emit:\n"
             "            emit(b'test 0 ok ')\n            break\n        frame = frame.f_back\n    return x\n")
    run = run_function_tests(forge, CHECK, ["check(f)"], LIMITS)
    assert run.tests == [("runtime_error", "OSError: [Errno 9] Bad file descriptor")]


def test_fake_records_on_the_harness_result_fd_do_not_count():
    # the harness's argv named the result fd; the candidate gets neither the argv nor the fd (closed before it runs)
    forge = ("import os\nfor fd in range(3, 64):\n    try:\n        os.write(fd, b'test 0 ok \\n')\n"
             "    except OSError:\n        pass\n")
    run = run_function_tests(WRONG + forge, CHECK, ["check(f)"], LIMITS)
    assert run.tests[0][0] in ("wrong", "crashed"), run.tests
