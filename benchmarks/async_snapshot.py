"""Blocking time and peak memory of consecutive async saves: pooled snapshot buffers vs a fresh copy per save.

Each case runs in a fresh subprocess; cases are interleaved round by round (shared, noisy machines), and the
summary gives the median and min-max over rounds::

    python benchmarks/async_snapshot.py                      # 256 MiB state, 10 saves, 3 rounds
    python benchmarks/async_snapshot.py --mib 64 --rounds 1  # a quick look

Cases:

- ``pool``: ``Checkpoint(async_save=True)`` as shipped: each save copies the state into host buffers kept by the
  writer's :class:`~ckptcloud.snapshot.SnapshotPool`.
- ``fresh``: the behaviour before the pool: every save takes :func:`ckptcloud.snapshot.snapshot`, a newly
  allocated copy of each storage (``BackgroundWriter.snapshot`` is patched to call it).
- ``memcpy``: the floor: ``copy_`` of every tensor of the state into tensors allocated (and touched) beforehand.

Each save goes to a ``RemoteSaver`` on an in-memory store that discards the bytes (so that stored objects do not
count as client memory). Before each save the previous upload is waited for outside the timed region, as in a
training loop whose save interval is longer than one upload, so ``blocked`` is the snapshot the loop stalls for.
Peak memory is the process's peak RSS (VmHWM, reset once the state exists) minus the RSS at that moment.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # ckptcloud from this checkout

from benchmarks.stats import Spread, rotated

CASES = ("memcpy", "fresh", "pool")
MiB = 1024 * 1024


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS (Linux)


def _state(mib: int, tensor_mib: int) -> dict[str, Any]:
    """A model-like state of about ``mib`` MiB: 3/4 in float32 matrices of ``tensor_mib`` MiB (embeddings and
    large projections), 1/4 in 8 bfloat16 matrices, plus 16 small bias vectors and a step counter."""
    import torch

    torch.manual_seed(0)
    large = max(1, (mib * 3 // 4) // tensor_mib)
    state: dict[str, Any] = {f"layer{i}.weight": torch.randn(tensor_mib * MiB // 4) for i in range(large)}
    rest = (mib * MiB - large * tensor_mib * MiB) // 8 // 2
    state.update({f"layer{i}.proj": torch.randn(rest).bfloat16() for i in range(8)})
    state.update({f"layer{i}.bias": torch.randn(1024) for i in range(16)})
    state["step"] = 0
    return state


def run_case(case: str, mib: int, tensor_mib: int, saves: int, threads: int) -> dict[str, Any]:
    """One case in this process; returns its measurements."""
    import torch

    torch.set_num_threads(threads)

    from ckptcloud import Checkpoint
    from ckptcloud.background import BackgroundWriter
    from ckptcloud.remote import RemoteSaver
    from ckptcloud.snapshot import snapshot
    from ckptcloud.stores.memory import MemoryStore

    class SinkStore(MemoryStore):
        """Multipart uploads whose parts are counted and dropped."""

        def put_part(self, upload: Any, number: int, data: memoryview) -> Any:
            return super().put_part(upload, number, memoryview(b""))

        def complete(self, upload: Any, parts: list[Any], when: Any = None) -> None:
            with self._lock:
                state = self.uploads.pop(upload)
                self.objects[state.key] = (b"", state.metadata, time.time())

    state = _state(mib, tensor_mib)
    tensors = [t for t in state.values() if isinstance(t, torch.Tensor)]
    state_bytes = sum(t.untyped_storage().nbytes() for t in tensors)
    holder = type("Model", (), {"state_dict": lambda self: state})()
    blocked: list[float] = []
    result: dict[str, Any] = {"case": case, "state_mib": state_bytes / MiB, "saves": saves}
    if case == "memcpy":
        targets = [torch.empty_like(t) for t in tensors]
        for dst, src in zip(targets, tensors, strict=True):
            dst.copy_(src)  # touched: no page faults in the timed copies
        base = _rss_kib("VmRSS")
        _reset_peak()
        for _ in range(saves):
            start = time.perf_counter()
            for dst, src in zip(targets, tensors, strict=True):
                dst.copy_(src)
            blocked.append(time.perf_counter() - start)
    else:
        if case == "fresh":
            BackgroundWriter.snapshot = lambda self, obj: snapshot(obj)  # type: ignore[method-assign]
        saver = RemoteSaver(SinkStore("bucket"), "run")
        result["pipeline_mib"] = (saver.max_concurrency + 1) * saver.part_size / MiB
        ckpt = Checkpoint({"model": holder}, saver, n_saved=2, async_save=True)
        base = _rss_kib("VmRSS")
        _reset_peak()
        uploads: list[float] = []
        for step in range(1, saves + 1):
            start = time.perf_counter()
            ckpt.wait()  # the previous upload: not part of the stall measured here
            uploads.append(time.perf_counter() - start)
            state["step"] = step
            tensors[0][0] += 1.0  # training changed something
            start = time.perf_counter()
            ckpt.save(global_step=step)
            blocked.append(time.perf_counter() - start)
        ckpt.close()
        result["wait_s"] = uploads[1:]
    result["blocked_s"] = blocked
    result["first_s"] = blocked[0]
    result["steady_s"] = statistics.median(blocked[1:]) if len(blocked) > 1 else blocked[0]
    result["steady_s_per_gib"] = result["steady_s"] / (state_bytes / 1024**3)
    result["peak_extra_mib"] = (_rss_kib("VmHWM") - base) / 1024
    return result


def table(runs: list[dict[str, Any]], tensor_mib: int, threads: int) -> str:
    """Markdown: one line per case (median and min-max over rounds), then the issue's two checks."""
    by_case = {case: [r for r in runs if r["case"] == case] for case in CASES}
    floor = {r["round"]: r["steady_s"] for r in by_case["memcpy"]}
    first = runs[0]
    lines = [
        f"State {first['state_mib']:.0f} MiB (largest tensors {tensor_mib} MiB), {first['saves']} consecutive saves "
        f"per case, {len({r['round'] for r in runs})} interleaved rounds, {threads} torch thread(s): median (min-max).",
        "",
        "| case | first save s | steady s per save | steady s/GiB | x memcpy | peak extra MiB |",
        "|---|---|---|---|---|---|",
    ]
    for case, rs in by_case.items():
        if not rs:
            continue
        ratio = Spread.of(r["steady_s"] / floor[r["round"]] for r in rs)
        first_s, steady_s = Spread.of(r["first_s"] for r in rs), Spread.of(r["steady_s"] for r in rs)
        lines.append(
            f"| {case} | {first_s.show(3)} | {steady_s.show(3)} "
            f"| {Spread.of(r['steady_s_per_gib'] for r in rs).show(3)} | {ratio.show(2)} "
            f"| {Spread.of(r['peak_extra_mib'] for r in rs).show(0)} |"
        )
    pool = by_case["pool"]
    if pool and floor:
        ratio = Spread.of(r["steady_s"] / floor[r["round"]] for r in pool)
        bound = first["state_mib"] + pool[0]["pipeline_mib"]
        peak = Spread.of(r["peak_extra_mib"] for r in pool)
        lines += [
            "",
            f"- blocking per save after the first ≤ 1.5x memcpy: {ratio.show(2)} x: "
            f"{'yes' if ratio.median <= 1.5 else '**no**'}",
            f"- peak extra over {first['saves']} saves ≤ one snapshot + pipeline ({first['state_mib']:.0f} + "
            f"{pool[0]['pipeline_mib']:.0f} = {bound:.0f} MiB): {peak.show(0)} MiB: "
            f"{'yes' if peak.hi <= bound else '**no**'}",
        ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run every case in fresh subprocesses, ``--rounds`` interleaved rounds, and print medians and ranges."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mib", type=int, default=256, help="state size (MiB)")
    parser.add_argument("--tensor-mib", type=int, default=64, help="size of the large float32 matrices (MiB)")
    parser.add_argument("--saves", type=int, default=10, help="consecutive saves per case")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (1: stable timings on a shared, loaded machine)"
    )
    parser.add_argument("--quick", action="store_true", help="64 MiB, 3 saves, one round (a smoke run)")
    parser.add_argument("--out", type=Path, help="folder for async.md (the table) and async.json (every round)")
    parser.add_argument("--case", choices=CASES, help=argparse.SUPPRESS)  # one case, in this process
    args = parser.parse_args(argv)
    if args.quick:
        args.mib, args.saves, args.rounds = 64, 3, 1
    if args.case:
        print(json.dumps(run_case(args.case, args.mib, args.tensor_mib, args.saves, args.threads)))
        return 0
    runs: list[dict[str, Any]] = []
    for round_ in range(args.rounds):
        for case in rotated(CASES, round_):
            cmd = [sys.executable, __file__, "--case", case, "--mib", str(args.mib), "--saves", str(args.saves)]
            cmd += ["--threads", str(args.threads), "--tensor-mib", str(args.tensor_mib)]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True)
            run = json.loads(out.stdout.strip().splitlines()[-1])
            run["round"] = round_
            runs.append(run)
            print(
                f"round {round_} {case:6s} first {run['first_s']:.3f} s  steady {run['steady_s']:.3f} s "
                f"({run['steady_s_per_gib']:.3f} s/GiB)  peak +{run['peak_extra_mib']:.0f} MiB",
                flush=True,
            )
    text = table(runs, args.tensor_mib, args.threads)
    print("\n" + text)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "async.md").write_text(text + "\n")
        (args.out / "async.json").write_text(json.dumps(runs, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
