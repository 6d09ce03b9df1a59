"""The one call site of ``torch.save`` and ``torch.load``."""

from __future__ import annotations

import os
import pickle
from typing import IO, Any

import torch


def save(obj: Any, stream: IO[bytes] | str | os.PathLike, **torch_save_kwargs: Any) -> None:
    """Serialize ``obj`` into ``stream``.

    ``torch.save`` (zip format) writes a write-only stream front to back and never seeks; each tensor storage
    arrives as one ``write()`` of a memoryview aliasing the tensor, which the stream must not keep.
    """
    torch.save(obj, stream, **torch_save_kwargs)


def load(source: IO[bytes] | str | os.PathLike, *, map_location: Any = "cpu", weights_only: bool = True) -> Any:
    """Deserialize a checkpoint, with ``torch.load``'s safe unpickler unless ``weights_only=False``.

    Raises:
        ValueError: the bytes are not a torch checkpoint, or hold objects ``weights_only`` refuses.
    """
    try:
        return torch.load(source, map_location=map_location, weights_only=weights_only)
    except pickle.UnpicklingError as err:
        raise ValueError(
            f"could not load the checkpoint with weights_only={weights_only}: {err}. If it holds objects other "
            "than tensors and plain containers and you trust its source, pass weights_only=False."
        ) from err
    except RuntimeError as err:
        if "zip archive" in str(err) or "PytorchStreamReader" in str(err):
            raise ValueError(f"not a torch checkpoint (torch.load failed: {err})") from err
        raise
