"""State dicts and stores shared by the sharded-checkpoint tests."""

from __future__ import annotations

import threading

import torch
from torch.distributed.checkpoint.api import CheckpointException

from ckptcloud.remote import RemoteSaver
from ckptcloud.retry import Retry
from ckptcloud.stores.memory import MemoryStore

PART = 64 * 1024
FAST_RETRY = Retry(max_attempts=3, initial_backoff=0.001, max_backoff=0.01)


def training_state(seed: int = 0) -> dict:
    """A model and its Adam state after one step, plus plain values (DCP's BYTE_IO items)."""
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(300, 200), torch.nn.ReLU(), torch.nn.Linear(200, 10))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    model(torch.randn(4, 300)).sum().backward()
    optimizer.step()
    return {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": 7, "meta": {"run": "a"}}


def blank_like(state: dict) -> dict:
    """The same structure with different values: what a fresh process loads into."""
    fresh = training_state(seed=1)
    fresh["step"] = 0
    fresh["meta"] = {"run": "?"}
    assert not torch.equal(fresh["model"]["0.weight"], state["model"]["0.weight"])
    return fresh


def tensors_equal(a: object, b: object) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(tensors_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(tensors_equal(x, y) for x, y in zip(a, b, strict=True))
    return a == b


def rank_failure(err: CheckpointException, rank: int = 0) -> BaseException:
    """The exception DCP collected from ``rank``."""
    return err.failures[rank][0]


class RecordingStore(MemoryStore):
    """A MemoryStore that records every ranged read as ``(key, start, end)``."""

    def __init__(self, part: int = PART) -> None:
        super().__init__("bucket", min_part_size=part)
        self.reads: list[tuple[str, int, int | None]] = []
        self.gauge = threading.Lock()

    def read(self, key, start=0, end=None, *, version=None):
        with self.gauge:
            self.reads.append((key, start, end))
        yield from super().read(key, start, end, version=version)


def memory_saver(store: MemoryStore, **options) -> RemoteSaver:
    options.setdefault("part_size", PART)
    options.setdefault("max_concurrency", 3)
    options.setdefault("retry", FAST_RETRY)
    return RemoteSaver(store, "runs", require_empty=False, check_bucket=False, **options)
