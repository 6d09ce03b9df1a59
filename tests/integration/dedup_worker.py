"""Processes for the dedup fault tests: ``python -m tests.integration.dedup_worker kill|gc URL GRACE SECONDS OUT``.

``kill``: a dedup save that kills its own process (``os._exit``) right after its second blob was stored.
``gc``: GC of URL in a loop for SECONDS; writes the blob names it deleted to OUT (JSON).
"""

from __future__ import annotations

import json
import os
import sys
import time

import torch

from ckptcloud.dedup import collect_garbage
from ckptcloud.urls import saver_from_url

MiB = 1024 * 1024


def kill_mid_save(url: str, grace: float) -> None:
    saver = saver_from_url(url, dedup=True, dedup_grace=grace, part_size=5 * MiB, require_empty=False)
    put, stored = saver.store.put, []

    def put_then_die(key, data, metadata, when=None):
        put(key, data, metadata, when)
        if "/.blobs/" in key:
            stored.append(key)
            if len(stored) == 2:
                os._exit(17)

    saver.store.put = put_then_die
    saver.max_concurrency = 1
    torch.manual_seed(1)
    saver({"w": torch.randn(4 * MiB)}, "model_9.pt")  # 16 MiB: four blobs
    os._exit(0)  # not reached


def gc_loop(url: str, grace: float, seconds: float, out: str) -> None:
    saver = saver_from_url(url, require_empty=False)
    deleted: list[str] = []
    end = time.time() + seconds
    while time.time() < end:
        started = time.time()
        deleted += collect_garbage(saver.store, saver._base, grace, retry=saver.retry).deleted
        print(f"gc pass: {time.time() - started:.2f} s, {len(deleted)} deleted so far", file=sys.stderr, flush=True)
        time.sleep(0.2)
    with open(out, "w") as file:
        json.dump(deleted, file)


if __name__ == "__main__":
    command, target, grace_text = sys.argv[1:4]
    if command == "kill":
        kill_mid_save(target, float(grace_text))
    else:
        gc_loop(target, float(grace_text), float(sys.argv[4]), sys.argv[5])
