"""The plain-data wire format between checker and candidate, and the refusal to run without a hidden filesystem."""
from __future__ import annotations

import math
import os

import pytest

from rewards.jail import plain
from rewards.sandbox import Isolation, SandboxError, run_function_tests, run_stdio

VALUES = [None, True, False, 0, -1, 2 ** 300, -(2 ** 300), 1.5, -0.0, math.inf, 1 + 2j, "", "é\U0001F600", b"\x00\xff",
          [], [1, [2, [3]]], (), (1, "a"), {1, "x", (2, 3)}, {}, {"a": {1: [None]}, (1, 2): b""}, "\ud800"]


def _value_id(value) -> str:
    """A test id the same in every process: repr of a set follows string hashing, which differs per process (xdist's
    workers then collect different test names and the whole run errors)."""
    return repr(sorted(value, key=repr)) if isinstance(value, (set, frozenset)) else repr(value)


@pytest.mark.parametrize("value", VALUES, ids=_value_id)
def test_round_trip_keeps_value_and_exact_type(value):
    back = plain.decode(plain.encode(value))
    assert back == value and type(back) is type(value)
    if type(value) is float:
        assert math.copysign(1, back) == math.copysign(1, value)


def test_nan_round_trips():
    assert math.isnan(plain.decode(plain.encode(math.nan)))


class RiggedInt(int):
    def __eq__(self, other):
        return True

    __hash__ = int.__hash__


@pytest.mark.parametrize("value", [RiggedInt(1), [RiggedInt(1)], {"k": RiggedInt(1)}, frozenset(), object(),
                                   (i for i in range(2)), type("S", (str,), {})("x"), lambda: 0])
def test_anything_else_is_refused(value):
    with pytest.raises(plain.NonPlain):
        plain.encode(value)


def test_depth_and_size_caps():
    deep: list = []
    for _ in range(plain.MAX_DEPTH + 2):
        deep = [deep]
    with pytest.raises(plain.NonPlain):
        plain.encode(deep)
    looped: list = []
    looped.append(looped)
    with pytest.raises(plain.NonPlain):
        plain.encode(looped)


@pytest.mark.parametrize("data", [b"", b"Z", b"i\x00\x00\x00\x05\x01", b"l\xff\xff\xff\xff", b"NN",
                                  b"S\x00\x00\x00\x01l\x00\x00\x00\x00", b"s\x00\x00\x00\x01\xff",
                                  b"l\x00\x00\x00\x01" * 200 + b"N"])
def test_malformed_bytes_are_rejected(data):
    with pytest.raises(plain.Malformed):
        plain.decode(data)


def test_framing_round_trip_and_eof():
    r, w = os.pipe()
    plain.send(w, ("call", "f", (1, [2]), {"k": "v"}))
    os.close(w)
    assert plain.recv(r) == ("call", "f", (1, [2]), {"k": "v"})
    assert plain.recv(r) is None
    os.close(r)


def test_mode_none_is_refused_unless_opted_in():
    none = Isolation("none", (), drop_uid=False)
    for call in (lambda **kw: run_function_tests("x = 1", "", ["assert x == 1"], isolation=none, **kw),
                 lambda **kw: run_stdio("print(1)", "", isolation=none, **kw)):
        with pytest.raises(SandboxError, match="allow_host_filesystem=True"):
            call()
        assert call(allow_host_filesystem=True).tests == [("ok", "")]


def test_code_reward_refuses_mode_none_at_the_start(monkeypatch):
    import rewards.code_reward as code_reward

    monkeypatch.setattr(code_reward, "detect_isolation", lambda: Isolation("none", (), drop_uid=False))
    with pytest.raises(SandboxError, match="allow_host_filesystem=True"):
        code_reward.score_batch(["p"], ["```python\ndef f():\n    return 1\n```"], [{"tests": ["assert f() == 1"]}])
    ok = code_reward.score_batch(["p"], ["```python\ndef f():\n    return 1\n```"], [{"tests": ["assert f() == 1"]}],
                                 allow_host_filesystem=True)
    assert ok[0]["reason"] == "correct"


def test_candidate_recursion_and_module_state():
    """The program runs as one process per test: it may recurse, and state it keeps between calls persists within a
    test; every test starts from the state the program had after loading."""
    program = ("calls = []\ndef fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n"
               "def count():\n    calls.append(1)\n    return len(calls)\n")
    tests = ["assert fib(20) == 6765", "assert count() == 1 and count() == 2 and count() == 3", "assert count() == 1"]
    run = run_function_tests(program, "", tests)
    assert run.tests == [("ok", "")] * 3
