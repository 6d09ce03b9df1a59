"""The store protocol ranks agree through, with threads playing ranks over one in-process store."""

from __future__ import annotations

import threading
import time

import pytest
import torch.distributed as dist

from ckptcloud import coordination
from ckptcloud.coordination import Board, CoordinationTimeout
from ckptcloud.errors import RemoteSaveError


@pytest.fixture(autouse=True)
def fast_beats(monkeypatch):
    monkeypatch.setattr(coordination, "BEAT_INTERVAL", 0.05)
    monkeypatch.setattr(coordination, "MAX_POLL", 0.01)


def boards(world: int, timeout: float = 5.0) -> list[Board]:
    store = dist.HashStore()
    return [Board(store, rank, world, timeout) for rank in range(world)]


def test_every_follower_reads_the_writers_record_and_the_last_one_deletes_it():
    writer, *followers = boards(4)
    step = writer.next_step()
    writer.publish(step, "deciding the next save", value={"filename": "model_3.pt", "priority": 3})
    for board in followers:
        record = board.read(board.next_step(), 0, "deciding the next save")
        assert record["value"] == {"filename": "model_3.pt", "priority": 3} and record["error"] is None
    assert not writer._store.check([f"record/{step}"])  # the store does not grow with every save


def test_a_follower_that_arrives_first_waits_for_the_writer_and_the_writer_never_waits():
    writer, follower = boards(2)
    got = []
    reader = threading.Thread(target=lambda: got.append(follower.read(follower.next_step(), 0, "saving x")))
    reader.start()
    time.sleep(0.2)
    assert not got  # still waiting
    writer.publish(writer.next_step(), "saving x", error=PermissionError("denied"))
    reader.join(5)
    assert got[0]["error"] == "PermissionError: denied"


def test_a_follower_gives_up_after_the_timeout_when_the_writer_shows_no_sign_of_work():
    _, follower = boards(2, timeout=0.3)
    start = time.monotonic()
    with pytest.raises(CoordinationTimeout, match="rank 0 published no outcome"):
        follower.read(follower.next_step(), 0, "saving x")
    assert 0.3 <= time.monotonic() - start < 2


def test_a_busy_writer_keeps_followers_waiting_past_the_timeout():
    writer, follower = boards(2, timeout=0.3)
    step = writer.next_step()

    def upload() -> None:
        with writer.busy():
            time.sleep(1.2)  # four timeouts long
        writer.publish(step, "saving x")

    thread = threading.Thread(target=upload)
    thread.start()
    start = time.monotonic()
    record = follower.read(follower.next_step(), 0, "saving x")
    assert record["error"] is None and time.monotonic() - start >= 1.0
    thread.join(5)


def test_followers_stop_waiting_once_the_writer_stops_beating():
    writer, follower = boards(2, timeout=0.3)
    with writer.busy():
        time.sleep(0.2)
    # the writer is idle now and never publishes: the follower times out instead of waiting forever
    with pytest.raises(CoordinationTimeout):
        follower.read(follower.next_step(), 0, "saving x")


def test_ranks_out_of_step_get_a_clear_error_instead_of_a_wrong_record():
    writer, follower = boards(2)
    writer.publish(writer.next_step(), "removing model_1.pt")
    with pytest.raises(RemoteSaveError, match="ranks are out of step"):
        follower.read(follower.next_step(), 0, "saving model_2.pt")


def test_a_store_that_fails_is_reported_as_lost_contact():
    class Gone:
        def check(self, keys):
            raise RuntimeError("Connection reset by peer")

    with pytest.raises(RemoteSaveError, match="lost contact with rank 0"):
        Board(Gone(), 1, 2, 5.0).read(1, 0, "saving x")
