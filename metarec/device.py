"""Where tensors live: ``runtime.device`` = auto | cpu | cuda, resolved once per model."""

from __future__ import annotations

import torch


def resolve_device(setting: str | torch.device | None = "auto") -> torch.device:
    """``auto``: the first GPU when torch sees one, else the CPU; ``cuda`` without a GPU is an error, not a silent CPU run."""
    if isinstance(setting, torch.device):
        return setting
    name = (setting or "auto").lower()
    if name == "auto":
        return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"runtime.device={setting!r} but torch sees no CUDA device (torch {torch.__version__}); use 'auto' or 'cpu'")
    return device
