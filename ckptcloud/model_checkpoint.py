"""``ModelCheckpoint``: PyTorch-Ignite's ``ModelCheckpoint`` (0.5.5) on ckptcloud's retention engine.

Same signature, defaults, filenames, ``last_checkpoint`` and folder errors as ignite's, and ``dirname`` may also be a
URL (``s3://bucket/prefix``, ``gs://...``, ``az://...``, ``file:///abs/dir``). It is a :class:`~ckptcloud.Checkpoint`,
so it keeps ckptcloud's differences from ignite (write, then evict; NaN scores never kept; ...; README, "Differences
from ignite"). Its own: bad keywords and flags are refused when the handler is made, not at the first save;
``to_save`` must be a mapping, and with ``include_self`` may not hold a ``"checkpointer"`` (ignite overwrites it);
``last_checkpoint`` of an object store is the object's URL (ignite's only supports folders).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from ckptcloud._loading import check_objects
from ckptcloud.checkpoint import Checkpoint
from ckptcloud.handlers import DiskSaver

# Arguments ignite's ModelCheckpoint took before 0.5.0. ignite 0.5.5 passes them on to torch.save, which then fails
# at the first save; ckptcloud says what replaced them when the handler is made.
_REMOVED_IN_IGNITE_0_5 = {
    "save_interval": "use event filtering instead, e.g. trainer.add_event_handler("
    "Events.ITERATION_COMPLETED(every=1000), handler, to_save)",
    "save_as_state_dict": "objects are always saved as their state_dict",
    "archived": "drop it: checkpoints are always torch.save's zip archive",
}


def _torch_save_arguments() -> tuple[str, ...]:
    """The keyword arguments ``torch.save`` takes besides the object and the file."""
    parameters = inspect.signature(torch.save).parameters.values()
    return tuple(p.name for p in parameters if p.name not in ("obj", "f") and p.kind is not p.VAR_KEYWORD)


_TORCH_SAVE_ARGUMENTS = _torch_save_arguments()


def _check_torch_save_arguments(kwargs: Mapping[str, Any], remote: bool) -> None:
    unknown = sorted(set(kwargs) - set(_TORCH_SAVE_ARGUMENTS))
    if unknown:
        raise TypeError(
            f"ModelCheckpoint got an unexpected keyword argument `{unknown[0]}`: its **kwargs go to torch.save "
            f"({', '.join(_TORCH_SAVE_ARGUMENTS)})" + (" or to the URL's saver" if remote else "")
        )


def _is_cloud_url(dirname: Any) -> bool:
    """``s3://``, ``gs://``, ``az://`` (and unknown schemes, which the saver refuses); not ``file://``."""
    return isinstance(dirname, str) and "://" in dirname and not dirname.lower().startswith("file://")


def _check_flag(value: Any, argument: str) -> None:
    if not isinstance(value, (bool, int)) or value not in (0, 1):
        raise TypeError(f"Argument `{argument}` should be True or False, but given {value!r}")


class _NoObjectsYet:
    """Stands in for ``to_save`` while ``Checkpoint.__init__`` runs: ModelCheckpoint gets its objects per call."""

    def state_dict(self) -> dict[str, Any]:
        return {}


class ModelCheckpoint(Checkpoint):
    """ignite's ``ModelCheckpoint``: a :class:`~ckptcloud.Checkpoint` that takes the objects to save with each call.

    Attach it with ``engine.add_event_handler(event, handler, {"model": model, ...})``; ignite then calls
    ``handler(engine, to_save)``. Port ignite code by changing the import; ``dirname`` may also be a URL.

    Args:
        dirname: a local folder (as in ignite), or a URL: ``s3://bucket/prefix``, ``gs://bucket/prefix``,
            ``az://container/prefix`` or ``file:///abs/dir``.
        filename_prefix: prefix of every filename, e.g. ``"best"`` gives ``best_model_3.pt``.
        score_function: ``score_function(engine)`` returns a number; the highest ones are kept.
        score_name: shown in filenames (``model_3_val_acc=0.7700.pt``); alone, reads
            ``engine.state.metrics[score_name]``.
        n_saved: how many to keep; ``None`` keeps all.
        atomic: local folders: write a temporary file and rename it into place. Object stores always publish a
            checkpoint whole or not at all, so for them ``atomic=False`` is accepted and changes nothing.
        require_empty: refuse a folder or prefix that already holds ``*.pt`` files (``ValueError``).
        create_dir: local folders: create ``dirname`` if missing, else ``ValueError`` when it does not exist.
            Object stores have no folders to create, and their bucket or container must exist either way (checked
            when the handler is made, never created), so for them this changes nothing.
        global_step_transform: ``global_step_transform(engine, event_name)`` gives the step shown in filenames.
        filename_pattern: e.g. ``"{global_step}-{name}.{ext}"``; fields as for :class:`~ckptcloud.Checkpoint`.
        include_self: also save this handler's ``state_dict()`` under ``"checkpointer"``.
        greater_or_equal: a score equal to the lowest kept one replaces it.
        save_on_rank: the rank that writes; every rank calls the handler.
        **kwargs: for a local folder, keyword arguments of ``torch.save`` (``pickle_protocol``, ...). For a URL,
            also the saver's options (``part_size``, ``max_concurrency``, ``region_name``, ``endpoint_url``,
            ``extra_args``, ...; see :func:`~ckptcloud.saver_from_url`). Anything else is a ``TypeError`` now,
            not at the first save.

    Raises:
        ValueError: ``dirname`` holds ``*.pt`` files and ``require_empty`` is true; ``dirname`` does not exist and
            ``create_dir`` is false; and the errors of :class:`~ckptcloud.Checkpoint`'s arguments.
        TypeError: ``dirname`` is not a str or Path, a flag is not a bool, or an unknown keyword argument.

    Example:
        >>> import tempfile
        >>> from ignite.engine import Engine, Events
        >>> from torch import nn
        >>> from ckptcloud import ModelCheckpoint
        >>> trainer = Engine(lambda engine, batch: None)
        >>> folder = tempfile.mkdtemp()  # or "s3://my-bucket/models"
        >>> handler = ModelCheckpoint(folder, "myprefix", n_saved=2, create_dir=True, require_empty=False)
        >>> trainer.add_event_handler(Events.EPOCH_COMPLETED(every=2), handler, {"mymodel": nn.Linear(3, 3)})
        <...>
        >>> _ = trainer.run([0, 1, 2, 3, 4], max_epochs=6)
        >>> sorted(handler.save_handler.list())
        ['myprefix_mymodel_20.pt', 'myprefix_mymodel_30.pt']
        >>> handler.last_checkpoint.name
        'myprefix_mymodel_30.pt'
    """

    def __init__(
        self,
        dirname: str | Path,
        filename_prefix: str = "",
        score_function: Callable[[Any], Any] | None = None,
        score_name: str | None = None,
        n_saved: int | None = 1,
        atomic: bool = True,
        require_empty: bool = True,
        create_dir: bool = True,
        global_step_transform: Callable[[Any, Any], Any] | None = None,
        filename_pattern: str | None = None,
        include_self: bool = False,
        greater_or_equal: bool = False,
        save_on_rank: int = 0,
        **kwargs: Any,
    ) -> None:
        for argument, value in (("atomic", atomic), ("require_empty", require_empty), ("create_dir", create_dir)):
            _check_flag(value, argument)
        removed = sorted(set(kwargs) & set(_REMOVED_IN_IGNITE_0_5))
        if removed:
            name = removed[0]
            raise TypeError(
                f"Argument `{name}` was removed from ignite's ModelCheckpoint in 0.5.0: {_REMOVED_IN_IGNITE_0_5[name]}"
            )
        remote = _is_cloud_url(dirname)
        if not remote:  # before the folder is made: for a folder, every keyword goes to torch.save
            _check_torch_save_arguments(kwargs, remote)
        # Like ignite, the saver comes first: a non-empty or missing folder is reported before other arguments.
        saver = self._make_saver(dirname, atomic, require_empty, create_dir, save_on_rank, kwargs)
        if remote:  # the saver took its own options; what is left goes to torch.save
            _check_torch_save_arguments(getattr(saver, "kwargs", {}), remote)
        super().__init__(
            to_save={"_": _NoObjectsYet()},  # ckptcloud's Checkpoint wants objects; ignite's ModelCheckpoint has {}
            save_handler=saver,
            filename_prefix=filename_prefix,
            score_function=score_function,
            score_name=score_name,
            n_saved=n_saved,
            global_step_transform=global_step_transform,
            filename_pattern=filename_pattern,
            include_self=include_self,
            greater_or_equal=greater_or_equal,
            save_on_rank=save_on_rank,
        )
        self.to_save = {}

    @staticmethod
    def _make_saver(
        dirname: Any, atomic: bool, require_empty: bool, create_dir: bool, save_on_rank: int, kwargs: dict[str, Any]
    ) -> Any:
        options: dict[str, Any] = {"require_empty": require_empty, "save_on_rank": save_on_rank, **kwargs}
        if isinstance(dirname, str) and "://" in dirname:
            from ckptcloud.urls import saver_from_url

            if _is_cloud_url(dirname):
                # Object stores publish whole objects only and have no folders: atomic and create_dir do not apply.
                return saver_from_url(dirname, **options)
            return saver_from_url(dirname, atomic=atomic, create_dir=create_dir, **options)
        return DiskSaver(dirname, atomic=atomic, create_dir=create_dir, **options)

    @property
    def last_checkpoint(self) -> str | Path | None:
        """Where the highest-priority kept checkpoint is: a ``Path`` for a local folder (as in ignite), the full
        URL (``s3://bucket/prefix/model_3.pt``) for an object store, ``None`` when nothing is kept."""
        if not self._saved:
            return None
        filename = self._saved[-1].filename
        dirname = getattr(self.save_handler, "dirname", None)
        if isinstance(dirname, Path):
            return dirname / filename
        url = getattr(self.save_handler, "url", None)
        return url(filename) if callable(url) else filename

    def __call__(self, engine: Any, to_save: Mapping) -> None:  # type: ignore[override]
        """Save ``to_save`` (``{"model": model, ...}``) if retention keeps it; ignite calls this for each event."""
        self._use(to_save)
        super().__call__(engine)

    def save(
        self, global_step: int | None = None, score: float | None = None, *, to_save: Mapping | None = None
    ) -> str | None:
        """Plain-loop entry point: as :meth:`ckptcloud.Checkpoint.save`, with the objects passed as ``to_save=``.

        Example:
            >>> import tempfile, torch
            >>> handler = ModelCheckpoint(tempfile.mkdtemp(), "run")
            >>> handler.save(global_step=5, to_save={"model": torch.nn.Linear(2, 1)})
            'run_model_5.pt'
        """
        if to_save is None:
            raise TypeError("ModelCheckpoint.save needs the objects to save: save(..., to_save={'model': model})")
        self._use(to_save)
        return super().save(global_step=global_step, score=score)

    def _use(self, to_save: Any) -> None:
        """Check ``to_save`` as ignite's ``ModelCheckpoint.__call__`` does (and its type), then save from it."""
        if not isinstance(to_save, Mapping):
            raise TypeError(f"Argument `to_save` should be a dictionary, but given {type(to_save)}")
        if len(to_save) == 0:
            raise RuntimeError("No objects to checkpoint found.")
        check_objects(to_save, "state_dict", "to_save")
        if self.include_self and "checkpointer" in to_save:
            raise ValueError(f"Cannot have key 'checkpointer' if `include_self` is True: {list(to_save)}")
        self.to_save = to_save
