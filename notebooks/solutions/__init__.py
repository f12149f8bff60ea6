"""Solutions of the notebook exercises, apart from the notebooks so a student can try first.

solNN.py holds, for the checks of exercises/exNN.py:
    SOLUTIONS = {"check_name": answer}                  the check returns True on it
    WRONG = {"check_name": [typical_wrong_answer, ...]}  the check returns False on each; every
                                                        wrong function's docstring names the mistake,
                                                        a wrong value is Wrong(value, "the mistake")
tests/test_exercises.py runs them all.
"""
from typing import Any, NamedTuple


class Wrong(NamedTuple):
    """A typical wrong VALUE (a function carries its mistake in its docstring instead)."""
    answer: Any
    why: str
