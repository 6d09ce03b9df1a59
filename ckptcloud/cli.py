"""The ``ckptcloud`` command (also ``python -m ckptcloud``)."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    """Dispatch ``ckptcloud demo [...]``."""
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] in ("-h", "--help"):
        print("usage: ckptcloud demo [--url s3://bucket/prefix] [--epochs N] [--n-saved N]")
        return 0 if args else 2
    if args[0] == "demo":
        from ckptcloud.demo import main as demo_main

        return demo_main(args[1:])
    print(f"ckptcloud: unknown command {args[0]!r}; try 'ckptcloud --help'", file=sys.stderr)
    return 2
