"""Sharded checkpoints in a ``Checkpoint`` (``sharded=True``, a mixin of ``Checkpoint``), and loading them.

A sharded checkpoint is a ``torch.distributed.checkpoint`` (DCP) folder, ``<prefix>/<name>/``, where ``name`` is
the filename a single-file save would get minus its ``.pt`` extension; it is committed when its ``.metadata``
exists, and that object carries the retention metadata (see :mod:`ckptcloud.dcp.retention`). Every rank saves
and loads its own shards. Models and optimizers go through ``torch.distributed.checkpoint.state_dict``
(``get_model_state_dict``/``get_optimizer_state_dict`` and their ``set_`` counterparts), so FSDP2 and DTensor
parameters and their optimizer state stay sharded; other objects are saved as their ``state_dict()`` gives them.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ckptcloud import distributed


def _owner(optimizer: torch.optim.Optimizer, key: str, models: Mapping[str, nn.Module], argument: str) -> nn.Module:
    """The first model of ``models`` that holds every parameter ``optimizer`` updates (its FQNs name the state)."""
    params = {id(p) for group in optimizer.param_groups for p in group["params"]}
    for model in models.values():
        if params <= {id(p) for p in model.parameters()}:
            return model
    raise ValueError(
        f"Argument `{argument}`: the optimizer {key!r} updates parameters of no model in `{argument}` "
        f"({sorted(models) or 'none'}). A sharded checkpoint names optimizer state by the model's parameter names: "
        "put the model that owns its parameters in the same mapping"
    )


def _check_flat(objects: Mapping, argument: str) -> None:
    for key, obj in objects.items():
        if not isinstance(key, str) or isinstance(obj, (Mapping, list, tuple)):
            raise TypeError(
                f"Argument `{argument}` of a sharded checkpoint should map str keys to objects (models, optimizers, "
                f"objects with state_dict), not nested containers: given {key!r}: {type(obj).__name__}"
            )


def sharded_state_dict(objects: Mapping, argument: str = "to_save") -> dict[str, Any]:
    """``{key: state}`` for a DCP save or load: models by ``get_model_state_dict``, optimizers by
    ``get_optimizer_state_dict`` (with the model in ``objects`` that owns their parameters), other objects by
    their own ``state_dict()``. Every rank calls it (FSDP2/DTensor states are this rank's shards).

    Example:
        >>> model = torch.nn.Linear(2, 1)
        >>> state = sharded_state_dict({"model": model, "opt": torch.optim.SGD(model.parameters(), lr=0.1)})
        >>> sorted(state["model"]), sorted(state["opt"])
        (['bias', 'weight'], ['param_groups', 'state'])
    """
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    _check_flat(objects, argument)
    models = {key: obj for key, obj in objects.items() if isinstance(obj, nn.Module)}
    state: dict[str, Any] = {}
    for key, obj in objects.items():
        if isinstance(obj, nn.Module):
            state[key] = get_model_state_dict(obj)
        elif isinstance(obj, torch.optim.Optimizer):
            state[key] = get_optimizer_state_dict(_owner(obj, key, models, argument), obj)
        else:
            state[key] = obj.state_dict()
    return state


def load_sharded(to_load: Mapping, reader: Any, *, strict: bool = True) -> None:
    """Load the sharded checkpoint ``reader`` reads into every object of ``to_load``; call it on every rank.

    Each rank builds the state it holds (its shards of FSDP2/DTensor parameters), DCP fills it in place from the
    checkpoint (resharding when the world size changed), and it goes back into the objects with
    ``set_model_state_dict``/``set_optimizer_state_dict`` (other objects: ``load_state_dict``).

    Args:
        to_load: the objects, under the keys they were saved with.
        reader: a :class:`~ckptcloud.dcp.CloudStorageReader`.
        strict: models must match the checkpoint's keys exactly (``nn.Module.load_state_dict``'s ``strict``).
    """
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    for key, obj in to_load.items():
        if not isinstance(obj, (nn.Module, torch.optim.Optimizer)) and not hasattr(obj, "state_dict"):
            raise TypeError(
                f"Object {key!r} in `to_load` needs a `state_dict` method to be loaded from a sharded checkpoint "
                "(its current state tells DCP what to read)"
            )
    state = sharded_state_dict(to_load, "to_load")
    no_dist = not (dist.is_available() and dist.is_initialized())
    dcp.load(state, storage_reader=reader, no_dist=no_dist)
    models = {key: obj for key, obj in to_load.items() if isinstance(obj, nn.Module)}
    options = StateDictOptions(strict=strict)
    for key, obj in to_load.items():
        if isinstance(obj, nn.Module):
            set_model_state_dict(obj, state[key], options=options)
        elif isinstance(obj, torch.optim.Optimizer):
            set_optimizer_state_dict(_owner(obj, key, models, "to_load"), obj, state[key], options=options)
        else:
            obj.load_state_dict(state[key])


def is_reader(checkpoint: Any) -> bool:
    """Whether ``checkpoint`` is a :class:`~ckptcloud.dcp.CloudStorageReader` (without importing DCP)."""
    module = sys.modules.get("ckptcloud.dcp.reader")
    return module is not None and isinstance(checkpoint, module.CloudStorageReader)


def local_folder_reader(checkpoint: str | Path) -> Any | None:
    """A reader for a local path or ``file://`` URL naming a committed sharded checkpoint folder; ``None`` for one
    that names no folder.

    Raises:
        FileNotFoundError: a folder without ``.metadata`` (not a committed checkpoint).
    """
    if isinstance(checkpoint, str) and checkpoint.startswith("file://"):
        from ckptcloud.urls import split_url

        checkpoint = split_url(checkpoint)[2]
    if isinstance(checkpoint, str) and "://" in checkpoint:
        return None
    path = Path(checkpoint)
    if not path.is_dir():
        return None
    if not (path / ".metadata").is_file():
        raise FileNotFoundError(
            f"no sharded checkpoint at {path}: {path / '.metadata'} does not exist (never saved, not yet committed, "
            "or a save that failed)"
        )
    from ckptcloud.dcp.reader import CloudStorageReader

    return CloudStorageReader(Path(os.path.abspath(path)).as_uri())


def remote_folder_reader(url: Any) -> Any | None:
    """A reader for a cloud URL naming a committed sharded checkpoint folder (one HEAD of its ``.metadata``), else
    ``None``; asked only once a single-file load found no object at ``url``."""
    if not isinstance(url, str) or "://" not in url or url.startswith("file://"):
        return None
    from ckptcloud.dcp.folder import is_committed
    from ckptcloud.dcp.target import Target

    try:  # any failure here: the single-file load's own error is the one to report
        target = Target(url.rstrip("/"))
        committed = is_committed(target.store, target.prefix, target.retry)
    except Exception:
        return None
    if not committed:
        return None
    from ckptcloud.dcp.reader import CloudStorageReader

    return CloudStorageReader(url.rstrip("/"))


class Sharded:
    """``sharded=True`` in a :class:`~ckptcloud.Checkpoint`: folder names, the resume patterns that match them,
    and loading a kept folder through the checkpoint's own store."""

    sharded: bool
    ext: str
    save_handler: Any

    def _filename(self, **components: Any) -> str:
        name: str = super()._filename(**components)  # type: ignore[misc]
        return name.removesuffix(f".{self.ext}") if self.sharded else name

    def _filename_regexes(self) -> list[re.Pattern[str]]:
        regexes: list[re.Pattern[str]] = super()._filename_regexes()  # type: ignore[misc]
        if not self.sharded:
            return regexes
        suffix = re.escape(f".{self.ext}")
        return [re.compile(regex.pattern.removesuffix(suffix)) for regex in regexes]

    def reload_objects(self, to_load: Mapping, load_kwargs: dict | None = None, **filename_components: Any) -> None:
        """Load ``to_load`` from one of this checkpoint's files or folders, named by its filename components (see
        :meth:`ckptcloud.Checkpoint.reload_objects`); a sharded one loads on every rank (``load_kwargs`` may hold
        ``strict``)."""
        if not self.sharded:
            super().reload_objects(to_load, load_kwargs, **filename_components)  # type: ignore[misc]
            return
        name = self._filename(
            with_score=self.score_function is not None,  # type: ignore[attr-defined]
            score=filename_components.get("score"),
            global_step=filename_components.get("global_step"),
            name=filename_components.get("name"),
        )
        strict = (load_kwargs or {}).get("strict", True)
        self.load_objects(to_load, self.save_handler.reader(name), strict=strict)  # type: ignore[attr-defined]
        self._guard_names([name])  # type: ignore[attr-defined]  # the resume guard: kept until a newer commit

    def _load_source(self, checkpoint: Any, options: dict[str, Any]) -> Any:
        if self.sharded:
            name = self._own_filename(checkpoint.rstrip("/") if isinstance(checkpoint, str) else checkpoint)  # type: ignore[attr-defined]
            if name is not None and "/" not in name:
                return self.save_handler.reader(name)
        return super()._load_source(checkpoint, options)  # type: ignore[misc]


def make_sharded_handler(save_handler: Any, save_on_rank: int, resume: bool) -> Any:
    """The :class:`~ckptcloud.dcp.retention.ShardedSaver` for ``Checkpoint(save_handler, sharded=True)``: over a
    ``RemoteSaver`` as given, a cloud URL's saver, or a local folder (``file://`` URL or path). One made from a URL
    or path refuses a prefix that already holds committed sharded checkpoints unless ``resume``.

    Raises:
        TypeError: a save handler that cannot hold sharded checkpoints.
        ValueError: a non-empty prefix without ``resume``.
    """
    from ckptcloud.dcp.retention import ShardedSaver, list_sharded
    from ckptcloud.remote import RemoteSaver

    if isinstance(save_handler, ShardedSaver):
        return save_handler
    if isinstance(save_handler, RemoteSaver):
        return ShardedSaver(save_handler)
    options: dict[str, Any] = {"save_on_rank": save_on_rank, "require_empty": False}
    if isinstance(save_handler, str) and "://" in save_handler and not save_handler.startswith("file://"):
        from ckptcloud.urls import saver_from_url

        saver = saver_from_url(save_handler, **options)
    elif isinstance(save_handler, (str, Path)):
        from ckptcloud.stores.local import LocalStore
        from ckptcloud.urls import split_url

        path = split_url(save_handler)[2] if isinstance(save_handler, str) and "://" in save_handler else save_handler
        folder = Path(os.path.abspath(path))
        if distributed.get_rank() == save_on_rank:
            folder.mkdir(parents=True, exist_ok=True)
        saver = RemoteSaver(LocalStore(), folder.as_posix(), check_bucket=False, **options)
    else:
        raise TypeError(
            "Argument `save_handler` of a sharded Checkpoint should be a URL (s3://, gs://, az://, file://), a local "
            f"folder, or a RemoteSaver (S3Saver, GCSSaver, AzureBlobSaver), but given {type(save_handler)}"
        )
    if not resume:

        def check_empty() -> None:
            existing = sorted(list_sharded(saver))
            if existing:
                raise ValueError(
                    f"Sharded checkpoints {existing[:10]} are already committed under {saver.url('')}. Pass "
                    "resume=True to continue that run, or use another prefix"
                )

        distributed.run_on_rank(save_on_rank, check_empty, f"checking {saver.url('')}")
    return ShardedSaver(saver)
