"""A sharded save's heartbeats (``ckptcloud.dcp.agreement``): a rank that keeps beating is waited for however slow it
is, and one that stops beating is declared dead after the staleness bound. One process, fake ranks on one store."""

from __future__ import annotations

import threading
import time
from datetime import timedelta

import pytest
import torch.distributed as dist

from ckptcloud.coordination import BeatWatch, heartbeat
from ckptcloud.dcp import agreement as agreement_module
from ckptcloud.dcp.agreement import SaveAgreement, default_stale_after
from ckptcloud.errors import RankFailedError, RemoteSaveError

STALE = 2.0  # the staleness bound of these tests (seconds)


@pytest.fixture(params=["hash", "tcp"])
def store(request):
    if request.param == "hash":
        return dist.HashStore()
    return dist.TCPStore("127.0.0.1", 0, 1, True, timeout=timedelta(seconds=10))


def test_a_slow_rank_that_keeps_beating_is_waited_for_past_the_bound(store):
    waiting = SaveAgreement(store, "slow", 0, 2, 60.0, stale_after=STALE)
    slow = SaveAgreement(store, "slow", 1, 2, 60.0, stale_after=STALE)
    outcome: list[BaseException | None] = []

    def wait() -> None:
        try:
            with waiting.alive():
                waiting.wait_for_all("saving s3://b/step-1")
            outcome.append(None)
        except BaseException as err:
            outcome.append(err)

    waiter = threading.Thread(target=wait)
    with slow.alive():  # "uploads" for twice the bound, beating all along
        waiter.start()
        time.sleep(2 * STALE + 0.5)
        assert waiter.is_alive() and not outcome
        slow.wait_for_all("saving s3://b/step-1")
    waiter.join(10)
    assert outcome == [None] and waiting.dead is None


def test_a_rank_that_stops_beating_is_declared_dead_after_the_bound_and_every_survivor_raises(store):
    ranks = [SaveAgreement(store, "dead", r, 3, 1800.0, stale_after=STALE) for r in range(3)]
    with ranks[2].alive():  # rank 2 beats a little, then dies without a word
        time.sleep(0.2)
    errors: dict[int, BaseException] = {}

    def survive(rank: int) -> None:
        try:
            with ranks[rank].alive():
                ranks[rank].wait_for_all("saving s3://b/step-2")
        except BaseException as err:
            errors[rank] = err

    started = time.monotonic()
    survivors = [threading.Thread(target=survive, args=(r,)) for r in (0, 1)]
    for thread in survivors:
        thread.start()
    for thread in survivors:
        thread.join(30)
    seconds = time.monotonic() - started
    assert not any(t.is_alive() for t in survivors)
    assert STALE - 0.5 < seconds < STALE + 4, seconds
    assert sorted(errors) == [0, 1]
    for err in errors.values():  # the one that noticed first raised its own; the other the reported one
        assert isinstance(err, RankFailedError) and isinstance(err, RemoteSaveError)
        assert "rank 2 showed no heartbeat for 2 s" in str(err) and "s3://b/step-2" in str(err)
    assert any(err.ranks == (2,) for err in errors.values())
    assert ranks[0].failure() is not None  # reported: ranks still uploading cancel


def test_the_watcher_cancels_an_upload_when_a_rank_dies():
    store = dist.HashStore()
    uploading = SaveAgreement(store, "w", 0, 2, 1800.0, stale_after=1.0)
    told: list[str] = []
    with uploading.alive(), uploading.watch(told.append, "saving s3://b/step-3"):
        deadline = time.monotonic() + 10
        while not told and time.monotonic() < deadline:  # rank 1 never beats at all
            time.sleep(0.05)
    assert len(told) == 1 and "RankFailedError" in told[0] and "rank 1 showed no heartbeat" in told[0]
    assert isinstance(uploading.dead, RankFailedError)


def test_the_heartbeat_thread_ends_with_its_block_also_on_an_exception():
    store = dist.HashStore()
    before = {t.name for t in threading.enumerate() if t.name == "ckptcloud-heartbeat"}
    with pytest.raises(KeyError), heartbeat(store, "beat/x", interval=0.05):
        time.sleep(0.2)
        raise KeyError("boom")
    after = {t for t in threading.enumerate() if t.name == "ckptcloud-heartbeat"}
    assert not before and not after
    count = int(store.get("beat/x"))
    time.sleep(0.2)
    assert int(store.get("beat/x")) == count >= 2


def test_beat_watch_counts_a_rank_that_never_beat_from_its_own_start():
    store = dist.HashStore()
    watch = BeatWatch(store, {1: "b/1", 2: "b/2"}, stale_after=0.3, min_interval=0.0)
    store.set("b/1", "1")
    assert watch.stale() == []
    time.sleep(0.4)
    assert watch.stale() == [1, 2]
    store.set("b/1", "2")
    assert watch.stale() == [2]


def test_the_bound_comes_from_the_environment_when_set(monkeypatch):
    monkeypatch.delenv(agreement_module.STALE_AFTER_ENV, raising=False)
    assert default_stale_after() == agreement_module.STALE_AFTER == 60.0
    monkeypatch.setenv(agreement_module.STALE_AFTER_ENV, "3")
    assert default_stale_after() == 3.0
    monkeypatch.setenv(agreement_module.STALE_AFTER_ENV, "soon")
    with pytest.raises(ValueError, match="CKPTCLOUD_DCP_STALE_AFTER"):
        default_stale_after()
