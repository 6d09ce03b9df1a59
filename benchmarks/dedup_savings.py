"""Quick measurement of ``dedup=True``: 10 saves of a frozen base plus ~1% trainable parameters through SeaweedFS.

``python -m benchmarks.dedup_savings [--base-mib 256] [--saves 10]``: starts SeaweedFS, then for a plain saver and a
dedup saver saves the model ``--saves`` times (the trainable part changes between saves), and loads the last
checkpoint back 3 times. Prints bytes uploaded per save and the median save and load times. One machine, one run:
a quick, noisy measurement.
"""

from __future__ import annotations

import argparse
import statistics
import time
import uuid

import torch

from ckptcloud.remote import RemoteSaver
from ckptcloud.stores.s3 import S3Store, make_s3_client
from ckptcloud.testing import servers

MiB = 1024 * 1024


def model(base_mib: int) -> tuple[dict, list[torch.Tensor]]:
    torch.manual_seed(0)
    base = {f"base.{i}": torch.randn(MiB) for i in range(base_mib // 4)}  # 4 MiB each
    trainable = [torch.randn(base_mib * MiB // 100 // 4 // 8) for _ in range(8)]  # ~1% in 8 adapters
    return base, trainable


def run(store: S3Store, prefix: str, dedup: bool, base: dict, trainable: list, saves: int) -> dict:
    saver = RemoteSaver(store, prefix, dedup=dedup, max_concurrency=8)
    uploaded, times, sent = [], [], [0]
    put, put_part = store.put, store.put_part

    def counting_put(key, data, metadata, when=None):
        sent[0] += len(data)
        return put(key, data, metadata, when)

    def counting_part(upload, number, data):
        sent[0] += len(data)
        return put_part(upload, number, data)

    store.put, store.put_part = counting_put, counting_part  # type: ignore[method-assign]
    for step in range(1, saves + 1):
        for t in trainable:
            t.add_(0.01)
        state = {"model": {**base, **{f"adapter.{i}": t for i, t in enumerate(trainable)}}, "step": step}
        sent[0] = 0
        start = time.perf_counter()
        saver(state, f"model_{step}.pt")
        times.append(time.perf_counter() - start)
        uploaded.append(sent[0])
    store.put, store.put_part = put, put_part  # type: ignore[method-assign]
    loads = []
    for _ in range(3):
        start = time.perf_counter()
        saver.load(f"model_{saves}.pt")
        loads.append(time.perf_counter() - start)
    return {"uploaded": uploaded, "save_s": times, "load_s": loads}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--base-mib", type=int, default=256)
    parser.add_argument("--saves", type=int, default=10)
    args = parser.parse_args()
    server = servers.start_seaweedfs()
    try:
        client = make_s3_client(endpoint_url=server.endpoint, region_name="us-east-1", max_concurrency=16)
        bucket = f"bench-{uuid.uuid4().hex[:8]}"
        client.create_bucket(Bucket=bucket)
        store = S3Store(client, bucket)
        base, trainable = model(args.base_mib)
        total = sum(t.nbytes for t in base.values()) + sum(t.nbytes for t in trainable)
        print(f"model: {total / MiB:.1f} MiB, trainable {sum(t.nbytes for t in trainable) / MiB:.2f} MiB")
        for name, dedup in (("plain", False), ("dedup", True)):
            r = run(store, name, dedup, base, [t.clone() for t in trainable], args.saves)
            later = r["uploaded"][1:]
            print(
                f"{name}: first save {r['uploaded'][0] / MiB:.1f} MiB uploaded in {r['save_s'][0]:.2f} s; later saves "
                f"median {statistics.median(later) / MiB:.2f} MiB uploaded, median save "
                f"{statistics.median(r['save_s'][1:]):.2f} s; load median {statistics.median(r['load_s']):.2f} s"
            )
    finally:
        server.stop()


if __name__ == "__main__":
    main()
