"""Sharded checkpoints on several ranks need numpy (``ckptcloud[dcp]``); without it they refuse at once, no hang.

DCP's object collectives call ``tensor.numpy()`` on the receiving ranks: without numpy, the coordinator would fail
inside a collective and the other ranks would wait in the next one until the group's timeout. This test needs no
numpy: in the minimal-install stage numpy is really absent; elsewhere each rank hides it (``sys.modules``).
"""

from __future__ import annotations

import json
import os
import sys
import traceback
from pathlib import Path

import pytest
import torch.distributed as dist

from ckptcloud.testing.servers import free_port
from tests.spawning import spawn_ranks

pytestmark = pytest.mark.integration
TIMEOUT_S = 120


def _rank_main(rank: int, world: int, port: int, folder: str, out: str) -> None:
    sys.modules["numpy"] = None  # type: ignore[assignment]  # as in the minimal install: `import numpy` fails
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    result: dict = {"rank": rank, "errors": []}
    try:
        from ckptcloud.dcp import CloudStorageReader, CloudStorageWriter

        for make in (CloudStorageWriter, CloudStorageReader):
            try:
                make(Path(folder).as_uri())
            except ImportError as err:
                result["errors"].append(str(err))
        dist.barrier()  # every rank got here: nothing waits in a collective
    except BaseException:
        result["crash"] = traceback.format_exc()
    finally:
        Path(out, f"rank{rank}.json").write_text(json.dumps(result))
        dist.destroy_process_group()


def test_a_sharded_writer_or_reader_on_several_ranks_without_numpy_names_the_extra_on_every_rank(tmp_path):
    results = spawn_ranks(_rank_main, 2, (2, free_port(), str(tmp_path / "ck"), str(tmp_path)), tmp_path, TIMEOUT_S)
    for result in results:
        assert len(result["errors"]) == 2
        assert all("need numpy" in e and "pip install ckptcloud[dcp]" in e for e in result["errors"])
