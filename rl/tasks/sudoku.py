"""4x4 Sudoku: prompt `"1030302020034001="` (row-major, 0 = blank), answer `"1432342121434321"`.

Every digit 1..4 once per row, column and 2x2 box. All 288 valid grids are enumerated once; a puzzle takes one,
then blanks cells in a random order, keeping a blank only while the puzzle still has exactly one solution, until
it has a number of blanks drawn in `min_blanks..max_blanks`. Puzzles therefore have a unique solution and the
reference answer is the only right one. The key is the puzzle string (disjoint splits).

Verifier: the response's answer line (its first non-empty line, `base.answer_line`) must be the 16 cells as ASCII
digits, optionally separated by spaces, `|` or `,` (`1432342121434321`, `1432|3421|2143|4321`); fewer cells is
`incomplete`, anything else `bad_format`; it is correct when it equals the solution. `partial_credit` pays
0.5 x the fraction of the puzzle's blank cells filled right for a well-formed grid that is not the solution (all
cells when the prompt holds no puzzle): copying the prompt's givens earns nothing.
"""
from __future__ import annotations

import functools
import itertools
import re
from typing import Any, Hashable

import numpy as np

from rl.tasks.base import Task, TaskError, answer_line, check_int, result

SIZE = 4
CELLS = SIZE * SIZE
_DIGIT = re.compile(r"[0-9]")
_SEPARATORS = re.compile(r"[ \t|,]")
_CELLS = re.compile(f"[0-9]{{1,{CELLS}}}")
_PUZZLE = re.compile(f"(?<![0-9])([0-4]{{{CELLS}}})=")
_KEY = re.compile(f"([0-4]{{{CELLS}}})=")


@functools.lru_cache(maxsize=1)
def all_grids() -> np.ndarray:
    """(288, 16) int8: every valid 4x4 Sudoku grid, row-major, in lexicographic order."""
    rows = list(itertools.permutations(range(1, SIZE + 1)))
    grids = []

    def extend(prefix: list[tuple[int, ...]]) -> None:
        if len(prefix) == SIZE:
            grids.append([d for row in prefix for d in row])
            return
        r = len(prefix)
        for row in rows:
            if any(row[c] == prev[c] for prev in prefix for c in range(SIZE)):
                continue
            if r % 2 == 1 and any(set(row[c:c + 2]) & set(prefix[r - 1][c:c + 2]) for c in (0, 2)):
                continue
            extend(prefix + [row])

    extend([])
    return np.array(grids, dtype=np.int8)


def count_solutions(puzzle: np.ndarray) -> int:
    """Number of valid grids agreeing with the givens of a (16,) puzzle (0 = blank)."""
    given = puzzle != 0
    return int(np.all((all_grids() == puzzle) | ~given, axis=1).sum())


def is_valid_grid(cells: np.ndarray) -> bool:
    grid = np.asarray(cells).reshape(SIZE, SIZE)
    groups = list(grid) + list(grid.T) + [grid[r:r + 2, c:c + 2].ravel() for r in (0, 2) for c in (0, 2)]
    return all(sorted(g.tolist()) == list(range(1, SIZE + 1)) for g in groups)


def puzzle_in(prompt: str, solution: list[str]) -> list[str] | None:
    """The puzzle's 16 cells from a prompt holding `<16 digits>=` that agrees with the solution, else None."""
    for match in reversed(list(_PUZZLE.finditer(prompt or ""))):
        cells = list(match.group(1))
        if all(c == "0" or c == s for c, s in zip(cells, solution)):
            return cells
    return None


def verify(response: str, reference: Any, *, partial_credit: bool = False, prompt: str = "",
           **_: Any) -> dict[str, Any]:
    """1.0 when the response's answer line is the reference solution's 16 digits. Partial credit counts the BLANK
    cells of the prompt's puzzle filled right (the givens are in the prompt: copying them solves nothing); without
    a puzzle in the prompt, every cell."""
    want = _DIGIT.findall(str(reference))
    if len(want) != CELLS:
        return result(0.0, f"error: reference has {len(want)} digits, not {CELLS}")
    line = answer_line(response)
    if line is None:
        return result(0.0, "no_answer", correct=0.0)
    cells = _SEPARATORS.sub("", line)
    if not _CELLS.fullmatch(cells):
        return result(0.0, "bad_format", correct=0.0)
    got = list(cells)
    right = sum(a == b for a, b in zip(got, want))
    if right == CELLS:
        return result(1.0, "correct", correct=1.0, cells_right=right)
    reason = "incomplete" if len(got) < CELLS else "wrong"
    puzzle = puzzle_in(prompt, want)
    graded = range(CELLS) if puzzle is None else [i for i in range(CELLS) if puzzle[i] == "0"]
    solved = sum(i < len(got) and got[i] == want[i] for i in graded)
    score = 0.5 * solved / len(graded) if partial_credit and graded else 0.0
    return result(score, reason, correct=0.0, cells_right=right)


class SudokuTask(Task):
    name = "sudoku"
    tag = 303
    verify = staticmethod(verify)

    def reward(self, prompt: str, response: str, reference: Any, **options: Any) -> dict[str, Any]:
        return verify(response, reference, prompt=prompt, **options)  # the puzzle's givens earn no partial credit

    def __init__(self, *, seed: int = 0, min_blanks: int = 4, max_blanks: int = 10, num_train: int = 2000,
                 num_test: int = 200):
        super().__init__(seed=seed, num_train=num_train, num_test=num_test)
        # 4 givens is the minimum for a unique 4x4 puzzle: at most 12 blanks.
        self.min_blanks = check_int("min_blanks", min_blanks, 1, 12)
        self.max_blanks = check_int("max_blanks", max_blanks, self.min_blanks, 12)
        if self.max_blanks > 10:
            # Greedy blanking rarely reaches 11-12 blanks; the draw retries with new grids until it does.
            self.max_attempts_factor = 200

    def params(self) -> dict[str, Any]:
        return {**super().params(), "min_blanks": self.min_blanks, "max_blanks": self.max_blanks}

    @staticmethod
    def prompt_key(prompt: str) -> Hashable | None:
        match = _KEY.fullmatch(prompt.strip())
        return match.group(1) if match else None

    def draw(self, rng: np.random.Generator) -> tuple[Hashable, dict]:
        grids = all_grids()
        wanted = int(rng.integers(self.min_blanks, self.max_blanks + 1))
        for _ in range(1000):
            solution = grids[int(rng.integers(len(grids)))]
            puzzle = solution.copy()
            blanks = 0
            for cell in rng.permutation(CELLS):
                if blanks == wanted:
                    break
                kept = puzzle[cell]
                puzzle[cell] = 0
                if count_solutions(puzzle) == 1:
                    blanks += 1
                else:
                    puzzle[cell] = kept
            if blanks == wanted:
                text = "".join(str(int(d)) for d in puzzle)
                return text, {"prompt": f"{text}=", "answer": "".join(str(int(d)) for d in solution)}
        raise TaskError(f"data.task_kwargs.max_blanks: could not blank {wanted} cells of a 4x4 Sudoku uniquely")
