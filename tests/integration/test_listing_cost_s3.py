"""Resume and ``ckptcloud ls`` on S3 (moto), counted in requests (trial 15): S3 listings carry no user metadata,
so each checkpoint costs a HEAD; objects the checkpoint's pattern cannot match must cost none, HEADs go out
concurrently, and the surplus is deleted through one ``delete_many`` call."""

from __future__ import annotations

import threading
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
import torch

from ckptcloud import Checkpoint, S3Saver
from ckptcloud.cli import main

pytestmark = pytest.mark.integration
OWN, FOREIGN, KEEP = 400, 200, 3


class Requests:
    """S3 requests a store's boto3 clients sent, by operation, and the most HEADs that were in flight at once."""

    def __init__(self, store: Any) -> None:
        self.calls: Counter[str] = Counter()
        self.in_flight = self.max_heads_in_flight = 0
        self._lock = threading.Lock()
        clients = {id(c): c for c in (store.client, getattr(store, "metadata_client", None)) if c is not None}
        for client in clients.values():  # the data client, and the metadata client where the store has one
            client.meta.events.register("before-call.s3.*", self._before)
            client.meta.events.register("after-call.s3.HeadObject", self._after_head)
            client.meta.events.register("after-call-error.s3.HeadObject", self._after_head)

    def _before(self, model: Any, **_: Any) -> None:
        with self._lock:
            self.calls[model.name] += 1
            if model.name == "HeadObject":
                self.in_flight += 1
                self.max_heads_in_flight = max(self.max_heads_in_flight, self.in_flight)

    def _after_head(self, **_: Any) -> None:
        with self._lock:
            self.in_flight -= 1


@pytest.fixture
def crowded_prefix(monkeypatch, s3_endpoint, s3_client, s3_bucket) -> str:
    """``run/`` holding OWN checkpoints ``model_{i}.pt`` (priority i) and FOREIGN ``other_{i}.pt``."""
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", s3_endpoint.url)
    meta = {"ckptcloud_basename": "model"}

    def put(i: int) -> None:
        s3_client.put_object(  # type: ignore[attr-defined]
            Bucket=s3_bucket, Key=f"run/model_{i}.pt", Body=b"x", Metadata={**meta, "ckptcloud_priority": str(i)}
        )
        if i <= FOREIGN:
            s3_client.put_object(Bucket=s3_bucket, Key=f"run/other_{i}.pt", Body=b"x")  # type: ignore[attr-defined]

    with ThreadPoolExecutor(16) as pool:
        list(pool.map(put, range(1, OWN + 1)))
    return s3_bucket


def test_resume_heads_only_its_own_checkpoints_concurrently_and_deletes_the_surplus_in_one_batch(
    crowded_prefix, s3_endpoint, s3_client
):
    saver = S3Saver(crowded_prefix, "run", require_empty=False, endpoint_url=s3_endpoint.url, max_concurrency=8)
    requests = Requests(saver.store)
    batches: list[list[str]] = []
    delete_many = getattr(saver.store, "delete_many", None)  # (stores of ckptcloud <= 0.1 have none)

    def spy(keys: list[str]) -> None:
        batches.append(list(keys))
        delete_many(keys)  # type: ignore[misc]

    if delete_many is not None:
        saver.store.delete_many = spy  # type: ignore[method-assign]
    ckpt = Checkpoint({"model": torch.nn.Linear(2, 2)}, saver, n_saved=KEEP, resume=True)
    assert [f for _, f in ckpt.state_dict()["_saved"]] == [f"model_{i}.pt" for i in range(OWN - KEEP + 1, OWN + 1)]
    assert requests.calls["HeadObject"] == OWN  # none for the FOREIGN other_*.pt
    assert requests.calls["ListObjectsV2"] == 1
    assert 1 < requests.max_heads_in_flight <= 8
    assert batches == [[f"run/model_{i}.pt" for i in range(1, OWN - KEEP + 1)]]
    listed = s3_client.get_paginator("list_objects_v2").paginate(Bucket=crowded_prefix, Prefix="run/")  # type: ignore[attr-defined]
    left = sorted(o["Key"] for page in listed for o in page.get("Contents", []))
    assert len(left) == KEEP + FOREIGN and sum(k.startswith("run/other_") for k in left) == FOREIGN


def test_ls_heads_concurrently_and_lists_every_checkpoint_sorted(crowded_prefix, monkeypatch, capsys):
    import json

    from ckptcloud import cli

    seen: list[Requests] = []
    make = cli.saver_from_url

    def counted(url: str, **options: Any) -> Any:
        saver = make(url, **options)
        seen.append(Requests(saver.store))
        return saver

    monkeypatch.setattr(cli, "saver_from_url", counted)
    assert main(["ls", f"s3://{crowded_prefix}/run", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["name"] for r in rows] == sorted([f"model_{i}.pt" for i in range(1, OWN + 1)] + [
        f"other_{i}.pt" for i in range(1, FOREIGN + 1)
    ])  # fmt: skip
    assert all(r["step"] == int(r["name"][6:-3]) for r in rows if r["name"].startswith("model_"))
    assert seen[0].calls["HeadObject"] == OWN + FOREIGN and 1 < seen[0].max_heads_in_flight
