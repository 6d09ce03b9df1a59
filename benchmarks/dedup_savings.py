"""``dedup=True`` on a fine-tuning run: a frozen base plus ~1% trainable parameters, saved 10 times through
SeaweedFS with ``Checkpoint(n_saved=3)``, against the same run with a plain saver.

``python -m benchmarks.dedup_savings [--base-mib 256] [--saves 10] [--rounds 3] [--out DIR]``: starts SeaweedFS,
then per round runs the plain and the dedup run (order alternating), each in its own prefix: saves (the trainable
part changes between saves), then loads the last checkpoint. Reports bytes uploaded per save after the first, save
time after the first against the first (full) save, load time against the plain load, and the bucket's bytes after
the run against one full checkpoint plus the changed bytes, each as median (min-max) over rounds, and checks the
issue's targets. Writes ``dedup.md`` and ``dedup.json`` (every round) to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # ckptcloud from this checkout

from benchmarks.stats import Spread
from ckptcloud import Checkpoint
from ckptcloud.remote import RemoteSaver
from ckptcloud.stores.s3 import S3Store, make_s3_client
from ckptcloud.testing import servers

MiB = 1024 * 1024


class Model:
    """A frozen base of 4 MiB float32 matrices and 8 adapters holding ~1% of the bytes, as state_dict()."""

    def __init__(self, base_mib: int) -> None:
        torch.manual_seed(0)
        self.base = {f"base.{i}": torch.randn(MiB) for i in range(base_mib // 4)}
        self.adapters = [torch.randn(base_mib * MiB // 100 // 4 // 8) for _ in range(8)]

    def step(self) -> None:
        for t in self.adapters:
            t.add_(0.01)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {**self.base, **{f"adapter.{i}": t for i, t in enumerate(self.adapters)}}

    @property
    def changed_bytes(self) -> int:
        return sum(t.nbytes for t in self.adapters)

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.base.values()) + self.changed_bytes


def _counting(store: S3Store, sent: list[int]) -> None:
    """Count the bytes of every PUT and part the store sends."""
    put, put_part = store.put, store.put_part

    def counting_put(key: str, data: memoryview, metadata: Any, when: Any = None) -> None:
        sent[0] += len(data)
        return put(key, data, metadata, when)

    def counting_part(upload: Any, number: int, data: memoryview) -> Any:
        sent[0] += len(data)
        return put_part(upload, number, data)

    store.put, store.put_part = counting_put, counting_part  # type: ignore[method-assign]


def run(store: S3Store, prefix: str, dedup: bool, base_mib: int, saves: int) -> dict[str, Any]:
    """One run: ``saves`` saves through Checkpoint(n_saved=3), then one load of the last; what it cost."""
    model, sent = Model(base_mib), [0]
    _counting(store, sent)
    saver = RemoteSaver(store, prefix, dedup=dedup)
    ckpt = Checkpoint({"model": model}, saver, n_saved=3)
    uploaded, times = [], []
    for step in range(1, saves + 1):
        model.step()
        sent[0] = 0
        start = time.perf_counter()
        ckpt.save(global_step=step)
        times.append(time.perf_counter() - start)
        uploaded.append(sent[0])
    start = time.perf_counter()
    loaded = saver.load(ckpt.last_checkpoint)
    load_s = time.perf_counter() - start
    assert torch.equal(loaded["adapter.0"], model.adapters[0])
    objects = store.client.list_objects_v2(Bucket=store.bucket, Prefix=f"{prefix}/")
    stored = sum(o["Size"] for o in objects.get("Contents", []))
    assert not objects.get("IsTruncated"), "more than 1,000 objects: count them with a paginator"
    return {"uploaded": uploaded, "save_s": times, "load_s": load_s, "bucket_bytes": stored,
            "nbytes": model.nbytes, "changed_bytes": model.changed_bytes}  # fmt: skip


def report(rounds: list[dict[str, dict]], saves: int) -> str:
    plain, dedup = [r["plain"] for r in rounds], [r["dedup"] for r in rounds]
    full = dedup[0]["nbytes"]

    def later(run: dict, field: str) -> list[float]:
        return run[field][1:]

    per_save = Spread.of(max(later(r, "uploaded")) / full for r in dedup)  # the worst save of each round
    pairs = list(zip(dedup, plain, strict=True))
    steady = [(Spread.of(later(r, "save_s")).median, Spread.of(later(p, "save_s")).median) for r, p in pairs]
    save_ratio = Spread.of(ours / theirs for ours, theirs in steady)
    load_ratio = Spread.of(r["load_s"] / p["load_s"] for r, p in pairs)
    bucket = Spread.of(r["bucket_bytes"] / (r["nbytes"] + r["changed_bytes"] * (saves - 1)) for r in dedup)
    lines = [
        f"Model {full / MiB:.1f} MiB ({dedup[0]['changed_bytes'] / MiB:.2f} MiB trainable), {saves} saves with "
        f"Checkpoint(n_saved=3) per run, {len(rounds)} rounds (plain and dedup alternating): median (min-max).",
        "",
        "| run | bytes uploaded per save after the first (MiB) | save s, first | save s, later (median) | load s "
        "| bucket MiB after the run |",
        "|---|---|---|---|---|---|",
    ]
    for name, runs in (("plain", plain), ("dedup=True", dedup)):
        lines.append(
            f"| {name} | {Spread.of(Spread.of(later(r, 'uploaded')).median / MiB for r in runs).show()} "
            f"| {Spread.of(r['save_s'][0] for r in runs).show()} "
            f"| {Spread.of(Spread.of(later(r, 'save_s')).median for r in runs).show()} "
            f"| {Spread.of(r['load_s'] for r in runs).show()} "
            f"| {Spread.of(r['bucket_bytes'] / MiB for r in runs).show(0)} |"
        )

    def check(text: str, value: Spread, limit: float) -> str:
        return f"- {text}: {value.show(3)} (target ≤ {limit:g}): {'yes' if value.median <= limit else '**no**'}"

    lines += [
        "",
        check("bytes uploaded per save after the first / a full save (largest per round)", per_save, 0.02),
        check("dedup save after the first / a plain (full) save after the first", save_ratio, 0.1),
        check("dedup load / plain load", load_ratio, 1.1),
        check("dedup bucket bytes / (one full checkpoint + every save's changed bytes)", bucket, 1.1),
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--base-mib", type=int, default=256)
    parser.add_argument("--saves", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, help="folder for dedup.md and dedup.json")
    args = parser.parse_args(argv)
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        import os

        os.environ.setdefault(name, "bench")
    server = servers.start_seaweedfs()
    rounds: list[dict[str, dict]] = []
    try:
        client = make_s3_client(endpoint_url=server.endpoint, region_name="us-east-1", max_concurrency=32)
        bucket = f"bench-{uuid.uuid4().hex[:8]}"
        client.create_bucket(Bucket=bucket)
        for index in range(args.rounds):
            result: dict[str, dict] = {}
            order = (("plain", False), ("dedup", True))
            for name, dedup in order if index % 2 == 0 else order[::-1]:
                store = S3Store(client, bucket)
                result[name] = r = run(store, f"r{index}-{name}", dedup, args.base_mib, args.saves)
                print(f"round {index + 1} {name}: first save {r['save_s'][0]:.2f} s, later uploads "
                      f"{max(r['uploaded'][1:]) / MiB:.2f} MiB max, load {r['load_s']:.2f} s", flush=True)  # fmt: skip
            rounds.append(result)
    finally:
        server.stop()
    text = report(rounds, args.saves)
    print("\n" + text)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "dedup.md").write_text(text + "\n")
        (args.out / "dedup.json").write_text(json.dumps(rounds) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
