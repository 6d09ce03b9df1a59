"""``ckptcloud gc URL [--dry-run] [--grace SECONDS]``: garbage-collect the blobs of deduplicated checkpoints.

Deletes the blobs under ``URL/.blobs/`` that no manifest under ``URL`` references and that are older than the grace
(see :mod:`ckptcloud.dedup.gc` for the rule and why a save running at the same time loses nothing).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

from ckptcloud._inventory import human_size
from ckptcloud.dedup.blobs import DEFAULT_GRACE, check_grace
from ckptcloud.dedup.gc import collect_garbage
from ckptcloud.urls import saver_from_url


def _grace(text: str) -> float:
    try:
        return check_grace(float(text), "--grace")
    except (TypeError, ValueError) as err:
        raise argparse.ArgumentTypeError(str(err)) from err


def _gc(args: argparse.Namespace) -> None:
    saver = saver_from_url(args.url, require_empty=False)
    if not hasattr(saver, "store"):
        raise ValueError(f"{args.url} is a local folder: dedup checkpoints live in S3, GCS or Azure")
    report = collect_garbage(saver.store, saver._base, args.grace, retry=saver.retry, dry_run=args.dry_run)
    verb = "would delete" if args.dry_run else "deleted"
    for name in report.deleted:
        print(f"{verb} {saver.store.url(saver._base + '.blobs/' + name)}")
    print(
        f"{report.blobs} blob(s), {report.manifests} manifest(s): {report.referenced} referenced, {report.young} "
        f"unreferenced but younger than {args.grace:g} s; {verb} {len(report.deleted)} "
        f"({human_size(report.deleted_bytes)})"
    )


def register(add: Callable[..., Any]) -> None:
    """Add the ``gc`` command with ``add(name, run, help, *positional)`` (the parser builder of ``ckptcloud.cli``)."""
    cmd = add(
        "gc",
        _gc,
        "delete the blobs of deduplicated checkpoints under URL that no checkpoint references and that are older "
        "than the grace",
        "url",
    )
    cmd.add_argument("--dry-run", action="store_true", help="print what would be deleted, delete nothing")
    cmd.add_argument(
        "--grace",
        type=_grace,
        default=DEFAULT_GRACE,
        metavar="SECONDS",
        help=f"keep unreferenced blobs younger than this (default {DEFAULT_GRACE:g}; use the savers' dedup_grace)",
    )
