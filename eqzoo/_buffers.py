"""Constant buffers: tensors a module computes from its build arguments and keeps out of its state."""
from __future__ import annotations

import torch


class ConstantBuffers:
    """Mixin for an ``nn.Module`` whose non-persistent buffers are constants made from its build
    arguments by :meth:`_constant_buffers`. After ``to_empty()`` their memory holds garbage and no
    state_dict restores them, so they are recomputed, on their device and in their dtype, by
    ``init_non_persistent_buffers()`` and before every ``load_state_dict``."""

    def _constant_buffers(self, device=None, dtype=None) -> dict[str, torch.Tensor]:
        """The constants by buffer name, on ``device`` in floating ``dtype``."""
        raise NotImplementedError

    def _register_constant_buffers(self, device=None, dtype=None) -> None:
        for name, value in self._constant_buffers(device, dtype).items():
            self.register_buffer(name, value, persistent=False)

    def init_non_persistent_buffers(self) -> None:
        """Recompute the constants where they are now (device, floating dtype)."""
        floats = [b for b in self.buffers(recurse=False) if b.is_floating_point()]
        device, dtype = floats[0].device, floats[0].dtype
        for name, value in self._constant_buffers(device, dtype).items():
            setattr(self, name, value)

    def _load_from_state_dict(self, *args, **kwargs):
        self.init_non_persistent_buffers()  # first: to_empty() + load_state_dict() gives a working module
        super()._load_from_state_dict(*args, **kwargs)
