"""The retention engine: decides *what* to keep. No cloud SDKs, no ranks, no buffering here.

``Checkpoint`` follows the public behaviour of PyTorch-Ignite's ``ignite.handlers.Checkpoint`` (0.5.5): names,
defaults, filenames, metadata and error messages. It differs where ignite loses data (see README, "Differences
from ignite"):

* **write, then evict** - the new checkpoint is stored first; the kept list changes and evicted files are removed
  only after the save returned. A save that raises leaves the kept list and every stored file as before.
* **no double calls** - whether the save handler takes ``metadata`` is decided once from its signature, so a
  ``TypeError`` raised inside a save propagates instead of running the save a second time.
* **NaN and infinite scores** are never kept and never evict anything (warned once).
* ``load_state_dict`` sorts the kept list; ``include_self`` with one object keeps the payload a mapping.
"""

from __future__ import annotations

import importlib.util
import inspect
import logging
import math
import numbers
import sys
import warnings
from collections.abc import Callable, Mapping, MutableMapping
from pathlib import Path
from typing import Any, NamedTuple

from torch import nn

from ckptcloud import distributed
from ckptcloud._resume import as_priority, pattern_regex, priority_from
from ckptcloud._tree import tree_apply2, tree_leaves, tree_map
from ckptcloud.background import BackgroundWriter
from ckptcloud.handlers import BaseSaveHandler, DiskSaver, is_save_handler
from ckptcloud.snapshot import snapshot
from ckptcloud.stores.base import ObjectInfo

logger = logging.getLogger("ckptcloud")

SaveHandler = Callable[..., Any]


class _SavedCheckpointEvent:
    """``Checkpoint.SAVED_CHECKPOINT``: ignite's event, looked up on first use so ignite is not imported early."""

    def __get__(self, instance: object, owner: type) -> Any:
        from ignite.handlers.checkpoint import CheckpointEvents

        return CheckpointEvents.SAVED_CHECKPOINT


class Checkpoint:
    """Save objects with ``state_dict`` periodically and keep only the best ``n_saved`` of them.

    Use it as an ignite event handler (``engine.add_event_handler(Events.EPOCH_COMPLETED, checkpoint)``) or in a
    plain loop with :meth:`save`. ``save_handler`` is a save handler (``DiskSaver``, ``S3Saver``, ...), a callable
    ``(checkpoint, filename[, metadata])``, a local folder, or a URL such as ``s3://bucket/prefix``.

    Example:
        >>> import tempfile, torch
        >>> from ckptcloud import Checkpoint
        >>> model = torch.nn.Linear(2, 1)
        >>> ckpt = Checkpoint({"model": model}, tempfile.mkdtemp(), n_saved=2, score_name="val_acc")
        >>> for epoch, acc in enumerate([0.5, 0.9, 0.7], start=1):
        ...     _ = ckpt.save(global_step=epoch, score=acc)
        >>> [filename for _, filename in ckpt.state_dict()["_saved"]]
        ['model_3_val_acc=0.7000.pt', 'model_2_val_acc=0.9000.pt']
    """

    SAVED_CHECKPOINT: Any = _SavedCheckpointEvent()

    class Item(NamedTuple):
        """One kept checkpoint: its priority (score or step) and filename."""

        priority: Any
        filename: str

    def __init__(
        self,
        to_save: Mapping,
        save_handler: str | Path | SaveHandler | BaseSaveHandler,
        filename_prefix: str = "",
        score_function: Callable[[Any], Any] | None = None,
        score_name: str | None = None,
        n_saved: int | None = 1,
        global_step_transform: Callable[[Any, Any], Any] | None = None,
        filename_pattern: str | None = None,
        include_self: bool = False,
        greater_or_equal: bool = False,
        save_on_rank: int = 0,
        resume: bool = False,
        async_save: bool = False,
    ) -> None:
        if not isinstance(to_save, Mapping):
            raise TypeError(f"Argument `to_save` should be a dictionary, but given {type(to_save)}")
        if not to_save:
            raise ValueError("Argument `to_save` should name at least one object to save, but given an empty mapping")
        self._check_objects(to_save, "state_dict", "to_save")
        if include_self:
            if not isinstance(to_save, MutableMapping):
                raise TypeError(
                    f"If `include_self` is True, then `to_save` must be mutable, but given {type(to_save)}."
                )
            if "checkpointer" in to_save:
                raise ValueError(f"Cannot have key 'checkpointer' if `include_self` is True: {list(to_save)}")
        if not (isinstance(save_handler, (str, Path)) or callable(save_handler) or is_save_handler(save_handler)):
            raise TypeError(
                "Argument `save_handler` should be a string or Path object or callable or inherit from "
                f"BaseSaveHandler, but given {type(save_handler)}"
            )
        if global_step_transform is not None and not callable(global_step_transform):
            raise TypeError(f"global_step_transform should be a function, got {type(global_step_transform)} instead.")
        for argument, value in (("filename_prefix", filename_prefix), ("score_name", score_name)):
            if isinstance(value, str) and "/" in value:
                raise ValueError(
                    f"Argument `{argument}` should not contain '/': it becomes part of every filename, and a '/' "
                    f"would put each checkpoint in a folder of its own, where resume, `ckptcloud ls` and retention "
                    f"cannot see it. Given {value!r}; use e.g. {value.replace('/', '_')!r}"
                    + (
                        f" (with score_function=Checkpoint.get_default_score_fn({value!r}) to read that metric)"
                        if argument == "score_name"
                        else ""
                    )
                )
        if n_saved is not None and (isinstance(n_saved, bool) or not isinstance(n_saved, int) or n_saved < 1):
            raise ValueError(f"n_saved must be a positive integer or None, got {n_saved!r}")

        self.to_save = to_save
        self.filename_prefix = filename_prefix
        self.save_handler: Any = self._make_save_handler(save_handler, save_on_rank, resume)
        self.score_function = score_function
        self.score_name = score_name
        if score_name is not None and score_function is None:
            self.score_function = self.get_default_score_fn(score_name)
        self.n_saved = n_saved
        self.ext = "pt"
        self.global_step_transform = global_step_transform
        self.filename_pattern = filename_pattern
        self.include_self = include_self
        self.greater_or_equal = greater_or_equal
        self.save_on_rank = save_on_rank
        self._saved: list[Checkpoint.Item] = []
        self._metadata_mode = _metadata_mode(self.save_handler)
        self._warned_nan = False
        self._background = BackgroundWriter(save_on_rank) if async_save else None
        if resume:
            self.resume()

    # ----------------------------------------------------------------------------------------------- set-up
    @staticmethod
    def _make_save_handler(save_handler: Any, save_on_rank: int, resume: bool) -> Any:
        options: dict[str, Any] = {"save_on_rank": save_on_rank}
        if resume:
            options["require_empty"] = False  # resuming means the prefix holds our earlier checkpoints
        if isinstance(save_handler, str) and "://" in save_handler:
            from ckptcloud.urls import saver_from_url

            return saver_from_url(save_handler, **options)
        if isinstance(save_handler, (str, Path)):
            return DiskSaver(save_handler, create_dir=True, **options)
        return save_handler

    @staticmethod
    def _check_objects(objs: Any, attr: str, argument: str) -> None:
        for obj in tree_leaves(objs):
            if not hasattr(obj, attr):
                raise TypeError(f"Object {type(obj)} in `{argument}` should have `{attr}` method")

    # ------------------------------------------------------------------------------------------- one call
    def __call__(self, engine: Any, *args: Any, **kwargs: Any) -> None:
        """Ignite event-handler entry point: score, gate, save, then evict."""

        def inputs() -> tuple[Any, Any, bool]:
            global_step = None
            if self.global_step_transform is not None:
                global_step = self.global_step_transform(engine, getattr(engine, "last_event_name", None))
            if self.score_function is not None:
                priority = self.score_function(engine)
                if not isinstance(priority, numbers.Number):
                    raise ValueError("Output of score_function should be a number")
            else:
                if global_step is None:
                    global_step = engine.state.iteration
                priority = global_step
            return priority, global_step, self.score_function is not None

        self._save(inputs, engine)

    def save(self, global_step: int | None = None, score: float | None = None) -> str | None:
        """Plain-loop entry point: save unless retention says the checkpoint is not worth keeping.

        In a distributed run, call it on every rank: the writing rank (``save_on_rank``) decides from its own
        ``global_step`` and ``score``, and every rank follows that decision.

        Args:
            global_step: step or epoch put in the filename; the priority when no score is given.
            score: higher is better; required when the checkpoint was built with a score function or name.

        Returns:
            The filename written, or ``None`` when retention skipped this one.

        Example:
            >>> import tempfile, torch
            >>> ckpt = Checkpoint({"model": torch.nn.Linear(2, 1)}, tempfile.mkdtemp(), n_saved=1)
            >>> ckpt.save(global_step=10)
            'model_10.pt'
        """

        def inputs() -> tuple[Any, Any, bool]:
            if score is not None:
                if not isinstance(score, numbers.Number):
                    raise ValueError(
                        f"Argument `score` should be a number (use tensor.item()), but given {type(score)}"
                    )
                return score, global_step, True
            if self.score_function is not None:
                raise ValueError(
                    "This Checkpoint ranks by a score (score_function or score_name was given): pass `score=` to save()"
                )
            if global_step is None:
                raise ValueError("Pass `global_step=` or `score=` to save(): a checkpoint needs a step or a score")
            return global_step, global_step, False

        return self._save(inputs, None)

    def _save(self, inputs: Callable[[], tuple[Any, Any, bool]], engine: Any) -> str | None:
        self.wait()  # async: the previous save is stored and its bookkeeping done before this one is ranked
        plan = self._agree_on_plan(inputs)
        if plan is None:
            return None
        filename: str = plan["filename"]
        priority = plan["priority"]
        payload: Any = self._setup_checkpoint()
        if len(payload) == 1 and not self.include_self:
            payload = payload[self._name()]
        metadata = {"basename": self._basename(), "score_name": self.score_name, "priority": priority}

        kept = list(self._saved)
        evicted: list[Checkpoint.Item] = []
        same = [i for i, item in enumerate(kept) if item.filename == filename]
        if same:
            kept.pop(same[0])  # overwritten in place by the save below, never deleted
        elif not self._check_lt_n_saved():
            evicted.append(kept.pop(0))
        kept.append(Checkpoint.Item(priority, filename))
        kept.sort(key=lambda item: item.priority)
        if self.include_self:
            payload["checkpointer"] = {"_saved": [(p, f) for p, f in kept]}

        # Write first, then evict: if the write raises, nothing has changed.
        def finish() -> None:
            self._saved = kept
            for item in evicted:
                self._remove(item.filename)
            if engine is not None and hasattr(engine, "fire_event"):
                _fire_saved_event(engine)

        if self._background is None:
            self._write(payload, filename, metadata)
            finish()
            return filename
        distributed.sync_xla(payload)  # every rank: XLA's pending graph is a collective step
        if self._writes_here():
            payload = snapshot(payload)  # training may go on now; other ranks copy nothing
        data = payload
        self._background.submit(lambda: self._write(data, filename, metadata), finish, f"saving {filename}")
        return filename

    def _plan(self, inputs: Callable[[], tuple[Any, Any, bool]]) -> dict[str, Any] | None:
        """This rank's decision: ``{"filename", "priority"}`` of the checkpoint to save, or ``None`` to skip it."""
        raw_priority, global_step, with_score = inputs()
        priority = as_priority(raw_priority)
        if _is_non_finite(priority):
            if not self._warned_nan:
                warnings.warn(
                    f"Checkpoint score is {priority!r} (NaN or infinite): not saved, and it evicts nothing "
                    "(further ones are not warned)",
                    RuntimeWarning,
                    stacklevel=5,
                )
                self._warned_nan = True
            return None
        if not (self._check_lt_n_saved() or self._compare_fn(priority)):
            return None
        priority_str = f"{priority}" if isinstance(priority, int) else f"{priority:.4f}"
        pattern = self.filename_pattern or self.setup_filename_pattern(
            with_prefix=len(self.filename_prefix) > 0,
            with_score=with_score,
            with_score_name=self.score_name is not None,
            with_global_step=global_step is not None,
        )
        filename = pattern.format(
            filename_prefix=self.filename_prefix,
            ext=self.ext,
            name=self._name(),
            score_name=self.score_name,
            score=priority_str if with_score else None,
            global_step=global_step,
        )
        same_name = next((item for item in self._saved if item.filename == filename), None)
        if same_name is not None and priority < same_name.priority:
            # e.g. scores 0.95004 then 0.94996 with a score-only name: both are "..._0.9500.pt"
            warnings.warn(
                f"not saving {filename}: it would overwrite the kept checkpoint of that name, whose priority "
                f"{same_name.priority!r} is better than {priority!r} (put {{global_step}} in the filename to keep "
                "both)",
                RuntimeWarning,
                stacklevel=5,
            )
            return None
        return {"filename": filename, "priority": priority}

    def _agree_on_plan(self, inputs: Callable[[], tuple[Any, Any, bool]]) -> dict[str, Any] | None:
        """The writing rank's plan, on every rank; a rank whose own plan differs follows it with a warning."""
        mine: dict[str, Any] | Exception | None
        try:
            mine = self._plan(inputs)
        except Exception as err:
            mine = err

        def writers_plan() -> dict[str, Any] | None:
            if isinstance(mine, Exception):
                raise mine
            return mine

        plan: dict[str, Any] | None = distributed.share(self.save_on_rank, writers_plan, "deciding the next save")
        if plan != mine:
            warnings.warn(
                f"rank {distributed.get_rank()} follows rank {self.save_on_rank}, which {_describe_plan(plan)}, "
                f"although this rank {_describe_plan(mine)}: the ranks passed different scores or steps. Reduce "
                "metrics across ranks (e.g. torch.distributed.all_reduce) before passing them to the checkpoint",
                RuntimeWarning,
                stacklevel=4,
            )
        return plan

    def _writes_here(self) -> bool:
        """Whether the save handler writes on this rank (ckptcloud's and ignite's savers write on one rank only)."""
        if not is_save_handler(self.save_handler):
            return True
        return getattr(self.save_handler, "save_on_rank", distributed.get_rank()) == distributed.get_rank()

    def _name(self) -> str:
        """The ``{name}`` of filenames: the one key of ``to_save``, else ``"checkpoint"``."""
        return next(iter(self.to_save)) if len(self.to_save) == 1 else "checkpoint"

    def _basename(self) -> str:
        """``{filename_prefix}_{name}`` (no underscore without a prefix): what resume matches in metadata."""
        return f"{self.filename_prefix}{'_' * int(len(self.filename_prefix) > 0)}{self._name()}"

    def _write(self, payload: Any, filename: str, metadata: dict[str, Any]) -> None:
        if self._metadata_mode == "positional":
            self.save_handler(payload, filename, metadata)
        elif self._metadata_mode == "keyword":
            self.save_handler(payload, filename, metadata=metadata)
        else:
            self.save_handler(payload, filename)

    # ------------------------------------------------------------------------------------------ async saves
    def wait(self) -> None:
        """With ``async_save=True``: block until the save in flight is stored, then update the kept list and run
        its evictions. Raises the save's error if it failed (on every rank). A no-op for synchronous checkpoints.
        """
        if self._background is not None:
            self._background.wait()

    def close(self) -> None:
        """Finish any save in flight (raising its error) and stop the background worker."""
        if self._background is not None:
            self._background.close()

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _remove(self, filename: str) -> None:
        if not is_save_handler(self.save_handler):
            return  # like ignite: plain callables are never asked to delete anything
        try:
            self.save_handler.remove(filename)
        except Exception as err:  # the new checkpoint is safe; an extra old file is the lesser harm
            logger.warning("could not remove evicted checkpoint %r: %s", filename, err)
            warnings.warn(f"could not remove evicted checkpoint {filename!r}: {err}", RuntimeWarning, stacklevel=4)

    def _setup_checkpoint(self) -> dict[str, Any]:
        zero = _zero_optimizer_class()
        rank = distributed.get_rank()

        def state_of(obj: Any) -> Any:
            if isinstance(obj, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
                obj = obj.module
            elif zero is not None and isinstance(obj, zero):
                if importlib.util.find_spec("numpy") is None:  # the same answer on every rank of one install
                    raise ImportError(
                        "ZeroRedundancyOptimizer.consolidate_state_dict needs numpy (torch's own code converts "
                        "the gathered state with .numpy()), and numpy is not installed: pip install numpy"
                    )
                obj.consolidate_state_dict(to=self.save_on_rank)
                if rank != self.save_on_rank:
                    return {}
            return obj.state_dict()

        return dict(tree_map(state_of, self.to_save))

    def _check_lt_n_saved(self) -> bool:
        return self.n_saved is None or len(self._saved) < self.n_saved

    def _compare_fn(self, new: Any) -> bool:
        if self.greater_or_equal:
            return bool(new >= self._saved[0].priority)
        return bool(new > self._saved[0].priority)

    # ------------------------------------------------------------------------------------ state and helpers
    @property
    def last_checkpoint(self) -> str | Path | None:
        """The highest-priority kept filename (a ``Path`` for a ``DiskSaver``), ``None`` when nothing is kept."""
        if not self._saved:
            return None
        filename = self._saved[-1].filename
        dirname = getattr(self.save_handler, "dirname", None)
        if isinstance(dirname, Path):  # ckptcloud's or ignite's DiskSaver
            return dirname / filename
        return filename

    def state_dict(self) -> dict[str, list[tuple[Any, str]]]:
        """The kept list as ``{"_saved": [(priority, filename), ...]}``, lowest priority first."""
        return {"_saved": [(p, f) for p, f in self._saved]}

    def load_state_dict(self, state_dict: Mapping) -> None:
        """Replace the kept list with the one in ``state_dict`` (sorted by priority)."""
        if not isinstance(state_dict, Mapping):
            raise TypeError(f"Argument state_dict should be a dictionary, but given {type(state_dict)}")
        if "_saved" not in state_dict:
            raise ValueError(
                f"Required state attribute '_saved' is absent in provided state_dict '{list(state_dict.keys())}'"
            )
        items = [Checkpoint.Item(p, f) for p, f in state_dict["_saved"]]
        self._saved = sorted(items, key=lambda item: item.priority)

    def resume(self) -> list[Checkpoint.Item]:
        """Rebuild the kept list from the checkpoints stored under the save handler's folder or prefix.

        Only filenames this checkpoint's own pattern could have produced count (and, where the object carries
        ckptcloud's metadata, only those with this checkpoint's basename); anything else is never touched.
        Priorities are the exact ones saved with each object, else what the filename shows. If more than
        ``n_saved`` match (a crash between a save and its eviction), the lowest are removed, so retention
        converges back to ``n_saved``. ``Checkpoint(..., resume=True)`` calls this at construction.

        Returns:
            The kept list, lowest priority first.

        Example:
            >>> import tempfile, torch
            >>> folder = tempfile.mkdtemp()
            >>> first = Checkpoint({"model": torch.nn.Linear(2, 1)}, folder, n_saved=2)
            >>> for step in (1, 2, 3):
            ...     _ = first.save(global_step=step)
            >>> again = Checkpoint({"model": torch.nn.Linear(2, 1)}, folder, n_saved=2, resume=True)
            >>> again.state_dict()
            {'_saved': [(2, 'model_2.pt'), (3, 'model_3.pt')]}
        """
        describe = getattr(self.save_handler, "describe", None)
        if not callable(describe):
            raise TypeError(
                f"resume needs a save handler that can list what it stored (DiskSaver, S3Saver, ...), "
                f"but given {type(self.save_handler)}"
            )
        # The writing rank lists; every rank gets its listing, or raises its error.
        listing = distributed.share(self.save_on_rank, lambda: _encode_listing(describe()), "listing checkpoints")
        stored = {name: ObjectInfo(**info) for name, info in listing.items()}
        items = self._matching_items(stored)
        extra = len(items) - self.n_saved if self.n_saved is not None else 0
        self._saved = items[max(extra, 0) :]
        for item in items[: max(extra, 0)]:
            self._remove(item.filename)
        return list(self._saved)

    def _matching_items(self, stored: Mapping[str, ObjectInfo]) -> list[Checkpoint.Item]:
        from urllib.parse import unquote

        name, basename = self._name(), self._basename()
        if self.filename_pattern:
            patterns = [self.filename_pattern]
        else:  # what _plan can produce: with or without a step; a score when ranked by one or given to save()
            by_score = self.score_function is not None
            patterns = [
                self.setup_filename_pattern(
                    len(self.filename_prefix) > 0, with_score, self.score_name is not None, step
                )
                for with_score in ((True,) if by_score else (False, True))
                for step in (True, False)
                if step or with_score
            ]
        known = {"filename_prefix": self.filename_prefix, "ext": self.ext, "name": name, "score_name": self.score_name}
        regexes = [pattern_regex(pattern, known) for pattern in patterns]
        items = []
        for filename, info in stored.items():
            metadata = info.metadata
            match = next((m for m in (r.fullmatch(filename) for r in regexes) if m), None)
            if match is None:
                continue
            if "ckptcloud_basename" in metadata and unquote(metadata["ckptcloud_basename"]) != basename:
                continue
            priority = priority_from(metadata, match)
            if priority is None or _is_non_finite(priority):
                continue
            items.append(Checkpoint.Item(priority, filename))
        return sorted(items, key=lambda item: item.priority)

    def reload_objects(self, to_load: Mapping, load_kwargs: dict | None = None, **filename_components: Any) -> None:
        """Load ``to_load`` from one of this checkpoint's files, named by its filename components.

        Like ignite's: ``filename_components`` are ``name``, ``score`` and ``global_step``, put into this
        checkpoint's filename pattern; ``load_kwargs`` go to ``nn.Module.load_state_dict`` (e.g. ``strict=False``).
        Unlike ignite's, it works with every ckptcloud saver, remote ones included, and a numeric ``score`` is
        written as saving wrote it (``0.7`` names ``..._0.7000.pt``).

        Example:
            >>> import tempfile, torch
            >>> model = torch.nn.Linear(2, 1)
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
        global_step = filename_components.get("global_step")
        score = filename_components.get("score")
        if isinstance(score, numbers.Real) and not isinstance(score, bool):
            score = f"{score}" if isinstance(score, numbers.Integral) else f"{score:.4f}"
        pattern = self.filename_pattern or self.setup_filename_pattern(
            with_prefix=len(self.filename_prefix) > 0,
            with_score=self.score_function is not None,
            with_score_name=self.score_name is not None,
            with_global_step=global_step is not None,
        )
        filename = pattern.format(
            filename_prefix=self.filename_prefix,
            ext=self.ext,
            name=filename_components.get("name", self._name()),
            score_name=self.score_name,
            score=score,
            global_step=global_step,
        )
        checkpoint = load(filename, mmap=False)  # the tensors go on to live in the objects: no mapped file
        Checkpoint.load_objects(to_load, checkpoint, **(load_kwargs or {}))

    def reset(self) -> None:
        """Forget the kept list; stored checkpoints are not deleted."""
        self._saved = []

    @staticmethod
    def setup_filename_pattern(
        with_prefix: bool = True,
        with_score: bool = True,
        with_score_name: bool = True,
        with_global_step: bool = True,
    ) -> str:
        """The default filename pattern, e.g. ``"{filename_prefix}_{name}_{global_step}_{score_name}={score}.{ext}"``.

        Example:
            >>> Checkpoint.setup_filename_pattern(with_prefix=False, with_score_name=False)
            '{name}_{global_step}_{score}.{ext}'
        """
        if not (with_global_step or with_score):
            raise ValueError("At least one of with_score and with_global_step should be True.")
        pattern = "{name}"
        if with_global_step:
            pattern += "_{global_step}"
        if with_score_name and with_score:
            pattern += "_{score_name}={score}"
        elif with_score:
            pattern += "_{score}"
        elif with_score_name:
            raise ValueError("If with_score_name is True, with_score should be also True")
        if with_prefix:
            pattern = "{filename_prefix}_" + pattern
        return pattern + ".{ext}"

    @staticmethod
    def get_default_score_fn(metric_name: str, score_sign: float = 1.0) -> Callable[[Any], float]:
        """A score function reading ``engine.state.metrics[metric_name]`` (times ``score_sign``, 1 or -1).

        Example:
            >>> from types import SimpleNamespace
            >>> fn = Checkpoint.get_default_score_fn("loss", -1.0)
            >>> fn(SimpleNamespace(state=SimpleNamespace(metrics={"loss": 0.25})))
            -0.25
        """
        if score_sign not in (1.0, -1.0):
            raise ValueError(f"Argument score_sign should be 1 or -1, but given {score_sign!r}")

        def score_fn(engine: Any) -> float:
            return score_sign * engine.state.metrics[metric_name]

        return score_fn

    @staticmethod
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
            >>> Checkpoint.load_objects({"model": model}, {"model": torch.nn.Linear(2, 1).state_dict()})
        """
        if not isinstance(checkpoint, (Mapping, str, Path)):
            raise TypeError(f"Argument checkpoint should be a string or a dictionary, but given {type(checkpoint)}")
        if not isinstance(to_load, Mapping):
            raise TypeError(f"Argument `to_load` should be a dictionary, but given {type(to_load)}")
        Checkpoint._check_objects(to_load, "load_state_dict", "to_load")
        if isinstance(checkpoint, (str, Path)):
            from ckptcloud.urls import load_checkpoint

            checkpoint = load_checkpoint(checkpoint, map_location=map_location, weights_only=weights_only)

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


def _is_non_finite(value: Any) -> bool:
    """NaN or infinite: such a score would block (inf) or confuse (NaN) every later comparison."""
    try:
        return isinstance(value, numbers.Real) and not math.isfinite(value)
    except (TypeError, ValueError, OverflowError):
        return False


def _describe_plan(plan: dict[str, Any] | Exception | None) -> str:
    if plan is None:
        return "skips this save"
    if isinstance(plan, Exception):
        return f"failed to decide ({type(plan).__name__}: {plan})"
    return f"saves {plan['filename']}"


def _encode_listing(stored: Mapping[str, ObjectInfo]) -> dict[str, dict[str, Any]]:
    """A save handler's listing as JSON data, to share it between ranks."""
    return {
        name: {"key": i.key, "size": i.size, "last_modified": i.last_modified, "metadata": dict(i.metadata)}
        for name, i in stored.items()
    }


def _metadata_mode(handler: Any) -> str:
    """Decide once, from the signature, how ``handler`` takes ``metadata``: positional, keyword or not at all."""
    try:
        signature = inspect.signature(handler)
    except (TypeError, ValueError):
        return "positional"
    params = list(signature.parameters.values())
    meta = signature.parameters.get("metadata")
    if meta is not None and meta.kind is meta.KEYWORD_ONLY:
        return "keyword"
    if meta is not None or any(p.kind is p.VAR_POSITIONAL for p in params):
        return "positional"
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if len(positional) >= 3:
        return "positional"
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return "keyword"
    return "none"


def _zero_optimizer_class() -> type | None:
    """``ZeroRedundancyOptimizer`` if the program imported it (a ZeRO optimizer in ``to_save`` implies it)."""
    module = sys.modules.get("torch.distributed.optim.zero_redundancy_optimizer")
    return getattr(module, "ZeroRedundancyOptimizer", None)


def _fire_saved_event(engine: Any) -> None:
    try:
        from ignite.handlers.checkpoint import CheckpointEvents
    except ImportError:
        return
    if not engine.has_registered_events(CheckpointEvents.SAVED_CHECKPOINT):
        engine.register_events(*CheckpointEvents)
    engine.fire_event(CheckpointEvents.SAVED_CHECKPOINT)
