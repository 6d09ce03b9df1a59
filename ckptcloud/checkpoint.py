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
* ``keep=`` takes a retention policy (``ckptcloud.policies``) in place of ``n_saved``; the checkpoint a run resumed
  from, or loaded through ``ckpt.load_objects``, is kept until a newer one is committed (see ``_retention``).
"""

from __future__ import annotations

import logging
import numbers
import uuid
import warnings
from collections.abc import Callable, Mapping, MutableMapping
from pathlib import Path
from typing import Any, NamedTuple

from ckptcloud import _retention, distributed
from ckptcloud._ignite import SavedCheckpointEvent, fire_saved_event
from ckptcloud._loading import Loading, check_objects
from ckptcloud._naming import Naming, check_name_arguments
from ckptcloud._payload import state_dicts
from ckptcloud._resume import Resume, as_priority, is_non_finite
from ckptcloud._retention import DEFAULT_N_SAVED, Retention, check_keep, step_of
from ckptcloud._sharded import Sharded, make_sharded_handler, sharded_state_dict
from ckptcloud.background import BackgroundWriter
from ckptcloud.contract import BaseSaveHandler, is_save_handler, metadata_mode
from ckptcloud.handlers import DiskSaver
from ckptcloud.policies import CheckpointInfo, Policy

logger = logging.getLogger("ckptcloud")

SaveHandler = Callable[..., Any]


class Checkpoint(Sharded, Naming, Resume, Loading, Retention):
    """Save objects with ``state_dict`` periodically and keep only the best ``n_saved`` of them, or what a retention
    policy keeps (``keep=BestN(3) | LatestN(1)``, see :mod:`ckptcloud.policies`).

    Use it as an ignite event handler (``engine.add_event_handler(Events.EPOCH_COMPLETED, checkpoint)``) or in a
    plain loop with :meth:`save`. ``save_handler`` is a save handler (``DiskSaver``, ``S3Saver``, ...), a callable
    ``(checkpoint, filename[, metadata])``, a local folder, or a URL such as ``s3://bucket/prefix``. With ``keep=``
    a save the policy would not keep is skipped before anything is uploaded; ``n_saved`` cannot be passed too.
    With ``sharded=True`` every checkpoint is a ``torch.distributed.checkpoint`` folder written by every rank
    (FSDP2/DTensor state stays sharded; see :mod:`ckptcloud._sharded`), named like the file minus ``.pt``.

    Example:
        >>> import tempfile, torch
        >>> from ckptcloud import Checkpoint
        >>> model = torch.nn.Linear(2, 1)
        >>> ckpt = Checkpoint({"model": model}, tempfile.mkdtemp(), n_saved=2, score_name="val_acc")
        >>> for epoch, acc in enumerate([0.5, 0.9, 0.7], start=1):
        ...     _ = ckpt.save(global_step=epoch, score=acc)
        >>> [filename for _, filename in ckpt.state_dict()["_saved"]]
        ['model_3_val_acc=0.7000.pt', 'model_2_val_acc=0.9000.pt']
        >>> from ckptcloud.policies import BestN, EveryNSteps
        >>> ckpt = Checkpoint({"model": model}, tempfile.mkdtemp(), score_name="acc", keep=BestN(1) | EveryNSteps(2))
        >>> [ckpt.save(global_step=step, score=acc) for step, acc in [(1, 0.5), (2, 0.9), (3, 0.7), (4, 0.1)]]
        ['model_1_acc=0.5000.pt', 'model_2_acc=0.9000.pt', None, 'model_4_acc=0.1000.pt']
        >>> ckpt.save_handler.list()
        ['model_2_acc=0.9000.pt', 'model_4_acc=0.1000.pt']
    """

    SAVED_CHECKPOINT: Any = SavedCheckpointEvent()

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
        n_saved: int | None = DEFAULT_N_SAVED,
        global_step_transform: Callable[[Any, Any], Any] | None = None,
        filename_pattern: str | None = None,
        include_self: bool = False,
        greater_or_equal: bool = False,
        save_on_rank: int = 0,
        resume: bool = False,
        async_save: bool = False,
        run_id: str | None = None,
        keep: Policy | None = None,
        sharded: bool = False,
    ) -> None:
        if not isinstance(to_save, Mapping):
            raise TypeError(f"Argument `to_save` should be a dictionary, but given {type(to_save)}")
        if not to_save:
            raise ValueError("Argument `to_save` should name at least one object to save, but given an empty mapping")
        check_objects(to_save, "state_dict", "to_save")
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
        check_name_arguments(filename_prefix, score_name)
        if n_saved is not None and (isinstance(n_saved, bool) or not isinstance(n_saved, int) or n_saved < 1):
            raise ValueError(f"n_saved must be a positive integer or None, got {n_saved!r}")
        check_keep(keep, n_saved)
        if run_id is not None and (not isinstance(run_id, str) or not run_id.strip()):
            raise ValueError(f"Argument `run_id` should be a non-empty string or None, but given {run_id!r}")

        if not isinstance(sharded, bool):
            raise TypeError(f"Argument `sharded` should be a bool, but given {type(sharded)}")
        if sharded and getattr(save_handler, "dedup", None) is not None:
            raise NotImplementedError("dedup=True savers do not support sharded=True yet: use sharded=False")

        self.to_save = to_save
        self.filename_prefix = filename_prefix
        self.sharded = sharded
        self.save_handler: Any = (
            make_sharded_handler(save_handler, save_on_rank, resume)
            if sharded
            else self._make_save_handler(save_handler, save_on_rank, resume)
        )
        self.score_function = score_function
        self.score_name = score_name
        if score_name is not None and score_function is None:
            self.score_function = self.get_default_score_fn(score_name)
        self._init_retention(n_saved, keep)
        self.ext = "pt"
        self.global_step_transform = global_step_transform
        self.filename_pattern = filename_pattern
        self.include_self = include_self
        self.greater_or_equal = greater_or_equal
        self.save_on_rank = save_on_rank
        self._metadata_mode = metadata_mode(self.save_handler)
        self._warned_nan = False
        self._background = BackgroundWriter(save_on_rank) if async_save else None
        # Who owns the checkpoints: stored with each object, so another job's saves never replace them unseen.
        self.run_id = run_id or uuid.uuid4().hex[:16]
        self._run_id_given = run_id is not None
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
        self._plans += 1
        seq = self._plans  # the resume guard: what is guarded after this point outlives this save's evictions
        shared = self._agree_on_plan(inputs)
        if shared is None:
            return None
        plan = self._completed(shared)
        filename: str = plan["filename"]
        payload: Any = self._setup_checkpoint()
        if len(payload) == 1 and not self.include_self and not self.sharded:
            payload = payload[self._name()]
        metadata = {"basename": self._basename(), "score_name": self.score_name, "priority": plan["priority"]}
        if getattr(self.save_handler, "stores_run_id", False):  # remote savers keep these; others get ignite's keys
            metadata.update(run=self.run_id, step=plan["step"], time=plan["time"], score=plan["score"])
        if self.include_self:
            payload["checkpointer"] = self._state_after(plan)

        # Write first, then evict: if the write raises, nothing has changed.
        def finish() -> None:
            for name in self._commit(plan, seq):
                self._remove(name)
            if engine is not None and hasattr(engine, "fire_event"):
                fire_saved_event(engine)

        if self._background is None:
            self._write(payload, filename, metadata)
            finish()
            return filename
        if self.sharded:  # every rank: DCP copies its shards to the CPU now, and uploads them in the background
            upload = self.save_handler.start_async(payload, filename, metadata)
            self._background.submit(upload, finish, f"saving {filename}")
            return filename
        distributed.sync_xla(payload)  # every rank: XLA's pending graph is a collective step
        if self._writes_here():
            payload = self._background.snapshot(payload)  # training may go on now; other ranks copy nothing
        data = payload
        self._background.submit(lambda: self._write(data, filename, metadata), finish, f"saving {filename}")
        return filename

    def _plan(self, inputs: Callable[[], tuple[Any, Any, bool]]) -> dict[str, Any] | None:
        """This rank's decision, or ``None`` to skip the save: the checkpoint's ``filename``, ``priority``,
        ``step``, save ``time`` and ``score``, and the kept filenames to ``evict`` once it is committed."""
        raw_priority, global_step, with_score = inputs()
        priority = as_priority(raw_priority)
        if is_non_finite(priority):
            if not self._warned_nan:
                warnings.warn(
                    f"Checkpoint score is {priority!r} (NaN or infinite): not saved, and it evicts nothing "
                    "(further ones are not warned)",
                    RuntimeWarning,
                    stacklevel=5,
                )
                self._warned_nan = True
            return None
        if not self._passes_n_saved(priority):
            return None
        filename = self._filename(with_score=with_score, score=priority, global_step=global_step)
        same_name = next((item for item in self._saved if item.filename == filename), None)
        if same_name is not None and self.sharded:  # a committed folder is written once: never replaced
            warnings.warn(f"not saving {filename}: a sharded checkpoint of that name is kept", RuntimeWarning, 5)
            return None
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
        score = priority if with_score else None
        candidate = CheckpointInfo(filename, step_of(global_step), _retention.save_time(), score, priority)
        evict = self._evictions(candidate)
        if evict is None:  # the policy would not keep it: no upload that would be deleted at once
            return {"filename": filename, "priority": priority, "skip": True}  # ranks' clocks may differ: no warning
        return {"filename": filename, "priority": priority, "evict": evict, **_record(candidate)}

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
        if _decision(plan) != _decision(mine):
            warnings.warn(
                f"rank {distributed.get_rank()} follows rank {self.save_on_rank}, which {_describe_plan(plan)}, "
                f"although this rank {_describe_plan(mine)}: the ranks passed different scores or steps. Reduce "
                "metrics across ranks (e.g. torch.distributed.all_reduce) before passing them to the checkpoint",
                RuntimeWarning,
                stacklevel=4,
            )
        return None if plan is None or plan.get("skip") else plan

    def _writes_here(self) -> bool:
        """Whether the save handler writes on this rank (ckptcloud's and ignite's savers write on one rank only)."""
        if not is_save_handler(self.save_handler):
            return True
        return getattr(self.save_handler, "save_on_rank", distributed.get_rank()) == distributed.get_rank()

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
        if self.sharded:  # every rank: its own shards
            return sharded_state_dict(self.to_save)
        return state_dicts(self.to_save, self.save_on_rank)


def _describe_plan(plan: dict[str, Any] | Exception | None) -> str:
    if plan is None or (isinstance(plan, dict) and plan.get("skip")):
        return "skips this save"
    if isinstance(plan, Exception):
        return f"failed to decide ({type(plan).__name__}: {plan})"
    return f"saves {plan['filename']}"


def _decision(plan: dict[str, Any] | Exception | None) -> Any:
    """What ranks must agree on (each rank's own save time and evictions may differ; the writer's are used)."""
    return (plan["filename"], plan["priority"]) if isinstance(plan, dict) else plan


def _record(info: CheckpointInfo) -> dict[str, Any]:
    return {"step": info.step, "time": info.time, "score": info.score}
