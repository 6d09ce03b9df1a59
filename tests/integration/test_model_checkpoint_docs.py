"""ignite 0.5.5's own ``ModelCheckpoint`` documentation examples, run against ``ckptcloud.ModelCheckpoint``.

The examples come from ignite's docstrings (``ModelCheckpoint``, ``Checkpoint.load_objects``,
``Checkpoint.reload_objects``, ``WandBLogger``) and from ``shared/reference/ignite-checkpoint-docs.txt``. Each runs
with ckptcloud's imports against a local folder and against an ``s3://`` URL on a real moto server. Only the
folder changes: ``'/tmp/models'`` (or the temporary directory) becomes a test folder or ``s3://bucket/models``. Where
an example then needs a local path (``Path(tmpdirname) / name`` and ``torch.load``), the s3 form uses the URL and
``ckptcloud.load_checkpoint``; that is marked in the test. The class example also runs with ``gs://`` and ``az://``
URLs (fake-gcs-server, Azurite).
"""

from __future__ import annotations

import os

import ignite.handlers
import pytest
import torch
from ignite.engine import Engine, Events
from ignite.handlers import global_step_from_engine
from torch import nn

from ckptcloud import Checkpoint, ModelCheckpoint, S3Saver, load_checkpoint
from tests.conftest import AZURITE_API_VERSION

pytestmark = pytest.mark.integration


@pytest.fixture
def s3(monkeypatch, s3_endpoint, s3_client, s3_bucket):
    """``(client, bucket)`` with ``s3://`` URLs pointed at the session's moto server."""
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", s3_endpoint.url)
    return s3_client, s3_bucket


def s3_listdir(client, bucket: str, prefix: str) -> list[str]:
    """What ``os.listdir`` would show for ``prefix`` (the object names directly under it)."""
    contents = client.list_objects_v2(Bucket=bucket, Prefix=f"{prefix}/").get("Contents", [])
    return sorted(obj["Key"][len(prefix) + 1 :] for obj in contents)


@pytest.fixture(params=["folder", "s3"])
def where(request, tmp_path):
    """``(dirname, listdir)``: the example's folder as a local path or an s3:// URL, and how to list it."""
    if request.param == "folder":
        folder = str(tmp_path / "models")
        return folder, lambda: sorted(os.listdir(folder))
    client, bucket = request.getfixturevalue("s3")
    return f"s3://{bucket}/models", lambda: s3_listdir(client, bucket, "models")


# ------------------------------------------------------------------------------ ModelCheckpoint's docstring
def test_model_checkpoint_docstring_example_prints_its_documented_output(where, capsys):
    dirname, listdir = where

    # -- ignite's example, with '/tmp/models' -> dirname --
    from ignite.engine import Engine, Events
    from torch import nn

    from ckptcloud import ModelCheckpoint

    trainer = Engine(lambda engine, batch: None)
    handler = ModelCheckpoint(dirname, "myprefix", n_saved=2, create_dir=True, require_empty=False)
    model = nn.Linear(3, 3)
    trainer.add_event_handler(Events.EPOCH_COMPLETED(every=2), handler, {"mymodel": model})
    trainer.run([0, 1, 2, 3, 4], max_epochs=6)
    print(listdir())  # sorted(os.listdir('/tmp/models'))
    print(handler.last_checkpoint)
    # --

    assert capsys.readouterr().out.splitlines() == [
        "['myprefix_mymodel_20.pt', 'myprefix_mymodel_30.pt']",
        f"{dirname}/myprefix_mymodel_30.pt",  # /tmp/models/myprefix_mymodel_30.pt
    ]


# ---------------------------------------------------------------------- Checkpoint.load_objects' docstring
def test_load_objects_docstring_example_with_a_temporary_directory():
    # -- ignite's example, verbatim but for the import --
    import tempfile
    from pathlib import Path

    import torch
    from ignite.engine import Engine, Events

    from ckptcloud import Checkpoint, ModelCheckpoint

    trainer = Engine(lambda engine, batch: None)

    with tempfile.TemporaryDirectory() as tmpdirname:
        handler = ModelCheckpoint(tmpdirname, "myprefix", n_saved=None, create_dir=True)

        model = torch.nn.Linear(3, 3)
        optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)

        to_save = {"weights": model, "optimizer": optimizer}

        trainer.add_event_handler(Events.EPOCH_COMPLETED(every=2), handler, to_save)
        trainer.run(torch.randn(10, 1), 5)

        to_load = to_save
        checkpoint_fp = Path(tmpdirname) / "myprefix_checkpoint_40.pt"
        checkpoint = torch.load(checkpoint_fp, weights_only=True)
        Checkpoint.load_objects(to_load=to_load, checkpoint=checkpoint)

        # or using a string for checkpoint filepath

        to_load = to_save
        checkpoint_fp = Path(tmpdirname) / "myprefix_checkpoint_40.pt"
        Checkpoint.load_objects(to_load=to_load, checkpoint=checkpoint_fp)
        # --
        assert sorted(os.listdir(tmpdirname)) == ["myprefix_checkpoint_20.pt", "myprefix_checkpoint_40.pt"]


def test_load_objects_docstring_example_with_an_s3_url(s3):
    _, bucket = s3
    trainer = Engine(lambda engine, batch: None)

    tmpdirname = f"s3://{bucket}/models"  # was: with tempfile.TemporaryDirectory() as tmpdirname:
    handler = ModelCheckpoint(tmpdirname, "myprefix", n_saved=None, create_dir=True)

    model = torch.nn.Linear(3, 3)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)

    to_save = {"weights": model, "optimizer": optimizer}

    trainer.add_event_handler(Events.EPOCH_COMPLETED(every=2), handler, to_save)
    trainer.run(torch.randn(10, 1), 5)

    fresh = torch.nn.Linear(3, 3)
    to_load = {"weights": fresh, "optimizer": torch.optim.SGD(fresh.parameters(), lr=1.0)}
    checkpoint_fp = f"{tmpdirname}/myprefix_checkpoint_40.pt"  # was: Path(tmpdirname) / 'myprefix_checkpoint_40.pt'
    checkpoint = load_checkpoint(checkpoint_fp)  # was: torch.load(checkpoint_fp, weights_only=True)
    Checkpoint.load_objects(to_load=to_load, checkpoint=checkpoint)
    assert torch.equal(fresh.weight, model.weight) and to_load["optimizer"].param_groups[0]["lr"] == 1e-3

    # or using a string for checkpoint filepath

    fresh = torch.nn.Linear(3, 3)
    to_load = {"weights": fresh, "optimizer": torch.optim.SGD(fresh.parameters(), lr=1.0)}
    Checkpoint.load_objects(to_load=to_load, checkpoint=checkpoint_fp)
    assert torch.equal(fresh.weight, model.weight) and to_load["optimizer"].param_groups[0]["lr"] == 1e-3


# -------------------------------------------------------------------- Checkpoint.reload_objects' docstring
def test_reload_objects_docstring_example(where):
    dirname, listdir = where
    trainer = Engine(lambda engine, batch: None)

    # was: with tempfile.TemporaryDirectory() as tmpdirname:
    checkpoint = ModelCheckpoint(dirname, "myprefix", n_saved=None, create_dir=True)

    model = torch.nn.Linear(3, 3)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)

    to_save = {"weights": model, "optimizer": optimizer}

    trainer.add_event_handler(Events.EPOCH_COMPLETED(every=2), checkpoint, to_save)
    trainer.run(torch.randn(10, 1), 5)

    to_load = to_save
    # load checkpoint myprefix_checkpoint_40.pt
    checkpoint.reload_objects(to_load=to_load, global_step=40)

    assert listdir() == ["myprefix_checkpoint_20.pt", "myprefix_checkpoint_40.pt"]
    fresh = torch.nn.Linear(3, 3)
    checkpoint.reload_objects(to_load={"weights": fresh, "optimizer": optimizer}, global_step=20)
    assert torch.equal(fresh.weight, model.weight)  # nothing trains: every checkpoint holds the same weights


# --------------------------------------------------------------------------- WandBLogger's docstring
def run_wandb_example(cls, run_dir: str, accuracies: list[float]):
    trainer = Engine(lambda engine, batch: None)
    evaluator = Engine(lambda engine, batch: None)
    scores = iter(accuracies)
    evaluator.add_event_handler(Events.COMPLETED, lambda e: e.state.metrics.update(accuracy=next(scores)))
    trainer.add_event_handler(Events.EPOCH_COMPLETED, lambda _: evaluator.run([0]))
    model = nn.Linear(2, 2)

    # -- ignite's example, with wandb_logger.run.dir -> run_dir --
    def score_function(engine):
        return engine.state.metrics["accuracy"]

    model_checkpoint = cls(
        run_dir,
        n_saved=2,
        filename_prefix="best",
        require_empty=False,
        score_function=score_function,
        score_name="validation_accuracy",
        global_step_transform=global_step_from_engine(trainer),
    )
    evaluator.add_event_handler(Events.COMPLETED, model_checkpoint, {"model": model})
    # --

    trainer.run([0, 1], max_epochs=len(accuracies))
    return model_checkpoint


WANDB_ACCURACIES = [0.70, 0.75, 0.72, 0.81, 0.64, 0.80]
WANDB_KEPT = ["best_model_4_validation_accuracy=0.8100.pt", "best_model_6_validation_accuracy=0.8000.pt"]


def test_wandb_logger_docstring_example_keeps_what_ignites_keeps(where, tmp_path):
    dirname, listdir = where
    handler = run_wandb_example(ModelCheckpoint, dirname, WANDB_ACCURACIES)
    ignites_folder = tmp_path / "ignite"
    ignites = run_wandb_example(ignite.handlers.ModelCheckpoint, str(ignites_folder), WANDB_ACCURACIES)

    assert listdir() == sorted(os.listdir(ignites_folder)) == WANDB_KEPT
    assert handler.state_dict() == ignites.state_dict()
    assert str(handler.last_checkpoint) == f"{dirname}/{ignites.last_checkpoint.name}"


# ------------------------------------------------------------- shared/reference/ignite-checkpoint-docs.txt
@pytest.mark.parametrize("cls", [ignite.handlers.ModelCheckpoint, ModelCheckpoint], ids=["ignite", "ckptcloud"])
def test_reference_load_objects_example_and_its_pth_typo_behave_as_with_ignite(tmp_path, cls):
    folder = str(tmp_path / "models")  # was: '/tmp/models'
    trainer = Engine(lambda engine, batch: None)
    handler = cls(folder, "myprefix", n_saved=None, create_dir=True)
    model = torch.nn.Linear(3, 3)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    to_save = {"weights": model, "optimizer": optimizer}
    trainer.add_event_handler(Events.EPOCH_COMPLETED(every=2), handler, to_save)
    trainer.run(torch.randn(10, 1), 5)

    to_load = to_save
    checkpoint_fp = f"{folder}/myprefix_checkpoint_40.pth"
    with pytest.raises(FileNotFoundError):  # the reference's '.pth' is a typo in ignite's docs: files end in '.pt'
        torch.load(checkpoint_fp)
    checkpoint = torch.load(checkpoint_fp[: -len("h")])
    Checkpoint.load_objects(to_load=to_load, checkpoint=checkpoint)


# ------------------------------------------------------------------------------------- the s3:// form itself
def test_an_s3_prefix_holding_checkpoints_is_refused_unless_require_empty_is_false(s3):
    client, bucket = s3
    client.put_object(Bucket=bucket, Key="models/old_model_1.pt", Body=b"x")
    with pytest.raises(ValueError, match=r"Objects \['old_model_1.pt'\] .* pass `require_empty=False`"):
        ModelCheckpoint(f"s3://{bucket}/models")
    ModelCheckpoint(f"s3://{bucket}/models", require_empty=False)
    ModelCheckpoint(f"s3://{bucket}/elsewhere")  # other prefixes do not count


def test_s3_url_takes_saver_options_and_torch_save_arguments_as_keywords(s3, monkeypatch):
    client, bucket = s3
    seen = []
    original = torch.save
    monkeypatch.setattr(torch, "save", lambda obj, f, **kwargs: (seen.append(kwargs), original(obj, f, **kwargs)))
    handler = ModelCheckpoint(f"s3://{bucket}/models", part_size=5 * 1024**2, max_concurrency=2, pickle_protocol=4)
    assert isinstance(handler.save_handler, S3Saver)
    assert (handler.save_handler.part_size, handler.save_handler.max_concurrency) == (5 * 1024**2, 2)
    handler(Engine(lambda engine, batch: None), {"model": torch.nn.Linear(2, 2)})
    assert seen == [{"pickle_protocol": 4}] and s3_listdir(client, bucket, "models") == ["model_0.pt"]
    with pytest.raises(TypeError, match="unexpected keyword argument `part_sise`"):
        ModelCheckpoint(f"s3://{bucket}/other", part_sise=5 * 1024**2)


def test_atomic_and_create_dir_are_accepted_for_s3_and_saves_stay_whole(s3):
    client, bucket = s3
    handler = ModelCheckpoint(f"s3://{bucket}/models", atomic=False, create_dir=False, n_saved=1)

    class Unpicklable:
        def state_dict(self):
            return {"fn": lambda: None}

    with pytest.raises(Exception, match=r"(?i)pickle"):
        handler(Engine(lambda engine, batch: None), {"model": Unpicklable()})
    assert s3_listdir(client, bucket, "models") == []  # an object store publishes whole objects or nothing
    run = Engine(lambda engine, batch: None)
    run.add_event_handler(Events.EPOCH_COMPLETED, handler, {"model": torch.nn.Linear(1, 1)})
    run.run([0], max_epochs=3)
    assert s3_listdir(client, bucket, "models") == ["model_3.pt"]


def test_last_checkpoint_of_an_s3_url_is_the_objects_url_and_loads(s3):
    _, bucket = s3
    model = torch.nn.Linear(2, 2)
    handler = ModelCheckpoint(f"s3://{bucket}/runs/a", "best", n_saved=2)
    assert handler.last_checkpoint is None
    for step in (3, 7):
        handler.save(global_step=step, to_save={"model": model})
    assert handler.last_checkpoint == f"s3://{bucket}/runs/a/best_model_7.pt"
    fresh = torch.nn.Linear(2, 2)
    Checkpoint.load_objects({"model": fresh}, handler.last_checkpoint)
    assert torch.equal(fresh.weight, model.weight)


@pytest.fixture(params=["gs", "az"])
def other_cloud(request, monkeypatch):
    """``(url, listdir)`` for a fresh GCS bucket (fake-gcs-server) or Azure container (Azurite), by URL."""
    if request.param == "gs":
        endpoint, client = request.getfixturevalue("gcs_endpoint"), request.getfixturevalue("gcs_client")
        bucket = request.getfixturevalue("gcs_bucket")
        monkeypatch.setenv("STORAGE_EMULATOR_HOST", endpoint.url)
        return f"gs://{bucket}/models", lambda: sorted(b.name[len("models/") :] for b in client.list_blobs(bucket))
    endpoint, service = request.getfixturevalue("azure_endpoint"), request.getfixturevalue("azure_service")
    container = request.getfixturevalue("azure_container")
    monkeypatch.setenv("AZURE_STORAGE_CONNECTION_STRING", endpoint.url)
    monkeypatch.setenv("AZURE_STORAGE_API_VERSION", AZURITE_API_VERSION)
    blobs = service.get_container_client(container)
    return f"az://{container}/models", lambda: sorted(b.name[len("models/") :] for b in blobs.list_blobs())


def test_model_checkpoint_docstring_example_with_gs_and_az_urls(other_cloud):
    dirname, listdir = other_cloud
    trainer = Engine(lambda engine, batch: None)
    handler = ModelCheckpoint(dirname, "myprefix", n_saved=2, create_dir=True, require_empty=False)
    model = nn.Linear(3, 3)
    trainer.add_event_handler(Events.EPOCH_COMPLETED(every=2), handler, {"mymodel": model})
    trainer.run([0, 1, 2, 3, 4], max_epochs=6)
    assert listdir() == ["myprefix_mymodel_20.pt", "myprefix_mymodel_30.pt"]
    assert handler.last_checkpoint == f"{dirname}/myprefix_mymodel_30.pt"
    fresh = nn.Linear(3, 3)
    handler.reload_objects({"mymodel": fresh}, global_step=30)
    assert torch.equal(fresh.weight, model.weight)
