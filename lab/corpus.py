"""The text train_tiny learns: the Python standard library's source (no download) or any UTF-8
file, as bytes, split into a training and a held-out part.

    load_corpus("", 64)          -> dict(train=uint8 array, val=uint8 array, info=dict)
Held out: every 20th stdlib file of the sorted list (i % 20 == 10, so val looks like train; the
tail of the list is mostly pydoc_data English), or every 20th block (up to 16 chunks) of a file,
so val and train interleave through the whole text. info records the source, the split, the sizes
and the sha256 of the bytes read (a resumed run must see the same corpus).
"""
import hashlib
import os
import sysconfig
from pathlib import Path

import numpy as np


def stdlib_files():
    """(root, sorted stdlib *.py files), skipping site-packages and test directories (12 MB)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "test", "tests", "idle_test"}
    return root, sorted(p for p in root.rglob("*.py") if not skip & set(p.relative_to(root).parts))


def load_corpus(data="", chunk_bytes=64):
    """data: a UTF-8 text file, or "" for the stdlib; chunk_bytes: the training chunk (a file
    needs 20 of them). ValueError naming --data for a file that is unreadable, empty, not UTF-8
    or too short."""
    if not data:
        root, files = stdlib_files()
        texts = [p.read_bytes() for p in files]
        raw = b"".join(texts)
        train = b"\n".join(b for i, b in enumerate(texts) if i % 20 != 10)
        val = b"\n".join(b for i, b in enumerate(texts) if i % 20 == 10)
        info = dict(source=f"python stdlib *.py ({root}; no site-packages/tests)",
                    n_files=len(files), val_files=len(texts[10::20]),
                    split="every 20th file (i % 20 == 10)")
    else:
        try:
            raw = Path(data).read_bytes()
            raw.decode("utf-8")
        except OSError as e:
            raise ValueError(f"--data: cannot read {data!r}: {e.strerror or e}") from None
        except UnicodeDecodeError as e:
            raise ValueError(f"--data: {data!r} is not UTF-8 text ({e.reason} at byte "
                             f"{e.start})") from None
        if len(raw) < 20 * chunk_bytes:
            raise ValueError(f"--data: {data!r} has {len(raw)} bytes; need at least "
                             f"{20 * chunk_bytes} (20 x --chunk-bytes)" if raw else
                             f"--data: {data!r} is empty")
        block = min(16 * chunk_bytes, len(raw) // 20)
        blocks = [raw[i:i + block] for i in range(0, len(raw), block)]
        train = b"".join(b for i, b in enumerate(blocks) if i % 20 != 10)
        val = b"".join(b for i, b in enumerate(blocks) if i % 20 == 10)
        info = dict(source=os.path.abspath(data), split=f"every 20th block of {block} bytes")
    info.update(total_bytes=len(train) + len(val), train_bytes=len(train), val_bytes=len(val),
                sha256=hashlib.sha256(raw).hexdigest())
    return dict(train=np.frombuffer(train, np.uint8), val=np.frombuffer(val, np.uint8), info=info)
