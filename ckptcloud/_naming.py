"""Checkpoint filenames: ignite's patterns, and how a score is written in them (a mixin of ``Checkpoint``)."""

from __future__ import annotations

import numbers
from collections.abc import Callable, Mapping
from typing import Any


def score_text(score: Any) -> Any:
    """A score as filenames show it: whole numbers as they are, other real numbers with 4 decimals.

    Example:
        >>> score_text(3), score_text(0.7), score_text("0.7000")
        ('3', '0.7000', '0.7000')
    """
    if isinstance(score, numbers.Real) and not isinstance(score, bool):
        return f"{score}" if isinstance(score, numbers.Integral) else f"{score:.4f}"
    return score


def check_name_arguments(filename_prefix: Any, score_name: Any) -> None:
    """Refuse a '/' in ``filename_prefix`` or ``score_name``: it would put each checkpoint in a folder of its own."""
    for argument, value in (("filename_prefix", filename_prefix), ("score_name", score_name)):
        if isinstance(value, str) and "/" in value:
            hint = (
                f" (with score_function=Checkpoint.get_default_score_fn({value!r}) to read that metric)"
                if argument == "score_name"
                else ""
            )
            raise ValueError(
                f"Argument `{argument}` should not contain '/': it becomes part of every filename, and a '/' "
                f"would put each checkpoint in a folder of its own, where resume, `ckptcloud ls` and retention "
                f"cannot see it. Given {value!r}; use e.g. {value.replace('/', '_')!r}{hint}"
            )


class Naming:
    """How a :class:`~ckptcloud.Checkpoint` names its files (it reads the checkpoint's naming attributes)."""

    to_save: Mapping
    filename_prefix: str
    score_name: str | None
    score_function: Callable[[Any], Any] | None
    filename_pattern: str | None
    ext: str

    def _filename(self, *, with_score: bool, score: Any, global_step: Any, name: str | None = None) -> str:
        """The filename for these components: ``filename_pattern``, else ignite's default pattern for them."""
        pattern = self.filename_pattern or self.setup_filename_pattern(
            with_prefix=len(self.filename_prefix) > 0,
            with_score=with_score,
            with_score_name=self.score_name is not None,
            with_global_step=global_step is not None,
        )
        return pattern.format(
            filename_prefix=self.filename_prefix,
            ext=self.ext,
            name=self._name() if name is None else name,
            score_name=self.score_name,
            score=score_text(score) if with_score else None,
            global_step=global_step,
        )

    def _name(self) -> str:
        """The ``{name}`` of filenames: the one key of ``to_save``, else ``"checkpoint"``."""
        return next(iter(self.to_save)) if len(self.to_save) == 1 else "checkpoint"

    def _basename(self) -> str:
        """``{filename_prefix}_{name}`` (no underscore without a prefix): what resume matches in metadata."""
        return f"{self.filename_prefix}{'_' * int(len(self.filename_prefix) > 0)}{self._name()}"

    @staticmethod
    def setup_filename_pattern(
        with_prefix: bool = True,
        with_score: bool = True,
        with_score_name: bool = True,
        with_global_step: bool = True,
    ) -> str:
        """The default filename pattern, e.g. ``"{filename_prefix}_{name}_{global_step}_{score_name}={score}.{ext}"``.

        Example:
            >>> from ckptcloud import Checkpoint
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
            >>> from ckptcloud import Checkpoint
            >>> fn = Checkpoint.get_default_score_fn("loss", -1.0)
            >>> fn(SimpleNamespace(state=SimpleNamespace(metrics={"loss": 0.25})))
            -0.25
        """
        if score_sign not in (1.0, -1.0):
            raise ValueError(f"Argument score_sign should be 1 or -1, but given {score_sign!r}")

        def score_fn(engine: Any) -> float:
            return score_sign * engine.state.metrics[metric_name]

        return score_fn
