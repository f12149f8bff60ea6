"""Exercise checks for the notebooks: one module exNN.py per notebook NN, its solutions apart in
notebooks/solutions/solNN.py (tests/test_exercises.py runs every check against them).

The contract every check follows:
- `check_something(answer) -> bool` never raises. It prints "✓ right: ..." and returns True, or
  prints "✗ wrong: <what is wrong, and a hint>" and returns False.
- The notebook commits the stub: a function that raises NotImplementedError, or the value None.
  The check then prints "… not attempted yet" and returns False, so the notebook still executes.

Helpers for writing a check:

    @check                      wraps a check: None or NotImplementedError -> "not attempted yet";
                                any other exception (from the student's code or from comparing a
                                malformed answer) -> "✗ wrong: ... raised ..."; never raises
    right(message) -> True      prints "✓ right: message"
    wrong(message) -> False     prints "✗ wrong: message"
    verdict(ok, message) -> bool   right(message) if ok else wrong(message)
    not_attempted(what) -> False   prints "… not attempted yet: what"
    attempt(answer, *args, **kwargs)  calls the answer if it is a function, else returns it as is
                                (None raises NotAttempted, which @check reports as not attempted)
    to_numpy(x)                 a torch tensor, list or number -> numpy array (detached, on CPU)
"""
import functools

import numpy as np

try:                      # puts the repo root on sys.path (nbhelp sits next to this package)
    import nbhelp  # noqa: F401
except ImportError:       # imported some other way: the caller set up the path
    pass


class NotAttempted(Exception):
    """The answer is still the stub (None, or a function that raises NotImplementedError)."""


def right(message):
    print(f"✓ right: {message}")
    return True


def wrong(message):
    print(f"✗ wrong: {message}")
    return False


def verdict(ok, message):
    """right(message) if ok else wrong(message); returns bool(ok)."""
    return right(message) if ok else wrong(message)


def not_attempted(what=""):
    print("… not attempted yet" + (f": {what}" if what else ""))
    return False


def attempt(answer, *args, **kwargs):
    """The student's answer: answer(*args, **kwargs) for a function, the value itself otherwise.
    None (the value stub) raises NotAttempted; a NotImplementedError passes through to @check."""
    if answer is None:
        raise NotAttempted
    return answer(*args, **kwargs) if callable(answer) else answer


def to_numpy(x):
    """A torch tensor (detached, on CPU), list, tuple of numbers or number -> numpy array."""
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def check(fn):
    """Make a check function safe: it never raises, and a stub answer reads "not attempted yet"."""
    @functools.wraps(fn)
    def safe(answer=None, *args, **kwargs):
        if answer is None:
            return not_attempted("the answer is still None: fill it in, then run the cell again")
        try:
            return bool(fn(answer, *args, **kwargs))
        except (NotImplementedError, NotAttempted):
            return not_attempted("replace `raise NotImplementedError` with your code, then run the cell again")
        except Exception as err:  # noqa: BLE001 -- a check must never raise
            return wrong(f"your answer could not be checked, it raised {type(err).__name__}: {err}")
    safe.is_check = True
    return safe
