"""Command lines from dataclasses: one flag per field, its help text and default in `--help`.

    @dataclass
    class Config:
        steps: int = flag(600, "training steps per run")
    parser = dataclass_parser(Config, "train_tiny.py", "what it does", "epilog")
    cfg = Config(**vars(parser.parse_args(argv)))
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import tempfile
from pathlib import Path

TYPES = {"int": int, "float": float, "str": str}


def flag(default, help):
    """A dataclass field that becomes a command-line flag with this help text."""
    return dataclasses.field(default=default, metadata={"help": help})


def dataclass_parser(config_cls, prog, description, epilog, suppress_defaults=False,
                     positional=()):
    """An argparse parser with one flag per field of config_cls (--field-name, the field's type,
    its metadata help, bools as store_true, `int | None` as int with default None); fields named
    in `positional` are positional arguments. suppress_defaults: parse only what was given (to
    tell given flags from defaults)."""
    p = argparse.ArgumentParser(
        prog=prog, description=description, epilog=epilog,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        argument_default=argparse.SUPPRESS if suppress_defaults else None)
    for f in dataclasses.fields(config_cls):
        kw = {} if suppress_defaults else {"default": f.default}
        help = f.metadata["help"].replace("%", "%%")      # argparse formats help with %
        if f.name in positional:
            p.add_argument(f.name, metavar=f.name.upper(), help=help, **kw)
        elif f.type in ("bool", bool):
            p.add_argument("--" + f.name.replace("_", "-"), action="store_true", help=help, **kw)
        else:
            typ = TYPES[str(f.type).split(" |")[0]]
            p.add_argument("--" + f.name.replace("_", "-"), type=typ, help=help, **kw)
    return p


def given_flags(config_cls, argv, positional=()):
    """The names of the fields that argv gives explicitly (presets fill only the others)."""
    quiet = dataclass_parser(config_cls, None, None, None, suppress_defaults=True,
                             positional=positional)
    return set(vars(quiet.parse_known_args(argv)[0]))


def check_out_dir(out, parser, flag="--out"):
    """`out` must be a directory we can write: parser.error naming the flag, instead of a
    traceback later."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        parser.error(f"{flag}: {str(out)!r} exists and is not a directory")
    try:
        out.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=out)
        os.close(fd)
        os.remove(probe)
    except OSError as e:
        parser.error(f"{flag}: cannot write to {str(out)!r}: {e.strerror or e}")
