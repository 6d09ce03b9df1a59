"""Bad input fails with a clear error that names the argument, the expectation and the value; nothing is lost."""

from __future__ import annotations

import time
import warnings

import pytest
import torch

from ckptcloud import Checkpoint, S3Saver
from ckptcloud.errors import TransientError
from ckptcloud.testing.servers import free_port
from tests.unit.fakes import MemorySaver


def model() -> torch.nn.Module:
    return torch.nn.Linear(2, 2)


def test_empty_to_save_is_refused():
    with pytest.raises(ValueError, match="`to_save` should name at least one object"):
        Checkpoint({}, MemorySaver())


def test_a_tensor_score_is_refused_with_a_hint():
    ckpt = Checkpoint({"m": model()}, MemorySaver(), score_name="acc")
    with pytest.raises(ValueError, match=r"`score` should be a number \(use tensor.item\(\)\)"):
        ckpt.save(global_step=1, score=torch.tensor(0.5))


@pytest.mark.parametrize("bad", [float("inf"), float("-inf"), float("nan")])
def test_non_finite_scores_are_never_kept_and_evict_nothing(bad):
    saver = MemorySaver()
    ckpt = Checkpoint({"m": model()}, saver, n_saved=1, score_name="acc")
    ckpt.save(global_step=1, score=0.5)
    with pytest.warns(RuntimeWarning, match="NaN or infinite"):
        assert ckpt.save(global_step=2, score=bad) is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert ckpt.save(global_step=3, score=bad) is None  # warned once only
    assert ckpt.state_dict() == {"_saved": [(0.5, "m_1_acc=0.5000.pt")]}
    assert ckpt.save(global_step=4, score=0.6) == "m_4_acc=0.6000.pt"  # later finite scores still compete


def test_unknown_url_scheme_in_checkpoint():
    with pytest.raises(ValueError, match=r"Unknown URL scheme 'ftp://'"):
        Checkpoint({"m": model()}, "ftp://host/dir")


def test_loading_a_missing_file_names_it(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"absent\.pt"):
        Checkpoint.load_objects({"m": model()}, tmp_path / "absent.pt")


def test_unreachable_endpoint_fails_fast_and_names_it():
    endpoint = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    start = time.monotonic()
    with pytest.raises(TransientError, match=f"cannot reach the S3 endpoint.*{endpoint}"):
        S3Saver("bucket", endpoint_url=endpoint, region_name="us-east-1")
    assert time.monotonic() - start < 30
