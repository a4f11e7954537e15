"""Package-wide rules: one name per class across rl/, rollout/, rewards/ and launch/, and imports that point down
(launch -> rl -> rollout; rewards separate, reaching the stack only for the one-line error helper)."""
from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("rl", "rollout", "rewards", "launch")


def _modules():
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            yield package, path, ast.parse(path.read_text(), filename=str(path))


def test_no_class_name_is_defined_twice():
    where = defaultdict(list)
    for _, path, tree in _modules():
        for node in ast.walk(tree):
            if isinstance(node, ast.ClassDef):
                where[node.name].append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert len(where) > 100  # the walk saw the packages
    twice = {name: places for name, places in where.items() if len(places) > 1}
    assert not twice, twice


def _imported_packages(tree: ast.AST) -> set[str]:
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module.split(".")[0])
    return found & set(PACKAGES)


# What each package may import of the others (lazy imports inside functions included).
ALLOWED = {"launch": {"launch", "rl", "rollout", "rewards"}, "rl": {"rl", "rollout"}, "rollout": {"rollout"},
           "rewards": {"rewards", "rollout"}}


def test_imports_point_down():
    bad = []
    for package, path, tree in _modules():
        for other in _imported_packages(tree) - ALLOWED[package]:
            bad.append(f"{path.relative_to(ROOT)} imports {other}")
    assert not bad, bad


def test_rewards_reach_the_stack_only_for_one_line_errors():
    used = set()
    for package, path, tree in _modules():
        if package != "rewards":
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "rollout":
                used.add(node.module)
    assert used == {"rollout.errors"}
