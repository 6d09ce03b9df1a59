"""Sharded checkpoints (torch.distributed.checkpoint) on S3, side by side: ckptcloud's DCP writer/reader,
s3torchconnector's, DCP's fsspec one over s3fs, and ckptcloud's single file through rank 0.

Every case starts ``world`` fresh rank processes, torchrun style (gloo on CPU, a free port), against a SeaweedFS
started here (a fresh one per size, round and world: 4 cases); each rank holds its ``1/world`` share of the state
(128 MiB float32 ``DTensor``s sharded on dim 0), saves it and loads it back (:mod:`sharded_cases`). Rounds go
round-robin over the methods; the report gives medians with min-max and ratios to the best method. Needs ``.venv``
(``bash scripts/bootstrap.sh dev,bench``) and, for the fsspec method, ``.venv-fsspec``
(``CKPTCLOUD_VENV=.venv-fsspec bash scripts/bootstrap.sh bench-fsspec``)::

    .venv/bin/python benchmarks/sharded.py --out docs/benchmarks   # 1 GiB x3 rounds, 4 GiB x1, worlds 2 and 4 (~40 min)
    .venv/bin/python benchmarks/sharded.py --sizes 1024 --no-count   # the 1 GiB rounds only (~20 min)
    .venv/bin/python benchmarks/sharded.py --quick            # smoke: 1 GiB, world 2, 1 round, no request count
    .venv/bin/python benchmarks/sharded.py --sizes 1024 --worlds 4 --rounds 5 --methods ckptcloud,fsspec
    .venv/bin/python benchmarks/sharded.py --report-only --out docs/benchmarks   # re-render sharded.md

Time on the shared 2-core machine here (load average 9-13 from other jobs): ~40-45 s per 1 GiB case (a save and a
load of every rank; 24 cases), ~80 s per 4 GiB case (8 cases, one round), ~50 s per request count (8): about 40 min
in all, so 4 GiB gets one round by default (``--big-rounds``) and has no min-max range.

Methods (clients made before the clock starts; library defaults otherwise):

- ``ckptcloud``: ``dcp.save``/``dcp.load`` with ``ckptcloud.dcp.CloudStorageWriter``/``CloudStorageReader``;
- ``s3torchconnector``: ``dcp.save``/``dcp.load`` with ``S3StorageWriter``/``S3StorageReader`` (path style);
- ``fsspec``: ``dcp.save``/``dcp.load`` with DCP's ``FsspecWriter``/``FsspecReader`` over s3fs (ranks run with
  ``--fsspec-python``);
- ``ckptcloud-rank0``: save = ``dist.gather`` of every shard into full tensors on rank 0, then one ``torch.save``
  file through ``S3Saver`` (only rank 0 uploads); load = ``S3Saver.load(mmap=True)`` on rank 0, then
  ``dist.scatter`` of each tensor's row blocks. Both timed from a barrier to the end of the last collective.

Request counts come from a separate, untimed pass (1 GiB, every world, one run per method) through a counting
proxy (:class:`~ckptcloud.testing.faultproxy.FaultProxy`); the timed rounds talk to SeaweedFS directly.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # ckptcloud from this checkout

MiB = 1024 * 1024
ROOT = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).with_name("sharded_cases.py")
METHODS = ["ckptcloud", "s3torchconnector", "fsspec", "ckptcloud-rank0"]
PHASES = ("save", "load")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _kill(processes: list[subprocess.Popen]) -> None:
    """SIGKILL every rank still running (each in its own session: its children too)."""
    for process in processes:
        if process.poll() is None:
            try:
                os.killpg(process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    for process in processes:
        process.wait()


def run_case(spec: dict, python: str, world: int, timeout: float) -> list[dict]:
    """Start ``world`` ranks of :mod:`sharded_cases` with ``spec``; each rank's result (killed after ``timeout``)."""
    with tempfile.TemporaryDirectory(prefix="ckptcloud-sharded-") as out:
        spec = {**spec, "out": out}
        port = _free_port()
        processes = []
        logs = []
        try:
            for rank in range(world):
                env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1",
                       "PYTHONPATH": str(ROOT)}  # fmt: skip
                log = open(Path(out) / f"rank{rank}.log", "w+b")
                logs.append(log)
                processes.append(subprocess.Popen([python, str(WORKER), json.dumps(spec)], env=env, stdout=log,
                                                  stderr=subprocess.STDOUT, start_new_session=True))  # fmt: skip
            deadline = time.monotonic() + timeout
            while any(p.poll() is None for p in processes):
                failed = [p for p in processes if p.poll() not in (None, 0)]
                if failed or time.monotonic() > deadline:
                    break  # one rank failed (the others wait in a collective) or the case is stuck
                time.sleep(0.2)
        finally:
            _kill(processes)
        results, errors = [], []
        for rank, (process, log) in enumerate(zip(processes, logs, strict=True)):
            log.seek(0)
            text = log.read().decode(errors="replace")
            log.close()
            path = Path(out) / f"rank{rank}.json"
            result = json.loads(path.read_text()) if path.exists() else {"crash": f"exit {process.returncode}"}
            if "crash" in result or process.returncode != 0:
                errors.append(f"rank {rank} (exit {process.returncode}): {result.get('crash', '')}\n{text[-2000:]}")
            noted = [line for line in text.splitlines() if "WARNING" in line or "etry" in line or "rror" in line]
            if noted:  # retries and warnings: what explains an outlier (kept in sharded.json)
                result["log"] = noted[-20:]
            results.append(result)
        if errors:
            raise RuntimeError(f"{spec['method']} world {world} {spec['size']} MiB failed:\n" + "\n".join(errors))
        return results


def summarize(results: list[dict]) -> dict:
    """One case from its ranks: seconds and peak extra memory are the max over ranks, CPU seconds the sum."""
    summary: dict = {
        phase: {
            "s": max(r[phase]["s"] for r in results),
            "extra": max(r[phase]["extra"] for r in results),
            "cpu": sum(r[phase]["cpu"] for r in results),
        }
        for phase in PHASES
    }
    log = [f"rank {rank}: {line}" for rank, r in enumerate(results) for line in r.get("log", [])]
    if log:
        summary["log"] = log
    return summary


class Bench:
    """Runs cases against one S3 endpoint and bucket; deletes each case's objects afterwards (untimed)."""

    def __init__(self, endpoint: str, args: argparse.Namespace) -> None:
        import boto3
        from botocore.config import Config

        self.endpoint, self.args = endpoint, args
        self.bucket = f"sharded-{uuid.uuid4().hex[:8]}"
        config = Config(s3={"addressing_style": "path"})
        self.client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", config=config)
        self.client.create_bucket(Bucket=self.bucket)

    def case(self, method: str, world: int, size: int, endpoint: str | None = None) -> list[dict]:
        prefix = f"{method}-w{world}-{size}-{uuid.uuid4().hex[:6]}"
        spec = {"method": method, "size": size, "endpoint": endpoint or self.endpoint, "bucket": self.bucket,
                "prefix": prefix}  # fmt: skip
        python = self.args.fsspec_python if method == "fsspec" else sys.executable
        timeout = 120 + size / 1024 * 240  # generous: ~10x a save and a load at ~100 MB/s
        try:
            return run_case(spec, python, world, timeout)
        finally:
            self.delete_prefix(prefix)

    def delete_prefix(self, prefix: str) -> None:
        paginator = self.client.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=self.bucket, Prefix=prefix + "/"):
            keys = [{"Key": obj["Key"]} for obj in page.get("Contents", [])]
            if keys:
                self.client.delete_objects(Bucket=self.bucket, Delete={"Objects": keys, "Quiet": True})
        uploads = self.client.list_multipart_uploads(Bucket=self.bucket, Prefix=prefix + "/").get("Uploads", [])
        for upload in uploads:  # a failed case's unfinished uploads
            self.client.abort_multipart_upload(Bucket=self.bucket, Key=upload["Key"], UploadId=upload["UploadId"])


def count_requests(bench: Bench, port: int, methods: list[str], worlds: list[int], size: int) -> dict:
    """Requests by HTTP method per (method, world) at ``size``, through a counting proxy (untimed)."""
    from ckptcloud.testing.faultproxy import FaultProxy

    counts: dict = {}
    for world in worlds:
        for method in methods:
            seen: collections.Counter = collections.Counter()
            with FaultProxy(port, on_request=lambda n, verb, target, seen=seen: seen.update([verb])) as proxy:
                bench.case(method, world, size, endpoint=proxy.endpoint)
            counts[f"{method}|{world}"] = dict(seen)
            print(f"  requests {method:>16} world {world}: {dict(sorted(seen.items()))}", flush=True)
    return counts


def _stats(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def _cell(stat: dict, scale: float = 1.0, digits: int = 2) -> str:
    median, low, high = stat["median"] / scale, stat["min"] / scale, stat["max"] / scale
    if stat["n"] == 1:
        return f"{median:.{digits}f}"
    return f"{median:.{digits}f} ({low:.{digits}f}-{high:.{digits}f})"


def _ratio(stat: dict, best: dict, lower_is_better: bool = True) -> str:
    """The median's ratio to the best method's median; "within noise" when the min-max ranges overlap."""
    if stat is best:
        return "best"
    ratio = stat["median"] / best["median"] if best["median"] else float("inf")
    overlap = stat["n"] > 1 and best["n"] > 1 and stat["min"] <= best["max"] and best["min"] <= stat["max"]
    return f"{ratio:.2f}x" + (" (within noise)" if overlap else "")


def table(runs: dict, counts: dict, methods: list[str], configs: list[tuple[int, int]]) -> str:
    """The markdown table: per config and method, medians (min-max) and ratios to the best method."""
    head = ("| world | size | method | rounds | save s | save vs best | load s | load vs best | save peak extra MiB "
            "| load peak extra MiB | save CPU s | load CPU s | requests, save + load (count pass) |")  # fmt: skip
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for size, world in configs:
        stats: dict = {}
        for method in methods:
            rounds = runs.get(f"{method}|{world}|{size}", [])
            if rounds:
                stats[method] = {f"{phase}.{k}": _stats([r[phase][k] for r in rounds])
                                 for phase in PHASES for k in ("s", "extra", "cpu")}  # fmt: skip
        if not stats:
            continue
        best = {phase: min((s[f"{phase}.s"] for s in stats.values()), key=lambda s: s["median"]) for phase in PHASES}
        for method, s in stats.items():
            count = counts.get(f"{method}|{world}") if size == min(c[0] for c in configs) else None
            requests = ", ".join(f"{verb} {n}" for verb, n in sorted(count.items())) if count else "-"
            lines.append(
                f"| {world} | {size / 1024:g} GiB | {method} | {s['save.s']['n']} | {_cell(s['save.s'])} | "
                f"{_ratio(s['save.s'], best['save'])} | {_cell(s['load.s'])} | {_ratio(s['load.s'], best['load'])} | "
                f"{_cell(s['save.extra'], MiB, 0)} | {_cell(s['load.extra'], MiB, 0)} | {_cell(s['save.cpu'], 1, 1)} | "
                f"{_cell(s['load.cpu'], 1, 1)} | {requests} |"
            )
    return "\n".join(lines)


ALTERNATIVES = ("s3torchconnector", "fsspec")  # the other DCP storage layers


def versus_alternatives(runs: dict, methods: list[str], configs: list[tuple[int, int]]) -> str:
    """ckptcloud's DCP writer/reader against the best alternative DCP storage layer, per world and size."""
    others = [m for m in ALTERNATIVES if m in methods]
    if "ckptcloud" not in methods or not others:
        return ""
    head = "| world | size | save: ckptcloud / best alternative | load: ckptcloud / best alternative |"
    lines = [head, "|---|---|---|---|"]
    for size, world in configs:
        cells = []
        for phase in PHASES:
            stats = {m: _stats([r[phase]["s"] for r in runs.get(f"{m}|{world}|{size}", [])])
                     for m in ["ckptcloud", *others] if runs.get(f"{m}|{world}|{size}")}  # fmt: skip
            if "ckptcloud" not in stats or len(stats) < 2:
                cells.append("-")
                continue
            best = min((m for m in stats if m != "ckptcloud"), key=lambda m: stats[m]["median"])
            cells.append(f"{_ratio(stats['ckptcloud'], stats[best])} ({best})")
        lines.append(f"| {world} | {size / 1024:g} GiB | {cells[0]} | {cells[1]} |")
    return "\n".join(lines)


def write_report(args: argparse.Namespace, info: dict, runs: dict, counts: dict, done: bool) -> str:
    """Write ``sharded.md`` and ``sharded.json`` into ``args.out`` (also after every case: a cut run keeps its data)."""
    stamp, machine, rounds, methods, configs, minutes = (info[k] for k in ("stamp", "machine", "rounds", "methods",
                                                                         "configs", "minutes"))  # fmt: skip
    count_size = min(rounds)
    notes = [
        f"Measured {stamp} on {machine} (shared, noisy: read ratios and ranges, not absolute seconds); SeaweedFS "
        f"(`weed mini`) on loopback; gloo on CPU, one process per rank, `OMP_NUM_THREADS=1`; the run took "
        f"{minutes:.1f} min{'' if done else ' so far (cut short: partial)'}. Rounds per size: "
        + ", ".join(f"{size / 1024:g} GiB x {n}" for size, n in rounds.items())
        + " (round-robin over the methods; sizes over 1 GiB get one round by default to fit the run in ~20 min on "
        "2 cores: their cells have no range).",
        "",
        "Cells: median (min-max) over rounds. Seconds: wall, max over ranks, from a barrier to the end of the "
        "operation on every rank. Peak extra: max over ranks of VmHWM minus RSS just before the operation (the "
        "state, or for loads the zeroed tensors loaded into, already built). CPU: user+system seconds summed over "
        "ranks (the clients' threads included, the server's not). \"vs best\": the median's ratio to the best "
        'median of that world and size; "within noise" when the min-max ranges overlap.',
        "",
        f"Requests: a separate untimed pass at {count_size / 1024:g} GiB, one run per method and world, every request "
        "through a counting proxy; the save and the load together.",
        "",
        *([info["note"], ""] if info.get("note") else []),
    ]
    versus = versus_alternatives(runs, methods, configs)
    text = "\n".join(["## Sharded checkpoints (DCP) on S3: SeaweedFS", "", *notes,
                      table(runs, counts, methods, configs), "",
                      *(["ckptcloud (DCP) against the best other DCP storage layer, ratio of medians (< 1: "
                         "ckptcloud faster):", "", versus, ""] if versus else [])])  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "sharded.md").write_text(text)
    raw = {"when": stamp, "machine": machine, "minutes": minutes, "complete": done,
           "rounds": {str(k): v for k, v in rounds.items()}, "methods": methods, "runs": runs,
           "requests": counts, **({"note": info["note"]} if info.get("note") else {})}  # fmt: skip
    (args.out / "sharded.json").write_text(json.dumps(raw, indent=1))
    return text


@contextlib.contextmanager
def fresh_bench(servers: Any, args: argparse.Namespace) -> Iterator[tuple[Any, Bench]]:
    """A SeaweedFS started for the block (its volumes made by a first write, untimed), and its :class:`Bench`."""
    server = servers.start_seaweedfs()
    try:
        bench = Bench(server.endpoint, args)
        bench.client.put_object(Bucket=bench.bucket, Key="warm-up", Body=b"x" * MiB)
        yield server, bench
    finally:
        server.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smoke test: 1 GiB, world 2, 1 round, no request count")
    parser.add_argument("--sizes", default="1024,4096", help="total state sizes in MiB")
    parser.add_argument("--worlds", default="2,4", help="world sizes")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of sizes up to 1 GiB")
    parser.add_argument("--big-rounds", type=int, default=1, help="rounds of sizes over 1 GiB (time: see the docs)")
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of " + ",".join(METHODS))
    parser.add_argument("--fsspec-python", default=str(ROOT / ".venv-fsspec/bin/python"),
                        help="python with torch and s3fs, for the fsspec ranks")  # fmt: skip
    parser.add_argument("--no-count", action="store_true", help="skip the request-count pass")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"), help="folder for sharded.md/json")
    parser.add_argument("--report-only", action="store_true", help="rewrite sharded.md from --out's sharded.json")
    args = parser.parse_args()
    if args.report_only:
        raw = json.loads((args.out / "sharded.json").read_text())
        keys = [key.split("|") for key in raw["runs"]]
        info = {**raw, "stamp": raw["when"], "rounds": {int(k): v for k, v in raw["rounds"].items()},
                "configs": sorted({(int(size), int(world)) for _, world, size in keys})}  # fmt: skip
        print(write_report(args, info, raw["runs"], raw["requests"], done=raw.get("complete", True)))
        return 0
    if args.quick:
        args.sizes, args.worlds, args.rounds, args.big_rounds, args.no_count = "1024", "2", 1, 1, True
    for name, value in (("AWS_ACCESS_KEY_ID", "bench"), ("AWS_SECRET_ACCESS_KEY", "bench"),
                        ("AWS_DEFAULT_REGION", "us-east-1")):  # fmt: skip
        os.environ.setdefault(name, value)
    methods = args.methods.split(",")
    if "fsspec" in methods and not Path(args.fsspec_python).exists():
        print(f"fsspec skipped: no {args.fsspec_python} (CKPTCLOUD_VENV=.venv-fsspec bash scripts/bootstrap.sh "
              "bench-fsspec)")  # fmt: skip
        methods.remove("fsspec")
    sizes, worlds = [int(s) for s in args.sizes.split(",")], [int(w) for w in args.worlds.split(",")]
    configs = [(size, world) for size in sizes for world in worlds]
    rounds = {size: args.rounds if size <= 1024 else args.big_rounds for size in sizes}
    machine = (f"{platform.machine()}, {os.cpu_count()} cores, "
               f"{os.sysconf('SC_PHYS_PAGES') * os.sysconf('SC_PAGE_SIZE') / 1024**3:.0f} GiB, "
               f"Python {platform.python_version()}")  # fmt: skip
    stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    print(f"# ckptcloud sharded benchmark, {stamp}, {machine}", flush=True)

    from ckptcloud.testing import servers

    info = {"stamp": stamp, "machine": machine, "rounds": rounds, "methods": methods, "configs": configs}

    started = time.monotonic()
    runs: dict = collections.defaultdict(list)
    counts: dict = {}
    # sizes in turn (1 GiB's rounds first); each round goes over the methods, starting one later each round. A
    # fresh SeaweedFS per (size, round, world): its RSS grows with what it has stored (7 GB after ~25 GiB written
    # and deleted here, when the kernel's OOM killer ended it), so no server outlives 4 cases
    for size, round_, world in [(z, r, w) for z in sizes for r in range(rounds[z]) for w in worlds]:
        with fresh_bench(servers, args) as (server, bench):
            shift = round_ % len(methods)
            for method in methods[shift:] + methods[:shift]:
                result = summarize(bench.case(method, world, size))
                runs[f"{method}|{world}|{size}"].append(result)
                s, l_ = result["save"], result["load"]
                print(f"  round {round_ + 1} world {world} {size:>5} MiB {method:>16}: save {s['s']:6.2f} s "
                      f"(+{s['extra'] / MiB:5.0f} MiB, cpu {s['cpu']:5.1f} s)  load {l_['s']:6.2f} s "
                      f"(+{l_['extra'] / MiB:5.0f} MiB, cpu {l_['cpu']:5.1f} s)", flush=True)  # fmt: skip
                info["minutes"] = (time.monotonic() - started) / 60
                write_report(args, info, runs, counts, done=False)
    if not args.no_count:
        for world in worlds:
            with fresh_bench(servers, args) as (server, bench):
                counts.update(count_requests(bench, server.port, methods, [world], min(sizes)))
    info["minutes"] = (time.monotonic() - started) / 60
    text = write_report(args, info, runs, counts, done=True)
    print()
    print(text)

    print(f"\nwrote {args.out}/sharded.md, sharded.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
