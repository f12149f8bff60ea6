"""Reading and writing run files safely: atomic writes, strict JSON, checkpoints that never
execute pickled code, and errors that name the file.

Every writer here writes a temporary file and renames it, so a reader (or a run killed
half-way) never sees a half-written file.
"""
import json
import math
import os
import tempfile
from pathlib import Path

import torch


def atomic_write(path, write):
    """write(tmp_path), then os.replace(tmp_path, path). The file gets the usual permissions
    (0666 less the umask), not mkstemp's 0600."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=path.suffix + ".tmp")
    os.close(fd)
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def strict(obj):
    """obj with every NaN or infinite float replaced by None (strict JSON has neither)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: strict(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [strict(v) for v in obj]
    return obj


def write_json(path, obj):
    """Atomic, strict JSON (NaN and infinity become null)."""
    text = json.dumps(strict(obj), indent=1, allow_nan=False)
    atomic_write(path, lambda t: Path(t).write_text(text))


def write_text(path, text):
    atomic_write(path, lambda t: Path(t).write_text(text))


def read_json(path, what="run file", keys=()):
    """The JSON object in `path`; ValueError naming the file if it is missing, truncated or not
    JSON (e.g. a copy cut short: instead of a bare JSONDecodeError) or lacks one of `keys`."""
    path = Path(path)
    try:
        obj = json.loads(path.read_text())
    except FileNotFoundError:
        raise ValueError(f"{path}: no such {what}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: unreadable {what} ({e}); delete it to start that run "
                         "again") from None
    missing = [k for k in keys if not isinstance(obj, dict) or k not in obj]
    if missing:
        raise ValueError(f"{path}: not a {what} of this version (missing {missing}); delete it "
                         f"to start that run again")
    return obj


def save_checkpoint(path, obj):
    """torch.save, atomically."""
    atomic_write(path, lambda t: torch.save(obj, t))


def load_checkpoint(path, keys=(), what="checkpoint"):
    """torch.load(path, weights_only=True): tensors and plain containers only, never pickled code.
    ValueError naming the file if it is truncated or lacks one of `keys`."""
    path = Path(path)
    try:
        obj = torch.load(path, weights_only=True, map_location="cpu")
    except FileNotFoundError:
        raise ValueError(f"{path}: no such {what}") from None
    except Exception as e:  # torch raises RuntimeError, pickle errors, EOFError, ... for a bad file
        raise ValueError(f"{path}: unreadable {what} ({type(e).__name__}: {e}); delete it to "
                         f"start that run again") from None
    missing = [k for k in keys if not isinstance(obj, dict) or k not in obj]
    if missing:
        raise ValueError(f"{path}: not a {what} of this version (missing {missing}); delete it "
                         f"to start that run again")
    return obj


def clock(seconds):
    """Seconds -> 'm:ss'."""
    return f"{int(seconds) // 60}:{int(seconds) % 60:02d}"
