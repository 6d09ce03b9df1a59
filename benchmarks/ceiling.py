"""The clients' own ceiling: save and load through an S3 server that is not the bottleneck (``sink_server``).

On loopback SeaweedFS spends ~12 CPU-s per GiB, so on 2 cores every client runs at its pace and rankings are within
noise. Here the server is :mod:`benchmarks.sink_server` (objects in RAM, no per-byte Python work) in its own
process, so what is left is each client's own cost: wall GiB/s and the client process's CPU seconds per GiB.

    python benchmarks/ceiling.py                    # 1 and 4 GiB, 3 interleaved rounds; writes --out
    python benchmarks/ceiling.py --quick            # 256 MiB, 1 round (a smoke run, ~1 min)
    python benchmarks/ceiling.py --sizes 1024 --rounds 5 --methods ckptcloud,s3torchconnector,floor

Methods (each case a fresh process, :mod:`benchmarks.cases`): ``ckptcloud`` (``S3Saver`` / ``saver.load``),
``s3torchconnector`` (``S3Checkpoint`` writer/reader), ``upload_fileobj`` (``torch.save`` into ``BytesIO`` +
boto3's ``upload_fileobj``; ``download_fileobj`` into ``BytesIO`` + ``torch.load``), ``dcp-s3torchconnector``
(``dcp.save``/``dcp.load`` in one process through ``S3StorageWriter``/``S3StorageReader``) and ``floor``
(``torch.save`` into a sink that discards; ``torch.load`` of a tmpfs file). Rounds are round-robin: every method
once per round (the starting method rotates), so a slow spell of the shared machine hits all of them.

Reported per method, size and phase: median and min-max of GiB/s and of client CPU-s per GiB, the ratio of
medians to the best other client (``x best alt``; "within noise" when the min-max ranges overlap), and the ratio
of its time to the serialization floor's.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # ckptcloud and benchmarks from this checkout

from benchmarks.sink_server import start_sink

MiB = 1024 * 1024
CASES = Path(__file__).with_name("cases.py")
CLIENTS = ["ckptcloud", "s3torchconnector", "upload_fileobj", "dcp-s3torchconnector"]
METHODS = [*CLIENTS, "floor"]
LABELS = {
    "ckptcloud": "ckptcloud `S3Saver` / `saver.load`",
    "s3torchconnector": "s3torchconnector `S3Checkpoint`",
    "upload_fileobj": "boto3 `upload_fileobj` / `download_fileobj` (BytesIO)",
    "dcp-s3torchconnector": "DCP + s3torchconnector `S3StorageWriter`/`Reader`",
    "floor": "floor: `torch.save` to a discarding sink / `torch.load` from tmpfs",
}


def _proc_cpu(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Ceiling:
    """Runs cases against one sink server; every case a fresh process."""

    def __init__(self, endpoint: str, server_pid: int | None, concurrency: int | None) -> None:
        import boto3
        from botocore.config import Config

        self.endpoint, self.server_pid, self.concurrency = endpoint, server_pid, concurrency
        self.bucket = f"ceiling-{uuid.uuid4().hex[:8]}"
        config = Config(s3={"addressing_style": "path"})
        self.client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", config=config)
        self.client.create_bucket(Bucket=self.bucket)

    def case(self, method: str, size: int, phase: str, tag: str) -> dict:
        spec = {"store": "s3", "method": method, "size": size, "endpoint": self.endpoint, "bucket": self.bucket,
                "phase": phase, "concurrency": self.concurrency, "tag": tag, "fast_state": True}  # fmt: skip
        server = _proc_cpu(self.server_pid) if self.server_pid else None
        env = {**os.environ, "PYTHONPATH": str(CASES.parents[1])}
        out = subprocess.run([sys.executable, str(CASES), json.dumps(spec)], capture_output=True, text=True,
                             timeout=1800, env=env)  # fmt: skip
        if out.returncode != 0:
            why = "killed (SIGKILL: out of memory?)" if out.returncode == -9 else f"exit {out.returncode}"
            raise RuntimeError(f"{method} {size} MiB {phase} failed, {why}:\n{out.stderr[-3000:]}")
        result = json.loads(out.stdout.strip().splitlines()[-1])
        result["server_cpu"] = _proc_cpu(self.server_pid) - server if server is not None else None
        return result

    def clean(self) -> None:
        """Delete everything in the bucket (untimed): the server keeps objects in RAM."""
        pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket)
        keys = [{"Key": o["Key"]} for page in pages for o in page.get("Contents", [])]
        for start in range(0, len(keys), 1000):
            self.client.delete_objects(Bucket=self.bucket, Delete={"Objects": keys[start : start + 1000]})


def run(args: argparse.Namespace) -> dict:
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "ceiling")  # the sink ignores auth; the SDKs want something
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "ceiling")
    stop = None
    if args.endpoint:
        endpoint, pid = args.endpoint, None
    else:
        endpoint, stop = start_sink()
        pid = stop.pid
    runs: list[dict[str, Any]] = []
    started = time.time()
    meta = {
        "measured": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(started)),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
        "server": args.endpoint or "benchmarks/sink_server.py (RAM, separate process)",
        "rounds": args.rounds,
        "concurrency": args.concurrency,
    }
    try:
        bench = Ceiling(endpoint, pid, args.concurrency)
        for rnd in range(args.rounds):
            for size in args.sizes:
                shift = rnd % len(args.methods)
                for method in args.methods[shift:] + args.methods[:shift]:
                    tag = f"r{rnd}-"
                    row: dict[str, Any] = {"round": rnd, "method": method, "size": size}
                    try:
                        for phase in ("save", "load"):
                            row[phase] = bench.case(method, size, phase, tag)
                    except (RuntimeError, subprocess.TimeoutExpired) as err:  # e.g. out of memory: keep going
                        row["error"] = str(err)[-2000:]
                        print(f"round {rnd} {size:5d} MiB {method}: FAILED {str(err)[-300:]}", flush=True)
                    bench.clean()
                    runs.append(row)
                    if args.out:  # what is measured so far, in case the run is cut short
                        args.out.mkdir(parents=True, exist_ok=True)
                        partial = {**meta, "minutes": (time.time() - started) / 60, "runs": runs, "partial": True}
                        (args.out / "ceiling.json").write_text(json.dumps(partial, indent=1))
                    if "error" in row:
                        continue
                    s, ld = row["save"], row["load"]
                    print(
                        f"round {rnd} {size:5d} MiB {method:22s} save {s['s']:6.2f} s cpu {s['cpu']:6.2f} | "
                        f"load {ld['s']:6.2f} s cpu {ld['cpu']:6.2f}",
                        flush=True,
                    )
    finally:
        if stop is not None:
            stop()
    return {**meta, "minutes": (time.time() - started) / 60, "runs": runs}


# --------------------------------------------------------------------------------------------------- report
def _stats(values: list[float]) -> tuple[float, float, float]:
    return statistics.median(values), min(values), max(values)


def summarize(data: dict) -> dict:
    """Per (size, phase, method): GiB/s and CPU-s/GiB as (median, min, max), plus the ratios."""
    out: dict[str, Any] = {}
    sizes = sorted({r["size"] for r in data["runs"]})
    methods = list(dict.fromkeys(r["method"] for r in data["runs"]))
    for size in sizes:
        gib = size / 1024
        for phase in ("save", "load"):
            cells: dict[str, dict[str, Any]] = {}
            for method in methods:
                rows = [r[phase] for r in data["runs"] if r["method"] == method and r["size"] == size and phase in r]
                if not rows:
                    continue
                cells[method] = {
                    "gibps": _stats([gib / r["s"] for r in rows]),
                    "cpu": _stats([r["cpu"] / gib for r in rows]),
                    "s": _stats([r["s"] for r in rows]),
                    "server_cpu": _stats([(r.get("server_cpu") or 0.0) / gib for r in rows]),
                }
            for method, cell in cells.items():
                others = [m for m in cells if m != method and m != "floor"]
                if method != "floor" and others:
                    best = max(others, key=lambda m: cells[m]["gibps"][0])
                    lo, hi = cell["gibps"][1:]
                    blo, bhi = cells[best]["gibps"][1:]
                    cell["best_alt"] = best
                    cell["x_best_alt"] = cell["gibps"][0] / cells[best]["gibps"][0]
                    cell["within_noise"] = lo <= bhi and blo <= hi
                    cheapest = min(others, key=lambda m: cells[m]["cpu"][0])
                    cell["cpu_x_best_alt"] = cell["cpu"][0] / cells[cheapest]["cpu"][0]
                    cell["cpu_best_alt"] = cheapest
                if "floor" in cells and method != "floor":
                    cell["x_floor"] = cell["s"][0] / cells["floor"]["s"][0]
            out[f"{size}/{phase}"] = cells
    return out


def markdown(data: dict) -> str:
    summary = summarize(data)
    lines = [
        "# Client ceiling: S3 clients against a server that is not the bottleneck",
        "",
        f"Measured {data['measured']} on {data['machine']} (shared and noisy: read the ratios and ranges), "
        f"server: {data['server']}; {data['rounds']} interleaved round(s), every case a fresh process; "
        f"the run took {data['minutes']:.1f} min. Made by `python benchmarks/ceiling.py`; raw numbers per round "
        "in `ceiling.json`.",
        "",
        "GiB/s is wall throughput (median [min-max] over rounds); CPU is the client process's user+system seconds "
        'per GiB; `x best alt` is the median GiB/s over the best other client\'s ("within noise" when the '
        "min-max ranges overlap); `CPU x cheapest alt` is the median client CPU over the lowest other client's; "
        "`x floor` is the median time over the serialization floor's (torch.save into a "
        "discarding sink for saves, torch.load of a tmpfs file for loads).",
        "",
    ]
    for key, cells in summary.items():
        size, phase = key.split("/")
        label = f"{int(size) // 1024} GiB" if int(size) >= 1024 else f"{size} MiB"
        lines += [
            f"## {phase} {label}",
            "",
            "| method | GiB/s | CPU s/GiB | x best alt | CPU x cheapest alt | x floor | server CPU s/GiB |",
            "|---|---|---|---|---|---|---|",
        ]
        for method, c in cells.items():
            g, cpu, srv = c["gibps"], c["cpu"], c["server_cpu"]
            alt = ""
            if "x_best_alt" in c:
                alt = f"{c['x_best_alt']:.2f} vs {c['best_alt']}" + (" (within noise)" if c["within_noise"] else "")
            floor = f"{c['x_floor']:.2f}" if "x_floor" in c else ""
            cheap = f"{c['cpu_x_best_alt']:.2f} vs {c['cpu_best_alt']}" if "cpu_x_best_alt" in c else ""
            lines.append(
                f"| {LABELS.get(method, method)} | {g[0]:.2f} [{g[1]:.2f}-{g[2]:.2f}] | "
                f"{cpu[0]:.2f} [{cpu[1]:.2f}-{cpu[2]:.2f}] | {alt} | {cheap} | {floor} | {srv[0]:.2f} |"
            )
        lines.append("")
    failed = [r for r in data["runs"] if "error" in r]
    if failed:
        lines.append(
            "Failed cases (not in the tables): "
            + "; ".join(
                f"round {r['round']} {r['method']} {r['size']} MiB ({r['error'].strip().splitlines()[-1][:160]})"
                for r in failed
            )
        )
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="1024,4096", help="MiB, comma-separated")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--concurrency", type=int, help="ckptcloud's max_concurrency (default: the library's)")
    parser.add_argument("--quick", action="store_true", help="256 MiB, 1 round")
    parser.add_argument("--endpoint", help="an S3 endpoint of your own instead of the sink server")
    parser.add_argument("--out", type=Path, help="folder for ceiling.md and ceiling.json")
    parser.add_argument("--report", type=Path, help="only re-render the table from this ceiling.json")
    args = parser.parse_args(argv)
    if args.report:
        data = json.loads(args.report.read_text())
    else:
        if args.quick:
            args.sizes, args.rounds = "256", 1
        args.sizes = [int(s) for s in str(args.sizes).split(",")]
        args.methods = args.methods.split(",")
        data = run(args)
    text = markdown(data)
    print(text)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "ceiling.json").write_text(json.dumps(data, indent=1))
        (args.out / "ceiling.md").write_text(text + "\n")


if __name__ == "__main__":
    main()
