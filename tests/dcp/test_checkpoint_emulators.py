"""``Checkpoint(..., sharded=True)`` on each store's emulator: S3 (moto), GCS (fake-gcs-server), Azure (Azurite).

Exactly ``n_saved`` committed folders remain, each carrying its retention metadata on ``.metadata`` (S3 listings
omit metadata, GCS and Azure listings carry it), resume rebuilds the kept list, and loads are bit-identical.
"""

from __future__ import annotations

import pytest

from ckptcloud import Checkpoint
from ckptcloud.dcp.retention import list_sharded
from ckptcloud.retry import Retry
from ckptcloud.urls import saver_from_url

from .helpers import tensors_equal
from .test_checkpoint_sharded import RETENTION_KEYS, SCORES, Trainer

pytest.importorskip("numpy", reason="torch.distributed.checkpoint needs numpy (ckptcloud[dcp])")
pytestmark = [pytest.mark.integration, pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")]
MiB = 1024 * 1024
RETRY = Retry(max_attempts=3, initial_backoff=0.01, max_backoff=0.1)


def test_sharded_checkpoint_keeps_n_saved_folders_resumes_and_loads_on_every_store(place):
    url, options = place

    def checkpoint(trainer: Trainer, **kwargs) -> Checkpoint:
        saver = saver_from_url(url, require_empty=False, retry=RETRY, **options)
        return Checkpoint(trainer.objects(), saver, sharded=True, n_saved=2, score_name="acc", **kwargs)

    trainer = Trainer()
    ckpt = checkpoint(trainer)
    for step, acc in SCORES:
        trainer.step(step)
        ckpt.save(global_step=step, score=acc)
    listed = list_sharded(ckpt.save_handler.saver)
    assert sorted(listed) == ["checkpoint_2_acc=0.9000", "checkpoint_5_acc=0.8000"]
    assert all(RETENTION_KEYS <= set(info.metadata) for info in listed.values())
    leftovers = [info.key for info in ckpt.save_handler.saver.store.list("runs/")]
    assert {key.split("/")[1] for key in leftovers} == set(listed)  # evicted folders are gone whole
    fresh = Trainer(seed=1)
    again = checkpoint(fresh, resume=True)
    assert again.state_dict() == ckpt.state_dict()
    again.load_objects(fresh.objects(), f"{url}/{again.last_checkpoint}")
    assert tensors_equal(fresh.state(), trainer.states[2])
