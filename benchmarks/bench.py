"""Save and load a state dict through ckptcloud and through what users would otherwise write, side by side.

Each case runs in a fresh subprocess (:mod:`cases`) so peak memory is honest; all cases of a store hit the same
emulator, started here, in one run, and the tables print ratios to ckptcloud (shared, noisy machines: trust
ratios, not absolute seconds). ``bash scripts/bench.sh`` installs what this needs and runs everything (~15 min):

    python benchmarks/bench.py                              # S3, GCS and Azure; writes --out
    python benchmarks/bench.py --stores s3 --sizes 256      # one store, one size
    python benchmarks/bench.py --stores wan                 # a short WAN run (benchmarks/wan.py: the full study)
    python benchmarks/bench.py --stores s3 --endpoint http://127.0.0.1:9000   # your MinIO (AWS_* credentials)

Methods: ``ckptcloud`` (streamed multipart save; ranged GETs into a temp file + ``torch.load(mmap=True)``);
``ckptcloud-async`` (``Checkpoint(async_save=True)``: ``blocked`` is the training loop's stall); ``naive``
(``BytesIO`` + one SDK upload / one download into memory + ``torch.load``); ``upload_fileobj`` (S3: boto3's
managed transfer both ways); ``fsspec`` (s3fs/gcsfs/adlfs ``pipe``/``cat``, as Lightning does; run with
``--fsspec-python``); ``s3torchconnector`` (``S3Checkpoint`` writer/reader); ``local`` (``torch.save``/
``torch.load`` of a file in the temp folder: the limit).

WAN simulation: the kernel here has no ``netem``, so the run puts :class:`~ckptcloud.testing.faultproxy.FaultProxy`
between client and SeaweedFS with a fixed latency per request and a bandwidth cap per connection (real S3:
~100 MB/s per connection, tens of ms per request; scaled down here to 10 MB/s so that 16 connections stay below
what the loopback server can take on 2 cores, ~150 MB/s).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import subprocess
import sys
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # ckptcloud from this checkout

from benchmarks import cases, report, stats

MiB = 1024 * 1024
CASES = Path(__file__).with_name("cases.py")
METHODS = {
    "s3": ["ckptcloud", "ckptcloud-async", "naive", "upload_fileobj", "fsspec", "s3torchconnector", "local"],
    "gcs": ["ckptcloud", "ckptcloud-async", "naive", "fsspec", "local"],
    "azure": ["ckptcloud", "ckptcloud-async", "naive", "fsspec", "local"],
}
SIZES = {"s3": [64, 256, 1024], "gcs": [64, 256], "azure": [64, 256, 1024]}  # fake-gcs-server: ≤ 256 MiB
LABELS = {"s3": "SeaweedFS (weed mini)", "gcs": "fake-gcs-server", "azure": "Azurite"}


def _server_cpu(pid: int | None) -> float | None:
    """User+system CPU seconds of the emulator process so far (Linux ``/proc``)."""
    if pid is None:
        return None
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Runner:
    """Runs cases of one store against one endpoint, each in a fresh process."""

    def __init__(self, store: str, endpoint: str, bucket: str, args: argparse.Namespace, pid: int | None) -> None:
        self.store, self.endpoint, self.bucket, self.args, self.pid = store, endpoint, bucket, args, pid
        self.client = cases.sdk_client({"store": store, "endpoint": endpoint, "bucket": bucket})  # untimed chores

    def create_bucket(self) -> None:
        if self.store == "s3":
            self.client.create_bucket(Bucket=self.bucket)
        elif self.store == "gcs":
            self.client.create_bucket(self.bucket)
        else:
            self.client.create_container()

    def delete(self, key: str) -> None:
        """Free the server's disk between cases (untimed)."""
        if self.store == "s3":
            self.client.delete_object(Bucket=self.bucket, Key=key)
        elif self.store == "gcs":
            self.client.bucket(self.bucket).blob(key).delete()
        else:
            self.client.delete_blob(key)

    def measure(self, method: str, size: int, phase: str, concurrency: int | None = None, tag: str = "") -> dict:
        python = self.args.fsspec_python if method == "fsspec" else sys.executable
        spec = {"store": self.store, "method": method, "size": size, "endpoint": self.endpoint,
                "bucket": self.bucket, "phase": phase, "concurrency": concurrency, "tag": tag}  # fmt: skip
        env = {**os.environ, "PYTHONPATH": str(CASES.parents[1]), "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false"}
        server_before = _server_cpu(self.pid)
        out = subprocess.run([python, str(CASES), json.dumps(spec)], capture_output=True, text=True, timeout=900,
                             env=env)  # fmt: skip
        if out.returncode != 0:
            raise RuntimeError(f"{self.store} {method} {size} MiB {phase} failed:\n{out.stderr[-3000:]}")
        result = json.loads(out.stdout.strip().splitlines()[-1])
        server_after = _server_cpu(self.pid)
        result["server_cpu"] = None if server_before is None else server_after - server_before  # type: ignore[operator]
        return result

    def round(self, method: str, size: int, concurrency: int | None = None, tag: str = "") -> dict:
        """One round of one case: save, then load, then delete the object (untimed)."""
        save = self.measure(method, size, "save", concurrency, tag)
        load = self.measure(method, size, "load", concurrency, tag)
        if method != "local":
            self.delete(f"bench/{method}-{tag}{size}.pt")
        return {"save": save, "load": load}


def summarize(runs: list[dict]) -> dict:
    """Per-round results of one case -> ``{"save": medians, "load": medians, "runs": runs}``."""
    return {"save": stats.medians([r["save"] for r in runs]), "load": stats.medians([r["load"] for r in runs]),
            "runs": runs}  # fmt: skip


def start_server(store: str, endpoint: str | None) -> tuple:
    """Start the emulator for ``store`` unless ``endpoint`` is given: (server or None, endpoint)."""
    from ckptcloud.testing import servers

    if endpoint is not None:
        return None, endpoint
    if store == "s3":
        server = servers.start_seaweedfs()
        return server, server.endpoint
    if store == "gcs":
        server = servers.start_fake_gcs()
        return server, server.endpoint
    server = servers.start_azurite()
    return server, server.extra["connection_string"]


def run_store(store: str, args: argparse.Namespace) -> dict:
    sizes = [int(s) for s in args.sizes.split(",")] if args.sizes else SIZES[store]
    methods = [m for m in (args.methods.split(",") if args.methods else METHODS[store]) if m in METHODS[store]]
    if "s3torchconnector" in methods and importlib.util.find_spec("s3torchconnector") is None:
        print(f"  {store}: s3torchconnector skipped (not installed: the bench extra has it)")
        methods.remove("s3torchconnector")
    if "fsspec" in methods and not args.fsspec_python:
        print(f"  {store}: fsspec skipped (pass --fsspec-python; scripts/bench.sh makes .venv-fsspec)")
        methods.remove("fsspec")
    server, endpoint = start_server(store, args.endpoint)
    bucket = f"bench-{uuid.uuid4().hex[:8]}"
    samples: dict = {(m, s): [] for s in sizes for m in methods}
    try:
        runner = Runner(store, endpoint, bucket, args, server.process.pid if server else None)
        runner.create_bucket()
        runner.measure("naive", 16, "save")  # untimed warm-up: SeaweedFS makes its volumes on the first write
        for index in range(args.rounds):  # interleaved: every case once per round, the order rotated
            for size in sizes:
                for method in stats.rotated(methods, index):
                    samples[(method, size)].append(r := runner.round(method, size))
                    print(f"  {store:>5} r{index + 1} {method:>16} {size:>5} MiB  save {r['save']['s']:6.2f} s "
                          f"(peak +{r['save']['extra'] / MiB:5.0f} MiB, cpu {r['save']['cpu']:5.2f} s)  "
                          f"load {r['load']['s']:6.2f} s (peak +{r['load']['extra'] / MiB:5.0f} MiB)",
                          flush=True)  # fmt: skip
    finally:
        if server is not None:
            server.stop()
    rows = {case: summarize(runs) for case, runs in samples.items()}
    return {"sizes": sizes, "methods": methods, "rows": rows}


def run_wan(args: argparse.Namespace) -> dict:
    from ckptcloud.testing.faultproxy import FaultProxy

    server, _ = start_server("s3", None)
    bucket = f"bench-{uuid.uuid4().hex[:8]}"
    results: dict = {}
    try:
        with FaultProxy(server.port, latency=args.wan_latency, connection_bandwidth=args.wan_bandwidth) as proxy:
            runner = Runner("s3", proxy.endpoint, bucket, args, server.process.pid)
            runner.create_bucket()
            runner.measure("naive", 16, "save")  # untimed warm-up, as in run_store
            cases = [("naive", "naive", 1), ("s3torchconnector", "s3torchconnector", 8)]
            cases += [(f"ckptcloud c={c}", "ckptcloud", c) for c in (1, 4, 8, 16)]
            samples: dict = {label: [] for label, _, _ in cases}
            for index in range(args.rounds):
                for label, method, concurrency in stats.rotated(cases, index):
                    r = runner.round(method, args.wan_size, concurrency, tag=f"c{concurrency}-")
                    samples[label].append(r)
                    mb = args.wan_size * MiB / 1e6
                    print(f"    wan r{index + 1} {label:>16} save {mb / r['save']['s']:5.0f} MB/s  "
                          f"load {mb / r['load']['s']:5.0f} MB/s", flush=True)  # fmt: skip
            results = {label: summarize(runs) for label, runs in samples.items()}
    finally:
        server.stop()
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stores", default="s3,gcs,azure",
                        help="comma-separated: s3, gcs, azure, wan (the WAN study is benchmarks/wan.py)")  # fmt: skip
    parser.add_argument("--sizes", help="checkpoint sizes in MiB for every store (default: per store)")
    parser.add_argument("--methods", help="comma-separated subset of the methods")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds; medians and min-max are reported")
    parser.add_argument("--quick", action="store_true",
                        help="a smoke run: S3 only, 64 MiB, one round (not for the README)")  # fmt: skip
    parser.add_argument("--endpoint", help="your server instead of an emulator (S3/GCS: URL; Azure: connection string)")
    parser.add_argument("--fsspec-python", help="python of an environment with s3fs, gcsfs, adlfs and torch")
    parser.add_argument("--wan-size", type=int, default=256, help="MiB per WAN case")
    parser.add_argument("--wan-latency", type=float, default=0.025, help="seconds added to each request")
    parser.add_argument("--wan-bandwidth", type=float, default=10e6, help="bytes/s per connection per direction")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"), help="folder for tables and plot")
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error(f"--rounds should be at least 1, got {args.rounds}")
    if args.quick:
        args.stores, args.sizes, args.rounds = "s3", args.sizes or "64", 1
    for name, value in (("AWS_ACCESS_KEY_ID", "bench"), ("AWS_SECRET_ACCESS_KEY", "bench"),
                        ("AWS_DEFAULT_REGION", "us-east-1")):  # fmt: skip
        os.environ.setdefault(name, value)
    stores = args.stores.split(",")
    machine = f"{platform.machine()}, {os.cpu_count()} cores, {os.sysconf('SC_PHYS_PAGES') * os.sysconf('SC_PAGE_SIZE') / 1024**3:.0f} GiB, Python {platform.python_version()}"  # noqa: E501
    stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    print(f"# ckptcloud benchmark, {stamp}, {machine}", flush=True)
    started = time.monotonic()
    results = {store: run_store(store, args) for store in stores if store in METHODS}
    wan = run_wan(args) if "wan" in stores else None
    minutes = (time.monotonic() - started) / 60

    from ckptcloud.remote import DEFAULT_MAX_CONCURRENCY, DEFAULT_PART_SIZE

    lines = [f"Measured {stamp} on {machine}; every case a fresh process, same emulator per store, "
             f"{args.rounds} interleaved round(s) per case: median (min-max), a ratio marked (noise) when the "
             f"ranges overlap; the whole run took {minutes:.1f} min.", ""]  # fmt: skip
    for store, r in results.items():
        lines += [f"### {store}: {LABELS[store] if not args.endpoint else args.endpoint}", "",
                  report.store_table(r["rows"], r["sizes"], r["methods"]), ""]  # fmt: skip
    if wan:
        lines += [f"### WAN simulation: SeaweedFS behind a proxy, {args.wan_latency * 1000:.0f} ms per request, "
                  f"{args.wan_bandwidth / 1e6:.0f} MB/s per connection, {args.wan_size} MiB", "",
                  report.wan_table(wan, args.wan_size), ""]  # fmt: skip
    if "s3" in results:
        checks = report.targets(results["s3"]["rows"], results["s3"]["sizes"], wan, DEFAULT_PART_SIZE,
                                DEFAULT_MAX_CONCURRENCY)  # fmt: skip
        lines += ["### Targets (S3 on SeaweedFS; ratios from this run)", "", report.targets_table(checks), ""]
    text = "\n".join(lines)
    print()
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench.md").write_text(text)
    raw = {store: {**r, "rows": [[m, s, v] for (m, s), v in r["rows"].items()]} for store, r in results.items()}
    (args.out / "bench.json").write_text(json.dumps({"when": stamp, "machine": machine, "stores": raw, "wan": wan}))
    plot_results = {store: r["rows"] for store, r in results.items()}
    report.plot(plot_results, wan, args.wan_size, args.out / "bench.png", f"ckptcloud benchmark, {stamp}, {machine}")
    print(f"\nwrote {args.out}/bench.md, bench.json, bench.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
