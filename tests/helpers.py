"""Checkpoint builders and bit-exact comparisons shared by the store tests."""

from __future__ import annotations

import io

import torch

MiB = 1024 * 1024


def torch_bytes(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def assert_same(a, b) -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape
        assert torch.equal(a.reshape(-1).contiguous().view(torch.uint8), b.reshape(-1).contiguous().view(torch.uint8))
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            assert_same(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            assert_same(x, y)
    else:
        assert a == b


def training_state() -> dict:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2)
    for _ in range(3):
        opt.zero_grad()
        model(torch.randn(8, 16)).sum().backward()
        opt.step()
        sched.step()
    return {"model": model.state_dict(), "optimizer": opt.state_dict(), "lr_scheduler": sched.state_dict()}


def dtype_zoo() -> dict:
    g = torch.Generator().manual_seed(1)
    return {
        "f32": torch.randn(3, 5, generator=g),
        "f16": torch.randn(7, generator=g).half(),
        "bf16": torch.randn(4, 4, generator=g).bfloat16(),
        "f64": torch.randn(2, 2, 2, generator=g).double(),
        "i64": torch.arange(-5, 5),
        "u8": torch.arange(0, 255, dtype=torch.uint8),
        "bool": torch.tensor([True, False, True]),
        "c64": torch.randn(3, generator=g, dtype=torch.complex64),
        "scalar": torch.tensor(3.5),
        "empty": torch.empty(0, 3),
        "transposed": torch.randn(6, 4, generator=g).t(),
        "nested": {"list": [torch.ones(2), (torch.zeros(1), 7)], "text": "hello", "n": 3},
    }


def stored_bytes(obj) -> bytes:
    """The exact bytes ckptcloud stores for ``obj``: torch.save's output and the integrity trailer."""
    from ckptcloud import serialization

    buf = io.BytesIO()
    serialization.save(obj, buf)
    return buf.getvalue()


class DeviceLikeTensor(torch.Tensor):
    """A CPU tensor that says it lives on ``{device_type}:0`` and counts its copies to the host.

    Subclasses stand in for XLA or CUDA tensors on a machine without them: ``copies`` counts ``cpu()`` and
    ``to()`` calls.
    """

    device_type = "cpu"
    copies = 0

    @staticmethod
    def __new__(cls, data: torch.Tensor) -> torch.Tensor:
        return torch.Tensor._make_subclass(cls, data)

    @property
    def device(self) -> torch.device:  # type: ignore[override]
        return torch.device(self.device_type, 0)

    def cpu(self, *args, **kwargs) -> torch.Tensor:  # type: ignore[override]
        type(self).copies += 1
        return self.as_subclass(torch.Tensor).clone()

    def to(self, *args, **kwargs) -> torch.Tensor:  # type: ignore[override]
        type(self).copies += 1
        return self.as_subclass(torch.Tensor).clone()


class XlaLikeTensor(DeviceLikeTensor):
    device_type = "xla"


class CudaLikeTensor(DeviceLikeTensor):
    device_type = "cuda"
