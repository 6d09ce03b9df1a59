"""The ``ckptcloud`` command (also ``python -m ckptcloud``): list, copy, verify, remove, prune and convert
checkpoints, single files and sharded folders (see :mod:`ckptcloud._cli_sharded`).

Exit codes: 0 ok; 1 the operation failed (integrity, load refused, transfer failed); 2 usage error, bad URL, unknown
scheme or refused confirmation; 3 not found (no such object, folder or bucket; ls found no checkpoints); 4 permission
denied or missing credentials; 5 cannot reach the endpoint; 130 interrupted.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import torch

from ckptcloud import _cli_dedup, serialization
from ckptcloud import _cli_sharded as sharded
from ckptcloud._inventory import human_size, listing_rows
from ckptcloud._tree import tree_leaves
from ckptcloud.dedup.load import rebuild_if_manifest
from ckptcloud.download import download_to_file
from ckptcloud.errors import CkptcloudError, IntegrityError
from ckptcloud.handlers import DiskSaver, atomic_write, check_filename
from ckptcloud.policies import AnyOf, BestN, CheckpointInfo, EveryNSeconds, EveryNSteps, LatestN, Policy
from ckptcloud.streaming import PartWriter, choose_part_size
from ckptcloud.urls import saver_from_url, split_url

MiB = 1024 * 1024
_CREDENTIALS = {"NoCredentialsError", "PartialCredentialsError", "DefaultCredentialsError", "RefreshError"}


class CliError(Exception):
    """A failure that exits with ``code``."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


class _Bar:
    """``progress(done, total)``: a one-line bar on stderr, only on a TTY, for more than 8 MiB, unless quiet."""

    def __init__(self, label: str, quiet: bool) -> None:
        self.label, self.on, self.drawn, self.last = label, not quiet and sys.stderr.isatty(), False, 0.0
        self.start, self.lock = time.monotonic(), threading.Lock()

    def __call__(self, done: int, total: int | None) -> None:
        now = time.monotonic()
        if not self.on or not total or total <= 8 * MiB or (done < total and now - self.last < 0.1):
            return
        with self.lock:
            self.last, self.drawn, rate = now, True, done / max(now - self.start, 1e-6) / 1e6
            mib = f"{done / MiB:.1f}/{total / MiB:.1f} MiB"
            sys.stderr.write(f"\r{self.label} {100 * done / total:5.1f}%  {mib}  {rate:.1f} MB/s ")
            sys.stderr.flush()

    def close(self) -> None:
        if self.drawn:
            sys.stderr.write("\n")


# ------------------------------------------------------------------------------------- URLs, transfers
def _parent(url: str) -> str:
    """The folder URL of an object URL, with its trailing '/': ``s3://b/run/model_1.pt`` -> ``s3://b/run/``."""
    return url.rstrip("/").rpartition("/")[0] + "/"


def _folder_saver(url: str) -> Any:
    """The saver of a prefix URL that may already hold checkpoints; a missing local folder is not created."""
    scheme, _, path = split_url(url)
    if scheme == "file" and Path(path).is_file():
        raise CliError(3, f"{url} is a file, not a folder: its folder is {_parent(url)}")
    if scheme == "file" and not Path(path).is_dir():
        raise FileNotFoundError(f"no folder at {url}")
    return saver_from_url(url, require_empty=False, **({"create_dir": False} if scheme == "file" else {}))


def _object(url: str, *, create: bool = False, must_exist: bool = True) -> tuple[Any, str]:
    """``(saver of its folder, filename)`` for an object URL such as ``s3://bucket/prefix/model_3.pt``.

    With ``must_exist`` the object is HEADed, and the bucket is not checked: credentials scoped to the object (an
    ``s3:GetObject`` policy on the prefix) suffice, and a missing or denied object is reported by its URL.
    """
    if url.endswith("/"):  # checked on the raw URL: split_url strips the trailing '/'
        raise CliError(2, f"{url} names no object (it ends with '/'): give the object's name, e.g. {url}model_1.pt")
    scheme, bucket, key = split_url(url)
    folder, _, name = key.rpartition("/")
    if not name:
        raise CliError(2, f"{url} names no object: give the object's name, e.g. {url}/model_1.pt")
    check_filename(name)
    if scheme != "file":
        options = {"require_empty": False, "check_bucket": not must_exist}  # a put still checks the bucket first
        saver = saver_from_url(f"{scheme}://{bucket}/{folder}", **options)
        if must_exist:  # FileNotFoundError naming the URL
            saver.retry.call(lambda: saver.store.head(saver.key(name)), f"reading {url}")
        return saver, name
    if must_exist and not Path(key).is_file():
        raise FileNotFoundError(f"no file at {url}")
    return DiskSaver(folder or "/", require_empty=False, create_dir=create), name


def _copy(src: IO[bytes], dst: IO[bytes], bar: _Bar) -> int:
    total, done = os.fstat(src.fileno()).st_size, 0
    while chunk := src.read(8 * MiB):
        done += dst.write(chunk)
        bar(done, total)
    dst.flush()
    return done


def _download(saver: Any, name: str, file: IO[bytes], bar: _Bar) -> int:
    """The object into the real file ``file``: ranged GETs in parallel for remote stores; returns the size."""
    if isinstance(saver, DiskSaver):
        with open(saver.dirname / name, "rb") as src:
            size = _copy(src, file, bar)
    else:
        options = {"part_size": saver.part_size, "max_concurrency": saver.load_concurrency, "retry": saver.retry}
        size = download_to_file(saver.store, saver.key(name), file, progress=bar, **options)
        size = rebuild_if_manifest(saver, name, file, bar) or size  # a dedup manifest -> a normal torch.save file
    bar.close()
    return size


def _upload(saver: Any, name: str, src: Path, bar: _Bar) -> None:
    """Stream ``src`` in chunks through the saver's pipeline (no torch round trip); commit once or abort."""
    with open(src, "rb") as source:
        if isinstance(saver, DiskSaver):
            atomic_write(saver.dirname / name, lambda file: _copy(source, file, bar))
            return
        size = os.fstat(source.fileno()).st_size
        part_size = choose_part_size(saver.store.limits, saver.part_size, size)
        options = {"max_concurrency": saver.max_concurrency, "retry": saver.retry, "progress": bar}
        writer = PartWriter(saver.store, saver.key(name), part_size=part_size, expected_size=size, **options)
        try:
            buf = memoryview(bytearray(part_size))
            while n := source.readinto(buf):
                writer.write(buf[:n])
            writer.commit()
        except BaseException:
            writer.abort()
            raise


def _integrity(file: IO[bytes], name: str) -> str:
    return "verified CRC32C" if serialization.verify(file, name) else "no ckptcloud trailer: not verifiable"


# ------------------------------------------------------------------------------------ listing, ranking
def _confirm(question: str, yes: bool) -> None:
    if yes:
        return
    if sys.stdin is None or not sys.stdin.isatty():
        raise CliError(2, f"not confirmed (stdin is not interactive): pass --yes to {question}")
    print(f"{question}? [y/N] ", end="", file=sys.stderr, flush=True)
    if sys.stdin.readline().strip().lower() not in ("y", "yes"):
        raise CliError(2, "not confirmed: nothing deleted")


# ------------------------------------------------------------------------------------------- commands
def _nothing_to_list(saver: Any, url: str) -> str:
    """Why ``ls`` lists nothing: the URL names an object rather than a prefix, or no checkpoint is stored there."""
    if not isinstance(saver, DiskSaver) and saver.prefix:
        try:  # a hint only: one HEAD, sent when the listing is empty
            saver.retry.call(lambda: saver.store.head(saver.prefix), f"reading {url}")
        except (OSError, CkptcloudError):  # no object, no right to read it, unreachable: the plain message stands
            pass
        else:
            return f"{url.rstrip('/')} is an object, not a prefix: list its folder {_parent(url)}"
    return f"no checkpoints under {url.rstrip('/')}/"


def _ls(args: argparse.Namespace) -> None:
    saver = _folder_saver(args.url)
    rows = sharded.with_folders(saver, listing_rows(saver))
    if not rows:
        if args.json:
            print("[]")  # stdout stays valid JSON; the exit code says nothing was found
        if sharded.is_folder(args.url):
            shown = args.url.rstrip("/")
            raise CliError(3, f"{shown}/ is a sharded checkpoint, not a prefix: list {_parent(shown)}")
        raise CliError(3, _nothing_to_list(saver, args.url))
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    sharded.print_table(rows)


def _get(args: argparse.Namespace) -> None:
    if args.dest == "-":
        _get_to_stdout(args)
        return
    (saver, name), dest, start = _object(args.url), Path(args.dest), time.monotonic()
    dest = dest / name if dest.is_dir() else dest
    if not dest.parent.is_dir():
        raise FileNotFoundError(f"no folder {dest.parent} to write {dest.name} into")
    bar = _Bar("get", args.quiet)
    try:
        size, check = atomic_write(dest, lambda f: (_download(saver, name, f, bar), _integrity(f, args.url)))
    except IntegrityError as err:
        raise CliError(1, f"{err}; {dest} was not written") from err
    print(f"{args.url} -> {dest} ({human_size(size)}, {time.monotonic() - start:.1f} s): {check}")


def _get_to_stdout(args: argparse.Namespace) -> None:
    """``get URL -``: the checkpoint's bytes on stdout and nothing else, once its integrity is checked."""
    if sys.stdout.isatty():
        raise CliError(2, f"not writing the binary checkpoint {args.url} to a terminal: redirect (> FILE) or pipe it")
    (saver, name), start = _object(args.url), time.monotonic()
    with tempfile.TemporaryFile(prefix="ckptcloud-") as file:  # checked whole before any byte reaches stdout
        size = _download(saver, name, file, _Bar("get", args.quiet))
        try:
            check = _integrity(file, args.url)
        except IntegrityError as err:
            raise CliError(1, f"{err}; nothing was written to stdout") from err
        file.seek(0)
        sys.stdout.flush()
        try:
            shutil.copyfileobj(file, sys.stdout.buffer, 8 * MiB)
            sys.stdout.buffer.flush()
        except BrokenPipeError as err:  # the reader went away (e.g. `| head -c`): no second error at exit
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            raise CliError(1, f"stdout was closed before all of {args.url} was written to it") from err
    elapsed = time.monotonic() - start
    print(f"{args.url} -> stdout ({human_size(size)}, {elapsed:.1f} s): {check}", file=sys.stderr)


def _put(args: argparse.Namespace) -> None:
    src, start = Path(args.src), time.monotonic()
    if not src.is_file():
        raise FileNotFoundError(f"no file at {src}")
    url = args.url + src.name if args.url.endswith("/") else args.url
    saver, name = _object(url, create=True, must_exist=False)
    with open(src, "rb") as file:
        check = _integrity(file, str(src))  # a damaged checkpoint is refused before anything is uploaded
    bar = _Bar("put", args.quiet)
    _upload(saver, name, src, bar)
    bar.close()
    print(f"{src} -> {url} ({human_size(src.stat().st_size)}, {time.monotonic() - start:.1f} s): {check}")


def _rm(args: argparse.Namespace) -> None:
    if _is_folder(args.url):
        sharded.remove(args.url, lambda question: _confirm(question, args.yes))
        return
    saver, name = _object(args.url)
    _confirm(f"delete {args.url}", args.yes)
    saver.remove(name)
    print(f"deleted {args.url}")


_POLICY_FLAGS = "--keep-best, --keep-latest, --keep-every-steps, --keep-every-seconds"
_ROW_FIELDS = {"priority": "score", "step": "step", "time": "saved_at"}  # what each policy field is in a listing row


def _policy(args: argparse.Namespace) -> Policy | None:
    """The retention policy the --keep-* flags build, ``None`` without them; with them, --keep and --by are refused."""
    parts: list[Policy] = []
    for value, make in (
        (args.keep_best, BestN),
        (args.keep_latest, LatestN),
        (args.keep_every_steps, EveryNSteps),
        (args.keep_every_seconds, EveryNSeconds),
    ):
        if value is not None:
            parts.append(make(value))
    if parts and (args.keep is not None or args.by is not None):
        raise CliError(2, f"--keep and --by cannot be combined with {_POLICY_FLAGS}: use one or the other")
    if not parts and args.keep is None:
        raise CliError(2, f"prune needs --keep N (ranked --by score or step), or one or more of {_POLICY_FLAGS}")
    return AnyOf(*parts) if parts else None


def _series_rows(args: argparse.Namespace, rows: list[dict[str, Any]], ranked: Callable[[dict], bool]) -> list[dict]:
    """``rows`` of the one series to prune (``--series``); a usage error if the rankable ones span several."""
    if args.series is not None:
        rows = [r for r in rows if args.series in (r["base"], r["series"])]
        if not rows:
            raise CliError(3, f"no checkpoints of series {args.series!r} under {args.url}")
    series = sorted({r["series"] for r in rows if ranked(r)})
    if len(series) > 1:  # ranking two series on one scale would delete the best of one of them
        raise CliError(
            2,
            f"{args.url} holds {len(series)} series of checkpoints: {', '.join(series)}. Prune one at a time: "
            f"--series NAME (e.g. --series {next(r['base'] for r in rows if r['series'] == series[0])!r})",
        )
    return rows


def _prune(args: argparse.Namespace) -> None:
    policy = _policy(args)  # usage errors before any request
    saver = _folder_saver(args.url)
    rows = sharded.with_folders(saver, listing_rows(saver, with_saved_at=policy is not None), with_saved_at=True)
    if policy is None:  # --keep N --by score|step: only checkpoints whose score (or step) is known are candidates
        by = args.by or "score"
        rows = _series_rows(args, rows, lambda r: r[by] is not None)
        ranked = sorted((r for r in rows if r[by] is not None), key=lambda r: (r[by], r["time"] or ""), reverse=True)
        keep, drop, unknown, shown = ranked[: args.keep], ranked[args.keep :], by, [by]
    else:  # only checkpoints with every field the policy reads are candidates: nothing unranked is deleted
        needed = sorted({_ROW_FIELDS[field] for field in policy.needs})
        rows = _series_rows(args, rows, lambda r: all(r[k] is not None for k in needed))
        ranked = sorted(
            (r for r in rows if all(r[k] is not None for k in needed)),
            key=lambda r: (r["step"] is not None, r["step"] or 0, r["saved_at"] or 0.0),
            reverse=True,
        )
        kept = policy(CheckpointInfo(r["name"], r["step"], r["saved_at"], r["score"], r["score"]) for r in ranked)
        keep, drop = [r for r in ranked if r["name"] in kept], [r for r in ranked if r["name"] not in kept]
        unknown = " or ".join("save time" if k == "saved_at" else k for k in needed)
        shown = ["step", "score"]
        print(f"policy: {policy!r}")
    for verb, group in (("keep", keep), ("would delete" if args.dry_run else "delete", drop)):
        for row in group:
            print(f"{verb}  {row['name']}  ({', '.join(f'{k}={row[k]}' for k in shown if row[k] is not None)})")
    candidates = {r["name"] for r in keep} | {r["name"] for r in drop}
    if unranked := [r["name"] for r in rows if r["name"] not in candidates]:
        print(f"left alone (no {unknown} known): {', '.join(unranked)}", file=sys.stderr)
    if not drop or args.dry_run:
        print("nothing deleted" + (" (dry run)" if args.dry_run else ""))
        return
    _confirm(f"delete {len(drop)} checkpoint(s) under {args.url}", args.yes)
    sharded.delete(saver, [row["name"] for row in drop])  # folders whole, .metadata first
    print(f"deleted {len(drop)} checkpoint(s), kept {len(keep)}")


def _is_folder(url: str) -> bool:
    """Whether ``url`` names a sharded checkpoint folder (committed or not): ``URL/`` with a ``.metadata`` or
    ``*.distcp`` file under it, or an object URL that names no object but such a folder."""
    if url.endswith("/"):
        return sharded.is_folder(url)  # else: "names no object", as for any URL ending in '/'
    try:
        _object(url)
    except FileNotFoundError:
        return sharded.is_folder(url)
    return False


def _verify(args: argparse.Namespace) -> None:
    if _is_folder(args.url):
        sharded.verify(args.url)
        return
    (saver, name), url = _object(args.url), args.url
    with tempfile.TemporaryFile(prefix="ckptcloud-") as file:
        _download(saver, name, file, _Bar("verify", args.quiet))
        print(f"{url}: {_integrity(file, url)}")
        try:
            obj = serialization.load(file, weights_only=True, map_location="cpu", name=url)
        except Exception as err:
            raise CliError(1, f"load refused: {err}" if url in str(err) else f"{url}: load refused: {err}") from err
    tensors = [t for t in tree_leaves(obj) if isinstance(t, torch.Tensor)]
    print(f"{url}: loads with weights_only=True ({len(tensors)} tensors, {human_size(sum(t.nbytes for t in tensors))})")


def _convert(args: argparse.Namespace) -> None:
    src_is_folder = args.src.endswith("/") or _is_folder(args.src)  # SRC/ is a folder, whatever is (not) there
    sharded.convert(args.src, args.dst, src_is_folder=src_is_folder, batch_mib=args.batch_mib)


def _cleanup(args: argparse.Namespace) -> None:
    saver = _folder_saver(args.url)
    removed = saver.cleanup_incomplete(older_than=args.older_than)
    for item in removed:
        print(f"discarded {item}")
    print(f"{len(removed)} incomplete upload(s) older than {args.older_than:g} s discarded under {args.url}")
    sharded.cleanup(saver, args.url, args.older_than)


def _count(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}")
    return int(text)


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return int(text)


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"expected a number of seconds > 0, got {text!r}")
    return value


def _parser() -> argparse.ArgumentParser:
    epilog = __doc__.split("\n\n")[1]
    parser = argparse.ArgumentParser(prog="ckptcloud", description="Manage checkpoints in storage.", epilog=epilog)
    parser.add_argument("--version", action="version", version=f"ckptcloud {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    def add(name: str, run: Callable[[argparse.Namespace], None], text: str, *positional: str) -> Any:
        cmd = sub.add_parser(name, help=text, description=text)
        cmd.set_defaults(run=run)
        for arg in positional:
            cmd.add_argument(arg, metavar=arg.upper())
        return cmd

    ls_text = "list the checkpoints under URL (a sharded folder is one entry, NAME/)"
    add("ls", _ls, ls_text, "url").add_argument("--json", action="store_true")
    for cmd in (
        add(
            "get",
            _get,
            "download one object to DEST, a file or folder, or '-' for stdout (integrity checked)",
            "url",
            "dest",
        ),
        add("put", _put, "upload a local file as the object at URL (streamed in parts)", "src", "url"),
        add(
            "verify",
            _verify,
            "check the integrity trailer, then torch.load(weights_only=True); for a sharded folder URL/, every "
            "file's size and CRC32C",
            "url",
        ),
    ):
        cmd.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    rm_text = "delete one object, or a sharded checkpoint folder URL/ whole"
    add("rm", _rm, rm_text, "url").add_argument("--yes", "-y", action="store_true", help="do not ask")
    prune = add(
        "prune",
        _prune,
        "keep the N best (or latest) *.pt checkpoints and committed sharded folders under URL, or what a retention "
        "policy keeps (--keep-best, "
        "--keep-latest, --keep-every-steps, --keep-every-seconds: a checkpoint is kept if any keeps it); delete "
        "the others",
        "url",
    )
    prune.add_argument("--keep", type=_count, metavar="N", help="how many checkpoints to keep")
    prune.add_argument("--by", choices=["score", "step"], help="with --keep: highest score (default) or step")
    policy_flags = (
        ("--keep-best", _positive, "N", "keep the N with the highest score (ties: the newer)"),
        ("--keep-latest", _positive, "N", "keep the N with the highest step (then the latest save time)"),
        ("--keep-every-steps", _positive, "K", "keep every checkpoint whose step is a multiple of K"),
        ("--keep-every-seconds", _seconds, "S", "keep at most one per S seconds of save time, oldest first"),
    )
    for flag, kind, metavar, text in policy_flags:
        prune.add_argument(flag, type=kind, metavar=metavar, help=text)
    prune.add_argument(
        "--series",
        metavar="NAME",
        help="prune only this series (its filename prefix and object name, e.g. best_model); required when "
        "several series share the folder",
    )
    prune.add_argument("--dry-run", action="store_true", help="print what would be deleted, delete nothing")
    prune.add_argument("--yes", "-y", action="store_true", help="do not ask for confirmation")
    cleanup = add(
        "cleanup",
        _cleanup,
        "discard incomplete uploads a killed process left under URL, and sharded checkpoint folders never committed",
        "url",
    )
    cleanup.add_argument("--older-than", type=float, default=3600.0, metavar="SECONDS", help="default: 3600")
    convert = add(
        "convert",
        _convert,
        "stream a sharded checkpoint folder (SRC/) into one torch.save file DST, or a file SRC into a sharded "
        "folder DST; any store to any store",
        "src",
        "dst",
    )
    convert.add_argument("--batch-mib", type=_positive, default=64, metavar="MIB", help="tensor MiB loaded at once")
    _cli_dedup.register(add)
    sub.add_parser("demo", help="train, checkpoint to a local S3 server, restore (see 'ckptcloud demo -h')")
    return parser


def _version() -> str:
    """The installed distribution's version, else the package's ``__version__`` (a source checkout)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("ckptcloud")
    except PackageNotFoundError:
        import ckptcloud

        return str(getattr(ckptcloud, "__version__", "unknown"))


def _exit_code(err: BaseException) -> int:
    chain = (err, err.__cause__, getattr(err, "cause", None))  # ``cause``: google.api_core's RetryError
    names = {cls.__name__ for e in chain if isinstance(e, BaseException) for cls in type(e).__mro__}
    if isinstance(err, (CliError, sharded.FolderError)):
        return err.code
    if isinstance(err, FileNotFoundError):
        return 3
    if isinstance(err, PermissionError) or names & _CREDENTIALS:
        return 4
    if isinstance(err, (ValueError, ImportError)) and "credential" in str(err):
        return 4  # Azure without a connection string, account URL or credential
    if isinstance(err, (ConnectionError, TimeoutError)) or names & {"ConnectionError", "Timeout"}:
        return 5
    bad_input = isinstance(err, (ValueError, TypeError, ImportError)) or "ParamValidationError" in names
    return 2 if bad_input and not isinstance(err, CkptcloudError) else 1


def main(argv: list[str] | None = None) -> int:
    """Run ``ckptcloud COMMAND ...``; returns the exit code."""
    args = sys.argv[1:] if argv is None else list(argv)
    if args[:1] == ["demo"]:
        from ckptcloud.demo import main as demo_main

        return demo_main(args[1:])
    parser = _parser()
    try:
        ns = parser.parse_args(args)
    except SystemExit as exit_:
        return exit_.code if isinstance(exit_.code, int) else 2
    if ns.command is None:
        parser.print_help(sys.stderr)
        return 2
    try:
        ns.run(ns)
        return 0
    except KeyboardInterrupt:
        print("ckptcloud: interrupted", file=sys.stderr)
        return 130
    except Exception as err:
        if os.environ.get("CKPTCLOUD_DEBUG"):
            raise
        known = type(err).__module__ in ("builtins", "ckptcloud.errors", __name__, sharded.__name__) and str(err)
        notes = "".join(f" ({note.removeprefix('ckptcloud: ')})" for note in getattr(err, "__notes__", []))
        print(f"ckptcloud: {err if known else f'{type(err).__name__}: {err}'}{notes}", file=sys.stderr)
        return _exit_code(err)
