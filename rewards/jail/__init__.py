"""Code that runs INSIDE the code sandbox (started by rewards/sandbox.py as `python -I -S -B jail/harness.py`).

    harness.py    PID 1 of the sandbox: builds the filesystem view, forks the checker and the candidate server
    fs.py         the new root: tmpfs + read-only binds of the interpreter and its libraries, pivot_root
    candidate.py  execs the program once, forks per test, answers calls with plain data
    checker.py    runs the setup and tests; the program's functions are proxies to the candidate
    plain.py      the plain-data wire format between them (no pickle, no eval)
"""
