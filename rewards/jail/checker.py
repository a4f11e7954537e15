"""The checker (trusted side of a function test): runs the setup and each test; the program's names are proxies.

It never runs program code. The program's top-level functions become proxies that send their arguments to the
candidate server as plain data and return the decoded plain reply, so every value a test compares was built here
from bytes (no subclass with a rigged __eq__, no hook, no patched builtin of the program's can reach this process).
Outcomes go to the result fd (`begin I`, `test I STATUS DETAIL`), which only this process holds.

Statuses besides those of the old in-process harness: non_plain_value (the program returned something that is not
plain data), unsupported_test (the TEST passed a non-plain argument, e.g. a lambda or an instance: a shape the
plain-data rule cannot express), crashed/exited/timeout when the candidate's test process died.
"""
import ast
import builtins
import importlib
import signal
import sys
import time

from rewards.jail import plain
from rewards.jail.candidate import describe

_LOAD_FAILURES = ("syntax_error", "exited", "memory", "output_limit", "runtime_error")  # candidate.run_guarded's
_SIGNAL_STATUS = {int(signal.SIGKILL): ("timeout", "CPU time limit (SIGKILL)"),
                  int(signal.SIGXCPU): ("timeout", "CPU time limit (SIGXCPU)"),
                  int(signal.SIGXFSZ): ("output_limit", "file size limit (SIGXFSZ)")}


class CandidateFailed(BaseException):
    """The candidate's side of a call failed in a way the test must not catch (BaseException: `except Exception`
    in test code does not swallow it; the session remembers it anyway)."""

    def __init__(self, status, detail):
        super().__init__(detail)
        self.status, self.detail = status, detail


class TestTimedOut(BaseException):
    pass


class CandidateError(Exception):
    """A candidate exception whose class is not a built-in one (raised into the test as this)."""


def _exit_outcome(kind, value):
    if kind == "wall":
        return "timeout", f"exceeded {value:g}s wall time"
    if kind == "signal":
        return _SIGNAL_STATUS.get(value, ("crashed", f"killed by {signal.Signals(value).name}"
                                          if value in signal.Signals._value2member_map_ else f"signal {value}"))
    return "exited", f"process ended (exit code {value}) before replying"


class Session:
    """One test's conversation with the candidate's test process."""

    def __init__(self, req_fd, rep_fd):
        self.req_fd, self.rep_fd = req_fd, rep_fd
        self.failure = None  # (status, detail): decides the test whatever the test code caught
        self.gone = False  # the test process has exited (its exit message was read)

    def fail(self, status, detail):
        if self.failure is None:
            self.failure = (status, detail)
        raise CandidateFailed(*self.failure)

    def read(self):
        try:
            message = plain.recv(self.rep_fd)
        except plain.Malformed as exc:
            self.gone = True
            self.fail("crashed", f"malformed reply: {exc}")
        if message is None:
            self.gone = True
            self.fail("crashed", "candidate process ended")
        if type(message) is tuple and message and message[0] == "exit" and len(message) == 3:
            self.gone = True
            self.fail(*_exit_outcome(message[1], message[2]))
        return message

    def call(self, name, args, kwargs):
        if self.gone or self.failure:
            self.fail(*(self.failure or ("crashed", "candidate process ended")))
        try:
            plain.send(self.req_fd, ("call", name, args, kwargs))
        except plain.NonPlain as exc:
            self.fail("unsupported_test", f"the test passes {exc} to {name}")
        except BrokenPipeError:
            self.read()  # the exit message says why
        reply = self.read()
        if type(reply) is not tuple or not reply:
            self.fail("crashed", "malformed reply")
        if reply[0] == "return" and len(reply) == 2:
            return reply[1]
        if reply[0] == "raise" and len(reply) == 3 and type(reply[1]) is str and type(reply[2]) is str:
            name, text = reply[1], reply[2]
            if name == "SystemExit":
                self.fail("exited", text)
            if name in ("StopIteration", "StopAsyncIteration"):
                # PEP 479's rule for calls: raised into the test it would end the test's own iteration silently
                # (`all(map(candidate, xs))` would be all([]) == True), so it arrives as the RuntimeError it is
                raise RuntimeError(f"the program raised {text}")
            cls = getattr(builtins, name, None)
            if isinstance(cls, type) and issubclass(cls, Exception):
                raise cls(text.split(": ", 1)[-1])
            raise CandidateError(text)
        if reply[0] == "fail" and len(reply) == 3 and reply[1] == "output_limit":  # EFBIG: over RLIMIT_FSIZE
            self.fail("output_limit", str(reply[2]))
        if reply[0] == "nonplain" and len(reply) == 2:
            self.fail("non_plain_value", str(reply[1]))
        self.fail("crashed", "malformed reply")

    def finish(self, deadline):
        """Close the test: ask the child to end, then wait for the server's exit message (the server is ready for
        the next test after it). False when the candidate side did not answer in time."""
        try:
            if not self.gone:
                plain.send(self.req_fd, ("end",))
            while not self.gone:
                message = plain.recv(self.rep_fd, deadline)
                if message is None or (type(message) is tuple and message and message[0] == "exit"):
                    self.gone = True
        except (TimeoutError, plain.Malformed, OSError):
            return False
        return True


def _proxy(holder, name):
    def call(*args, **kwargs):
        return holder[0].call(name, args, kwargs)

    call.__name__ = call.__qualname__ = name
    return call


def _status(exc):
    if isinstance(exc, CandidateFailed):
        return exc.status, exc.detail
    if isinstance(exc, TestTimedOut):
        return "timeout", "test exceeded its wall time"
    if isinstance(exc, AssertionError):
        return "wrong", describe(exc)
    if isinstance(exc, SyntaxError):
        return "syntax_error", describe(exc)
    if isinstance(exc, MemoryError):
        return "memory", "MemoryError"
    if isinstance(exc, SystemExit):
        return "exited", describe(exc)
    if isinstance(exc, CandidateError):
        return "runtime_error", str(exc)
    return "runtime_error", describe(exc)


_IMPORT_NEVER = {"antigravity", "this", "__hello__", "__phello__", "idlelib", "tkinter", "turtle", "turtledemo"}


def _import_exports(namespace, exports, holder):
    """The program's top-level names, as the tests may use them. A name that would shadow a builtin is left out
    (the tests' `len`, `abs`, `sorted` stay the real ones); modules are imported here by name, standard library
    only and never a `__main__` (a module is code: the program's own copy never crosses; importing a `__main__` runs a
    command-line tool in the checker)."""
    for name, spec in exports.items():  # the program may have forged this dict: check everything again
        if type(name) is not str or type(spec) is not list or not spec or hasattr(builtins, name) \
                or name.startswith("__"):  # `__builtins__` would replace the tests' builtins
            continue
        if spec[0] == "call":
            namespace[name] = _proxy(holder, name)
        elif spec[0] == "value" and len(spec) == 2:
            namespace[name] = spec[1]
        elif spec[0] == "module" and len(spec) == 2 and type(spec[1]) is str:
            parts = spec[1].split(".")
            if parts[0] not in sys.stdlib_module_names or parts[0] in _IMPORT_NEVER or "__main__" in parts:
                continue  # a module of the program's own making: tests that use it fail with NameError
            try:
                namespace[name] = importlib.import_module(spec[1])
            except ImportError:
                continue  # not importable here either: same as above


def _is_stub(node):
    """A definition whose body is only a docstring, `pass` or `...`: the prompt declares it, the program fills it."""
    return all(isinstance(stmt, ast.Pass) or (isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Constant)
                                              and (isinstance(stmt.value.value, str) or stmt.value.value is ...))
               for stmt in node.body)


def _bound_names(node):
    """Names a top-level import, definition or assignment binds."""
    if isinstance(node, (ast.Import, ast.ImportFrom)):
        return {(alias.asname or alias.name).split(".")[0] for alias in node.names}
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        return {node.name}
    targets = node.targets if isinstance(node, ast.Assign) else [node.target]
    return {n.id for target in targets for n in ast.walk(target) if isinstance(n, ast.Name)}


def _trusted_assignment(node, known):
    """A top-level constant of the prompt (`SHIFT = 5`, `MOD = 10**9 + 7`) that the trusted helpers may read: only
    plain name targets, and a value that uses nothing but builtins and names the trusted part already bound (so it
    never calls the program's functions). Otherwise it stays the program's, as before."""
    if isinstance(node, ast.AnnAssign) and node.value is None:
        return False
    targets = node.targets if isinstance(node, ast.Assign) else [node.target]
    if not all(isinstance(n, (ast.Name, ast.Tuple, ast.List, ast.Store)) for t in targets for n in ast.walk(t)):
        return False
    if isinstance(node, ast.AugAssign) and node.target.id not in known:
        return False
    nodes = list(ast.walk(node.value))
    local = {n.id for n in nodes if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store)}  # comprehensions
    local |= {n.arg for n in nodes if isinstance(n, ast.arg)}  # lambdas
    used = {n.id for n in nodes if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)} - local
    return all(name in known or hasattr(builtins, name) for name in used)


def trusted_helpers(prompt, tests):
    """From the prompt (the program's prefix, e.g. HumanEval's), the imports, the functions/classes it defines in
    full and the constants it assigns (see _trusted_assignment) that the test snippets do not name (HumanEval/32
    `poly`, /38 `encode_cyclic`): they run here, so a program cannot redefine a helper the tests trust, nor a
    constant such a helper reads. Stubs and the functions under test stay the program's."""
    if not prompt.strip():
        return ""
    try:
        tree = ast.parse(prompt)
    except SyntaxError:
        return ""  # a prompt that does not parse on its own (it ends inside a body): nothing to trust
    under_test = set()
    for test in tests:
        try:
            under_test |= {n.id for n in ast.walk(ast.parse(test)) if isinstance(n, ast.Name)}
        except SyntaxError:
            continue  # reported when the test itself runs
    keep, known = [], set()
    for node in tree.body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            trusted = True
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            trusted = not _is_stub(node) and node.name not in under_test
        elif isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
            trusted = not (_bound_names(node) & under_test) and _trusted_assignment(node, known)
        else:
            trusted = False
        if trusted:
            keep.append(node)
            known |= _bound_names(node)
    return ast.unparse(ast.Module(body=keep, type_ignores=[]))


def _on_alarm(signum, frame):
    raise TestTimedOut()


def run(job, req_fd, rep_fd, emit):
    """Returns the exit code: 0, or 3 when the candidate side stopped answering (the parent restarts the rest)."""
    tests, first, wall = job["tests"], job.get("first", 0), job["test_timeout_s"]
    signal.signal(signal.SIGALRM, _on_alarm)

    def fail_all(status, detail):
        for index in range(first, len(tests)):
            emit(b"test %d %s %s" % (index, status.encode(), detail.encode("utf-8", "replace")))
        return 0

    try:
        loaded = plain.recv(rep_fd, time.monotonic() + wall + 0.5)
    except TimeoutError:
        return fail_all("timeout", f"program: loading exceeded {wall:g}s")
    except plain.Malformed as exc:
        return fail_all("crashed", f"program: {exc}")
    if loaded is None:
        return fail_all("exited", "program: process ended while loading")
    if type(loaded) is not tuple or len(loaded) != 4 or loaded[0] != "loaded" or type(loaded[3]) is not dict:
        return fail_all("crashed", "program: malformed load reply")
    _, status, detail, exports = loaded
    if status != "ok":
        # the status is the candidate's word: only a failure run_guarded can report is written as one ("ok " would
        # be read by the parent as a pass of every test)
        if status not in _LOAD_FAILURES:
            return fail_all("crashed", "program: malformed load status")
        return fail_all(status, f"program: {detail}")
    holder = [Session(req_fd, rep_fd)]
    namespace = {"__name__": "__checker__", "__builtins__": builtins}
    _import_exports(namespace, exports, holder)
    try:
        helpers = trusted_helpers(job.get("helpers") or "", tests)
        exec(compile(helpers, "<prompt helpers>", "exec"), namespace)
        exec(compile(job.get("setup") or "", "<tests>", "exec"), namespace)
    except BaseException as exc:
        status, detail = _status(exc)
        return fail_all(status, f"test setup: {detail}")
    for index in range(first, len(tests)):
        emit(b"begin %d" % index)
        session = holder[0] = Session(req_fd, rep_fd)
        status, detail = "ok", ""
        try:
            plain.send(req_fd, ("begin",))
        except OSError:  # the candidate server is gone (killed by its own program): every test from here fails
            session.gone, session.failure = True, ("crashed", "candidate process ended")
        signal.setitimer(signal.ITIMER_REAL, wall + 0.5)
        try:
            exec(compile(tests[index], "<tests>", "exec"), dict(namespace))
        except BaseException as exc:
            status, detail = _status(exc)
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
        if session.failure:
            status, detail = session.failure
        answered = session.finish(time.monotonic() + 1.0)
        emit(b"test %d %s %s" % (index, status.encode(), detail.encode("utf-8", "replace")))
        if not answered:
            return 3
    return 0
