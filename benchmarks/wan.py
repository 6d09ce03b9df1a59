"""WAN scaling: ckptcloud against s3torchconnector at 1 to 32 connections, through a simulated WAN.

SeaweedFS behind :class:`~ckptcloud.testing.faultproxy.FaultProxy` with a fixed latency per request and a bandwidth
cap per connection (the kernel here has no ``netem``; see :mod:`benchmarks.bench`). Every case (save, then load, of
one checkpoint) runs in a fresh process through :mod:`benchmarks.cases`, as ``bench.py`` does; the cases run in
interleaved rounds (every case once per round, the order rotated each round), and the report gives each case's
median and min-max over the rounds. Shared, noisy machines: compare cases of the same run, and read overlapping
ranges as "within noise".

First it measures what the simulation can show at all: the aggregate throughput of a trivial client (raw
``http.client`` GETs and PUTs, unsigned, in a separate process) straight to SeaweedFS, through the proxy without
caps (the proxy's own ceiling, a Python process on a shared machine), and through the proxy with the WAN caps.

    python benchmarks/wan.py                       # c = 1, 4, 8, 16, 32; 3 rounds; ~25 min at 256 MiB
    python benchmarks/wan.py --quick               # c = 8, 16; 1 round
    python benchmarks/wan.py --no-proxy            # the same cases straight to SeaweedFS (loopback, no WAN)

Cases: ``ckptcloud c=N`` sets ``max_concurrency=N`` and ``load_concurrency=N`` (N parts uploaded at once, N ranged
GETs at once); ``ckptcloud defaults`` passes neither (nor ``part_size``); ``ckptcloud 0.1 defaults`` is the
previous default (16 MiB parts, 8 at once, 8 ranges per load). ``s3torchconnector`` is ``S3Checkpoint`` with its
defaults (8 MiB parts, ``throughput_target_gbps=10``); ``s3torchconnector N Gbps`` sets only the throughput target,
the one knob from which its CRT client derives how many connections it opens (it has no connection count). Each
case records the most client connections the proxy had open at once (``conns``).

Writes ``wan.md`` (the tables) and ``wan.json`` (every round's raw numbers) into ``--out``.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # ckptcloud and benchmarks from this checkout

from benchmarks.bench import MiB, Runner, start_server

FULL_CONCURRENCY = (1, 4, 8, 16, 32)
QUICK_CONCURRENCY = (8, 16)
S3TORCH_GBPS = {1: 0.08, 4: 0.32, 8: 0.64, 16: 1.28, 32: 2.56}  # c x 10 MB/s, the link it is told to fill


def cases_for(concurrencies: tuple[int, ...]) -> list[dict[str, Any]]:
    """The cases of one round: label, method and the extra fields of the :mod:`cases` spec."""
    out: list[dict[str, Any]] = [
        {"label": "ckptcloud defaults", "method": "ckptcloud", "spec": {"concurrency": None}},
        {"label": "ckptcloud 0.1 defaults", "method": "ckptcloud",
         "spec": {"concurrency": 8, "load_concurrency": 8, "part_size": 16 * MiB}},
        {"label": "s3torchconnector", "method": "s3torchconnector", "spec": {}},
    ]  # fmt: skip
    for c in concurrencies:
        out.append(
            {"label": f"ckptcloud c={c}", "method": "ckptcloud", "spec": {"concurrency": c, "load_concurrency": c}}
        )
        gbps = S3TORCH_GBPS.get(c)
        if gbps is not None:
            out.append({"label": f"s3torchconnector {gbps:g} Gbps", "method": "s3torchconnector",
                        "spec": {"s3torch": {"throughput_target_gbps": gbps}}})  # fmt: skip
    return out


# ------------------------------------------------------------------------------------- the trivial client
def trivial_client(spec: dict[str, Any]) -> dict[str, float]:
    """``spec``: host, port, bucket, key, size, streams, op (``get``/``put``). Aggregate seconds for ``size`` bytes.

    ``get``: ``streams`` ranged GETs of ``size / streams`` bytes each, read into one reused buffer per stream.
    ``put``: ``streams`` PUTs of ``size / streams`` bytes each (one zero-filled body shared by all).
    """
    host, port, size, streams = spec["host"], spec["port"], spec["size"], spec["streams"]
    share = size // streams
    body = memoryview(bytes(share)) if spec["op"] == "put" else None
    errors: list[str] = []

    def one(i: int) -> None:
        conn = http.client.HTTPConnection(host, port, timeout=300)
        path = f"/{spec['bucket']}/{spec['key']}"
        if body is not None:
            conn.request("PUT", f"{path}-{i}", body=body, headers={"Content-Length": str(share)})
            response = conn.getresponse()
            response.read()
        else:
            start = i * share
            conn.request("GET", path, headers={"Range": f"bytes={start}-{start + share - 1}"})
            response = conn.getresponse()
            buffer = bytearray(1 * MiB)
            while response.readinto(buffer):
                pass
        if response.status not in (200, 206):
            errors.append(f"{response.status} {response.reason}")
        conn.close()

    threads = [threading.Thread(target=one, args=(i,)) for i in range(streams)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    seconds = time.perf_counter() - start
    if errors:
        raise RuntimeError(f"trivial client: {errors[:3]}")
    return {"s": seconds, "mb_s": share * streams / 1e6 / seconds}


def measure_ceiling(server: Any, bucket: str, runner: Runner, args: argparse.Namespace) -> list[dict[str, Any]]:
    """The trivial client's aggregate MB/s: straight to SeaweedFS, through the proxy uncapped, and with WAN caps."""
    from ckptcloud.testing.faultproxy import FaultProxy

    size = 128 * MiB
    runner.client.put_object(Bucket=bucket, Key="ceiling/object", Body=bytes(size))
    rows = []
    wan = {"latency": args.latency, "connection_bandwidth": args.bandwidth}
    routes = [("SeaweedFS, no proxy", None, {}), ("proxy, no caps", "proxy", {}), ("proxy, WAN caps", "proxy", wan)]
    for route, via, caps in routes:
        for streams in (1, 8, 16, 32) if via is None or not caps else (8, 16, 32):
            proxy = FaultProxy(server.port, **caps).start() if via else None
            port = proxy.port if proxy else server.port
            try:
                for op in ("get", "put"):
                    spec = {"host": "127.0.0.1", "port": port, "bucket": bucket, "key": "ceiling/object",
                            "size": size, "streams": streams, "op": op}  # fmt: skip
                    out = subprocess.run([sys.executable, __file__, "--trivial-client", json.dumps(spec)],
                                         capture_output=True, text=True, timeout=600)  # fmt: skip
                    if out.returncode != 0:
                        raise RuntimeError(out.stderr[-2000:])
                    result = json.loads(out.stdout.strip().splitlines()[-1])
                    rows.append({"route": route, "streams": streams, "op": op, **result})
                    print(f"  ceiling {route:>20} {op} x{streams:<3} {result['mb_s']:6.0f} MB/s", flush=True)
            finally:
                if proxy is not None:
                    proxy.stop()
    return rows


# ----------------------------------------------------------------------------------------------- the cases
class PeakConnections:
    """Samples how many client connections ``proxy`` serves at once (one ``faultproxy`` thread each)."""

    def __init__(self, proxy: Any) -> None:
        self.proxy, self.peak, self._stop = proxy, 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.01):
            alive = sum(t.is_alive() for t in list(self.proxy._threads)) - 1  # less the accept loop
            self.peak = max(self.peak, alive)

    def __enter__(self) -> PeakConnections:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def run_case(runner: Runner, case: dict[str, Any], size: int, proxy: Any, tag: str) -> dict[str, Any]:
    """Save then load ``case`` once, each in a fresh process; delete the object after."""
    result: dict[str, Any] = {}
    for phase in ("save", "load"):
        spec = {"store": "s3", "method": case["method"], "size": size, "endpoint": runner.endpoint,
                "bucket": runner.bucket, "phase": phase, "tag": tag, "concurrency": 8, **case["spec"]}  # fmt: skip
        if proxy is not None:
            with PeakConnections(proxy) as peak:
                result[phase] = _run_spec(spec)
            result[phase]["conns"] = peak.peak
        else:
            result[phase] = _run_spec(spec)
    runner.delete(f"bench/{case['method']}-{tag}{size}.pt")
    return result


def _run_spec(spec: dict[str, Any]) -> dict[str, Any]:
    cases_py = Path(__file__).with_name("cases.py")
    env = {**os.environ, "PYTHONPATH": str(cases_py.parents[1])}
    out = subprocess.run([sys.executable, str(cases_py), json.dumps(spec)], capture_output=True, text=True,
                         timeout=900, env=env)  # fmt: skip
    if out.returncode != 0:
        raise RuntimeError(f"{spec['method']} {spec['phase']} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------------------------- the report
def _stats(values: list[float]) -> str:
    return f"{statistics.median(values):.2f} ({min(values):.2f}-{max(values):.2f})"


def table(rounds: list[dict[str, Any]], labels: list[str], size: int, reference: str) -> str:
    """Median (min-max) seconds per case and phase, MB/s of the median, and ratios to ``reference``'s median."""
    mb = size * MiB / 1e6
    head = ("| case | save s, median (min-max) | save MB/s | save x s3tc | save peak extra MiB | save conns "
            "| load s, median (min-max) | load MB/s | load x s3tc | load conns |")  # fmt: skip
    lines = [head, "|" + "---|" * 10]

    def values(label: str, phase: str, field: str) -> list[float]:
        return [r[label][phase][field] for r in rounds if label in r and r[label][phase].get(field) is not None]

    ref = {phase: statistics.median(values(reference, phase, "s") or [float("nan")]) for phase in ("save", "load")}
    for label in labels:
        cells = [label]
        for phase in ("save", "load"):
            seconds = values(label, phase, "s")
            median = statistics.median(seconds)
            cells += [_stats(seconds), f"{mb / median:.0f}", f"{median / ref[phase]:.2f}"]
            if phase == "save":
                cells.append(f"{statistics.median(values(label, phase, 'extra')) / MiB:.0f}")
            conns = values(label, phase, "conns")
            cells.append(f"{max(conns):.0f}" if conns else "-")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def ratio_lines(rounds: list[dict[str, Any]], label: str, reference: str) -> list[str]:
    """Per round ratios of ``label`` to ``reference`` (same round: the fairest pairing on a noisy machine)."""
    out = []
    for phase in ("save", "load"):
        ratios = [r[label][phase]["s"] / r[reference][phase]["s"] for r in rounds if label in r and reference in r]
        if ratios:
            out.append(f"- {label} / {reference}, {phase}: per-round ratios "
                       f"{', '.join(f'{x:.2f}' for x in ratios)}; median {statistics.median(ratios):.2f}")  # fmt: skip
    return out


def ceiling_table(rows: list[dict[str, Any]]) -> str:
    lines = ["| route | streams | GET MB/s | PUT MB/s |", "|---|---|---|---|"]
    keyed = {(r["route"], r["streams"], r["op"]): r["mb_s"] for r in rows}
    for route, streams in dict.fromkeys((r["route"], r["streams"]) for r in rows):
        get, put = keyed.get((route, streams, "get")), keyed.get((route, streams, "put"))
        lines.append(f"| {route} | {streams} | {get:.0f} | {put:.0f} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help=f"c = {QUICK_CONCURRENCY}, 1 round")
    parser.add_argument("--rounds", type=int, help="interleaved rounds (default 3; --quick: 1)")
    parser.add_argument("--concurrency", help="comma-separated c values (default 1,4,8,16,32)")
    parser.add_argument("--size", type=int, default=256, help="MiB per checkpoint")
    parser.add_argument("--latency", type=float, default=0.025, help="seconds added to each request")
    parser.add_argument("--bandwidth", type=float, default=10e6, help="bytes/s per connection per direction")
    parser.add_argument("--no-proxy", action="store_true", help="straight to SeaweedFS (loopback, no WAN)")
    parser.add_argument("--no-ceiling", action="store_true", help="skip the trivial client's ceiling")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"), help="folder for wan.md, wan.json")
    parser.add_argument("--only", help="comma-separated case labels to run (default: all)")
    parser.add_argument("--trivial-client", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.trivial_client:
        print(json.dumps(trivial_client(json.loads(args.trivial_client))))
        return 0
    for name, value in (("AWS_ACCESS_KEY_ID", "bench"), ("AWS_SECRET_ACCESS_KEY", "bench"),
                        ("AWS_DEFAULT_REGION", "us-east-1")):  # fmt: skip
        os.environ.setdefault(name, value)
    concurrencies = tuple(int(c) for c in args.concurrency.split(",")) if args.concurrency else (
        QUICK_CONCURRENCY if args.quick else FULL_CONCURRENCY)  # fmt: skip
    n_rounds = args.rounds if args.rounds is not None else (1 if args.quick else 3)  # 0: only the ceiling
    cases = cases_for(concurrencies)
    if args.only:
        wanted = args.only.split(",")
        cases = [case for case in cases if case["label"] in wanted]
    machine = f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"
    stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    where = "SeaweedFS on loopback, no proxy" if args.no_proxy else (
        f"SeaweedFS behind FaultProxy, {args.latency * 1000:.0f} ms per request, "
        f"{args.bandwidth / 1e6:.0f} MB/s per connection")  # fmt: skip
    print(f"# WAN scaling, {stamp}, {machine}; {where}; {args.size} MiB; {n_rounds} round(s)", flush=True)
    from ckptcloud.testing.faultproxy import FaultProxy

    server, _ = start_server("s3", None)
    bucket = f"wan-{uuid.uuid4().hex[:8]}"
    rounds: list[dict[str, Any]] = []
    ceiling: list[dict[str, Any]] = []
    started = time.monotonic()
    try:
        proxy = None if args.no_proxy else FaultProxy(
            server.port, latency=args.latency, connection_bandwidth=args.bandwidth).start()  # fmt: skip
        endpoint = server.endpoint if proxy is None else proxy.endpoint
        runner = Runner("s3", endpoint, bucket, args, server.process.pid)
        runner.create_bucket()
        runner.measure("naive", 16, "save")  # untimed warm-up: SeaweedFS makes its volumes on the first write
        if not args.no_ceiling and not args.no_proxy:
            ceiling = measure_ceiling(server, bucket, runner, args)
        for number in range(n_rounds):
            shift = number % len(cases)
            order = cases[shift:] + cases[:shift]  # rotated: no case always runs first or after the same one
            results: dict[str, Any] = {}
            for case in order:
                tag = f"r{number}-{case['label'].replace(' ', '_').replace('=', '')}-"
                results[case["label"]] = r = run_case(runner, case, args.size, proxy, tag)
                print(f"  round {number + 1} {case['label']:>28}  save {r['save']['s']:6.2f} s "
                      f"(+{r['save']['extra'] / MiB:4.0f} MiB, {r['save'].get('conns', '-')} conns)  "
                      f"load {r['load']['s']:6.2f} s ({r['load'].get('conns', '-')} conns)", flush=True)  # fmt: skip
            rounds.append(results)
        if proxy is not None:
            proxy.stop()
    finally:
        server.stop()
    minutes = (time.monotonic() - started) / 60
    labels = [case["label"] for case in cases]
    reference = "s3torchconnector"
    lines = [f"Measured {stamp} on {machine} (shared, noisy: {os.cpu_count()} cores for the client, the proxy and "
             f"SeaweedFS together); {where}; {args.size} MiB of float32 tensors; {n_rounds} interleaved round(s), "
             f"each case a fresh process; the run took {minutes:.1f} min.", ""]  # fmt: skip
    if ceiling:
        lines += ["### What the simulation can show: a trivial client's aggregate throughput", "",
                  "Raw `http.client` GETs (ranges of a 128 MiB object) and PUTs (128 MiB in all), unsigned, one "
                  "process; no checksums, no torch.", "", ceiling_table(ceiling), ""]  # fmt: skip
    if rounds:
        title = f"### Save and load, {args.size} MiB (median and min-max over rounds; x s3tc: median over "
        title += "s3torchconnector's median at its defaults)"
        lines += [title, "", table(rounds, labels, args.size, reference), ""]
        lines += [f"### Same-round ratios to {reference} at its defaults", ""]
        for label in labels:
            if label != reference:
                lines += ratio_lines(rounds, label, reference)
    text = "\n".join(lines) + "\n"
    print()
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "wan.md").write_text(text)
    raw = {"when": stamp, "machine": machine, "where": where, "size_mib": args.size, "cases": cases,
           "ceiling": ceiling, "rounds": rounds}  # fmt: skip
    (args.out / "wan.json").write_text(json.dumps(raw, indent=1))
    print(f"wrote {args.out}/wan.md, wan.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
