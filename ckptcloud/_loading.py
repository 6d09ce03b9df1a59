"""Restoring objects from a checkpoint: ``load_objects`` and ``reload_objects`` (a mixin of ``Checkpoint``)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import nn

from ckptcloud._retention import guarded_load
from ckptcloud._sharded import is_reader, load_sharded, local_folder_reader, remote_folder_reader
from ckptcloud._tree import tree_apply2, tree_leaves


def check_objects(objs: Any, attr: str, argument: str) -> None:
    """Every object of ``objs`` must have the method ``attr`` (``state_dict`` to save, ``load_state_dict`` to load)."""
    for obj in tree_leaves(objs):
        if not hasattr(obj, attr):
            raise TypeError(f"Object {type(obj)} in `{argument}` should have `{attr}` method")


class Loading:
    """Loading checkpoints back into objects (``reload_objects`` reads the checkpoint's naming and save handler)."""

    save_handler: Any
    score_function: Any

    def reload_objects(self, to_load: Mapping, load_kwargs: dict | None = None, **filename_components: Any) -> None:
        """Load ``to_load`` from one of this checkpoint's files, named by its filename components.

        Like ignite's: ``filename_components`` are ``name``, ``score`` and ``global_step``, put into this
        checkpoint's filename pattern; ``load_kwargs`` go to ``nn.Module.load_state_dict`` (e.g. ``strict=False``),
        except ``map_location`` and ``weights_only``, which apply to reading the file.
        Unlike ignite's, it works with every ckptcloud saver, remote ones included, and a numeric ``score`` is
        written as saving wrote it (``0.7`` names ``..._0.7000.pt``).

        Example:
            >>> import tempfile, torch
            >>> model = torch.nn.Linear(2, 1)
            >>> from ckptcloud import Checkpoint
            >>> ckpt = Checkpoint({"model": model}, tempfile.mkdtemp(), n_saved=2)
            >>> _ = ckpt.save(global_step=40)
            >>> ckpt.reload_objects({"model": torch.nn.Linear(2, 1)}, global_step=40)
        """
        load = getattr(self.save_handler, "load", None)
        if not callable(load):
            raise AttributeError(
                "Checkpoint's `save_handler` should be a saver that can load (DiskSaver, S3Saver, GCSSaver, "
                f"AzureBlobSaver, RemoteSaver), given {type(self.save_handler)}"
            )
        filename = self._filename(  # type: ignore[attr-defined]
            with_score=self.score_function is not None,
            score=filename_components.get("score"),
            global_step=filename_components.get("global_step"),
            name=filename_components.get("name"),
        )
        kwargs = dict(load_kwargs or {})  # map_location and weights_only are for reading the file, the rest for
        reading = {key: kwargs.pop(key) for key in ("map_location", "weights_only") if key in kwargs}  # the objects
        checkpoint = load(filename, mmap=False, **reading)  # the tensors go on to live in the objects: no mapped file
        self.load_objects(to_load, checkpoint, **kwargs)
        self._guard_names([filename])  # type: ignore[attr-defined]  # the resume guard: kept until a newer commit

    @guarded_load  # a staticmethod on the class; on an instance it also feeds the resume guard
    def load_objects(
        to_load: Mapping,
        checkpoint: Mapping | str | Path,
        *,
        map_location: Any = "cpu",
        weights_only: bool = True,
        **kwargs: Any,
    ) -> None:
        """Call ``load_state_dict`` on every object of ``to_load`` with its state from ``checkpoint``.

        Args:
            to_load: objects to restore, e.g. ``{"model": model, "optimizer": optimizer}``.
            checkpoint: a loaded checkpoint mapping, a local path, or a URL (``s3://bucket/key``, ...).
            map_location: where tensors of a path/URL checkpoint go (default CPU).
            weights_only: ``torch.load``'s safe unpickler (default); pass ``False`` only for files you trust.
            **kwargs: forwarded to ``nn.Module.load_state_dict`` (e.g. ``strict=False``).

        Example:
            >>> import torch
            >>> model = torch.nn.Linear(2, 1)
            >>> from ckptcloud import Checkpoint
            >>> Checkpoint.load_objects({"model": model}, {"model": torch.nn.Linear(2, 1).state_dict()})
        """
        if not isinstance(checkpoint, (Mapping, str, Path)) and not is_reader(checkpoint):
            raise TypeError(f"Argument checkpoint should be a string or a dictionary, but given {type(checkpoint)}")
        if not isinstance(to_load, Mapping):
            raise TypeError(f"Argument `to_load` should be a dictionary, but given {type(to_load)}")
        check_objects(to_load, "load_state_dict", "to_load")
        reader = checkpoint if is_reader(checkpoint) else None
        if reader is None and isinstance(checkpoint, (str, Path)):
            from ckptcloud.urls import load_checkpoint

            reader = local_folder_reader(checkpoint)
            if reader is None:
                try:
                    checkpoint = load_checkpoint(checkpoint, map_location=map_location, weights_only=weights_only)
                except (FileNotFoundError, ValueError):  # no such object: is it a sharded checkpoint's folder?
                    reader = remote_folder_reader(checkpoint)
                    if reader is None:
                        raise
        if reader is not None:  # a sharded checkpoint: every rank loads its own shards
            load_sharded(to_load, reader, strict=kwargs.get("strict", True))
            return

        def load_one(obj: Any, state: Any) -> None:
            if isinstance(obj, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
                obj = obj.module
            if isinstance(obj, nn.Module):
                obj.load_state_dict(state, **kwargs)
            else:
                obj.load_state_dict(state)

        if len(to_load) == 1:
            key, obj = next(iter(to_load.items()))
            if key not in checkpoint:
                load_one(obj, checkpoint)
                return
        tree_apply2(load_one, to_load, checkpoint)
