"""The candidate server (untrusted side): exec the program once, then per test fork a child that answers calls.

Protocol on (req_fd, rep_fd), every message plain data (plain.py):
    server -> checker   ("loaded", status, detail, exports)        exports: {name: ["call"] | ["module", name] |
                                                                              ["value", plain value]}
    checker -> server   ("begin",)                                 the server forks the test's child
    checker -> child    ("call", name, args, kwargs) -> ("return", value) | ("raise", type name, text)
                                                                  | ("nonplain", why)
    checker -> child    ("end",) -> ("ended",)                     the child exits
    server -> checker   ("exit", "code" | "signal" | "wall", n)    once per test, when its child is gone

Per-test limits: the child's CPU clock starts at zero at the fork and RLIMIT_CPU is set with soft == hard, so the
kernel SIGKILLs it at the limit whatever signals it blocks or ignores; the server SIGKILLs it at the wall limit.
Module state made while loading is shared by every test (copy-on-write); state made during a test stays in it.
Everything here runs after the program could have tampered with this process (trace hooks can even rewrite this
function's locals): the verdict does not depend on it (the checker decodes fresh plain values), only the limits do,
and those hold anyway: the harness set this process's hard RLIMIT_CPU to ceil(test limit + 1) before the program
ran, and without privileges no process here can raise it, so a subverted server or any process it forks gets at
most that much CPU each; the checker's alarm and the parent's backstop bound the wall time (the parent restarts
the sandbox for the next test).
"""
import builtins
import os
import resource
import select
import signal
import sys
import types

from rewards.jail import plain

_MAX_EXPORTED_VALUE = 1 << 20


def describe(exc):
    try:
        text = f"{type(exc).__name__}: {exc}"
    except BaseException:  # a candidate's __str__ may raise anything; the status is already decided
        text = f"{type(exc).__name__}: (unprintable)"
    return " ".join(text.split())[:300]


def run_guarded(code, namespace):
    """(status, detail) of exec'ing `code` (the program) in `namespace`."""
    try:
        exec(compile(code, "<program>", "exec"), namespace)
    except SyntaxError as exc:
        return "syntax_error", describe(exc)
    except SystemExit as exc:
        return "exited", describe(exc)
    except MemoryError:
        return "memory", "MemoryError"
    except OSError as exc:  # EFBIG: a write past RLIMIT_FSIZE
        return ("output_limit" if exc.errno == 27 else "runtime_error"), describe(exc)
    except BaseException as exc:
        return "runtime_error", describe(exc)
    return "ok", ""


def _exports(namespace):
    out = {}
    for name, value in list(namespace.items()):
        if type(name) is not str or name.startswith("__"):
            continue
        if type(value) is types.ModuleType:
            out[name] = ["module", value.__name__]
        elif callable(value):
            out[name] = ["call"]
        else:
            try:
                if len(plain.encode(value)) > _MAX_EXPORTED_VALUE:
                    continue  # too big to copy to the checker: absent there, like a non-plain one
            except plain.NonPlain:
                continue  # not usable by the tests; a test that names it fails with NameError
            out[name] = ["value", value]
    return out


def serve(program, req_fd, rep_fd, test_cpu_s, test_wall_s, _fork=os.fork, _kill=os.kill, _signal=signal.signal):
    """Never returns. The server's own limits (load CPU time, memory, files) are set by the harness. fork and kill
    are bound at import, before the harness disables them for the program."""
    send, recv, fork, exit_, kill = plain.send, plain.recv, _fork, os._exit, _kill
    waitpid, pidfd_open, select_, setrlimit, close = os.waitpid, os.pidfd_open, select.select, resource.setrlimit, os.close
    namespace = {"__name__": "__candidate__", "__builtins__": builtins}
    status, detail = run_guarded(program, namespace)
    _flush()
    exports = _exports(namespace) if status == "ok" else {}
    send(rep_fd, ("loaded", status, detail, exports))
    if status != "ok":
        exit_(0)
    while True:
        message = recv(req_fd)
        if message is None or message != ("begin",):
            exit_(0)
        _signal(signal.SIGCHLD, signal.SIG_DFL)  # a program that ignores SIGCHLD would have the child auto-reaped
        child = fork()
        if child == 0:
            setrlimit(resource.RLIMIT_CPU, (test_cpu_s, test_cpu_s))
            _answer(namespace, req_fd, rep_fd)
        pidfd = pidfd_open(child)
        killed = not select_([pidfd], [], [], test_wall_s)[0]
        if killed:
            kill(child, signal.SIGKILL)
        _, wait_status = waitpid(child, 0)
        close(pidfd)
        if killed:
            send(rep_fd, ("exit", "wall", test_wall_s))
        elif os.WIFSIGNALED(wait_status):
            send(rep_fd, ("exit", "signal", os.WTERMSIG(wait_status)))
        else:
            send(rep_fd, ("exit", "code", os.waitstatus_to_exitcode(wait_status)))


def _answer(namespace, req_fd, rep_fd):
    send, recv, exit_ = plain.send, plain.recv, os._exit
    while True:
        message = recv(req_fd)
        if message is None or message[0] != "call":
            _flush()
            if message == ("end",):
                send(rep_fd, ("ended",))
            exit_(0)
        _, name, args, kwargs = message
        try:
            result = namespace[name](*args, **kwargs)
        except OSError as exc:
            reply = ("fail", "output_limit", describe(exc)) if exc.errno == 27 else \
                ("raise", type(exc).__name__, describe(exc))
        except BaseException as exc:
            reply = ("raise", type(exc).__name__, describe(exc))
        else:
            try:
                send(rep_fd, ("return", result))
                continue
            except plain.NonPlain as exc:
                reply = ("nonplain", f"returned {exc}")
        send(rep_fd, reply)


def _flush():
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except BaseException:  # the program may have closed or replaced its streams; its output is its own
            continue
