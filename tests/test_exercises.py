"""The notebook exercises: every check passes on its solution and fails on its typical wrong answers.

Discovers every notebooks/exercises/exNN.py that has a notebooks/solutions/solNN.py (no hard-coded
list) and asserts, for each public check_* of exNN:
- it returns True on SOLUTIONS[name], and prints "✓ right";
- it returns False on each WRONG[name] entry (a function whose docstring names the mistake, or a
  solutions.Wrong(value, why)), and prints "✗ wrong";
- it returns False on the not-attempted stubs (None; a function raising NotImplementedError when
  the solution is a function) and prints "not attempted yet";
- it never raises, and every check has a solution and at least one wrong answer.
"""
import importlib
import inspect
import re
import sys
from pathlib import Path

import pytest

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"
sys.path.insert(0, str(NOTEBOOKS))          # `exercises`, `solutions` and `nbhelp`, as in the notebooks


def pairs():
    """(NN, exercises module name, solutions module name) of every exNN.py with a solNN.py."""
    found = []
    for path in sorted((NOTEBOOKS / "exercises").glob("ex[0-9][0-9].py")):
        nn = path.stem[2:]
        if (NOTEBOOKS / "solutions" / f"sol{nn}.py").exists():
            found.append(nn)
    return found


def checks_of(nn):
    """{name: function} of the public check_* functions of exercises/exNN.py."""
    ex = importlib.import_module(f"exercises.ex{nn}")
    return {name: fn for name, fn in vars(ex).items()
            if name.startswith("check_") and inspect.isfunction(fn) and fn.__module__ == ex.__name__}


def solutions_of(nn):
    sol = importlib.import_module(f"solutions.sol{nn}")
    return sol.SOLUTIONS, sol.WRONG


CASES = [(nn, name) for nn in pairs() for name in sorted(checks_of(nn))]


def wrong_entries(nn, name):
    """(answer, the mistake) of each WRONG entry."""
    from solutions import Wrong
    out = []
    for entry in solutions_of(nn)[1].get(name, []):
        if isinstance(entry, Wrong):
            out.append((entry.answer, entry.why))
        else:
            out.append((entry, inspect.getdoc(entry)))
    return out


def run(check, answer, capsys):
    """The check's return value and what it printed; it must not raise."""
    capsys.readouterr()
    ok = check(answer)
    return ok, capsys.readouterr().out


def test_every_notebook_with_exercises_is_found():
    """Discovery finds the exercise modules of notebooks 01, 02, 04, 06 and 07, each with checks."""
    assert {"01", "02", "04", "06", "07"} <= set(pairs()), pairs()
    for nn in pairs():
        assert checks_of(nn), f"exercises/ex{nn}.py has no check_* function"


@pytest.mark.parametrize("nn", pairs())
def test_every_check_has_a_solution_and_a_wrong_answer(nn):
    """SOLUTIONS and WRONG cover exactly the public checks; each wrong answer names its mistake."""
    checks = set(checks_of(nn))
    solutions, wrong = solutions_of(nn)
    assert set(solutions) == checks, f"sol{nn}.SOLUTIONS vs checks: {set(solutions) ^ checks}"
    assert set(wrong) == checks, f"sol{nn}.WRONG vs checks: {set(wrong) ^ checks}"
    for name in checks:
        entries = wrong_entries(nn, name)
        assert entries, f"{name}: no wrong answer"
        for answer, why in entries:
            assert why and why.strip(), f"{name}: a wrong answer {answer!r} does not say what its mistake is"


@pytest.mark.parametrize("nn,name", CASES)
def test_check_passes_on_the_solution(nn, name, capsys):
    """The check returns True on the solution and says so."""
    ok, out = run(checks_of(nn)[name], solutions_of(nn)[0][name], capsys)
    assert ok is True, out
    assert out.startswith("✓ right"), out


@pytest.mark.parametrize("nn,name", CASES)
def test_check_fails_on_each_typical_wrong_answer(nn, name, capsys):
    """The check returns False on every typical wrong answer, with a message longer than a verdict."""
    for answer, why in wrong_entries(nn, name):
        ok, out = run(checks_of(nn)[name], answer, capsys)
        assert ok is False, f"{name} accepted the wrong answer ({why}):\n{out}"
        assert "✗ wrong" in out and "✓" not in out, out
        assert len(re.sub(r"\s+", " ", out)) > 40, f"{name}: the message for ({why}) gives no hint: {out}"


@pytest.mark.parametrize("nn,name", CASES)
def test_check_says_not_attempted_on_the_stub(nn, name, capsys):
    """None, and a function raising NotImplementedError, read as "not attempted yet" (False)."""
    def stub(*args, **kwargs):
        raise NotImplementedError

    stubs = [None] + ([stub] if callable(solutions_of(nn)[0][name]) else [])
    for answer in stubs:
        ok, out = run(checks_of(nn)[name], answer, capsys)
        assert ok is False, out
        assert "not attempted yet" in out and "✓" not in out, out


@pytest.mark.parametrize("nn,name", CASES)
def test_check_never_raises(nn, name, capsys):
    """Garbage answers (a string, a function that crashes, one of the wrong type) give False, no exception."""
    def crashes(*args, **kwargs):
        raise ValueError("boom")

    for answer in ["not an answer", crashes, lambda *a, **k: "nonsense", object()]:
        ok, out = run(checks_of(nn)[name], answer, capsys)
        assert ok is False, out
        assert "✗ wrong" in out, out
