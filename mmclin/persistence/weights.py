"""Network weights on disk as safetensors: data only, so reading a file can never run code."""
from __future__ import annotations

from pathlib import Path

from torch import Tensor, nn


def save_weights(module: nn.Module, path: str | Path) -> None:
    from safetensors.torch import save_file

    save_file({k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}, str(path))


def read_weights(path: str | Path, map_location: str = "cpu") -> dict[str, Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device=map_location)
    except Exception as err:  # safetensors raises its own error types for foreign or damaged files
        raise ValueError(
            f"{str(path)!r} is not a readable safetensors file ({type(err).__name__}: {err}); mmclin never "
            "unpickles model files, so pickles or torch.save checkpoints are refused"
        ) from None
