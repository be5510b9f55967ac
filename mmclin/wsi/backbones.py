"""Patch embedders: any ``nn.Module``, a built-in small CNN, timm / Hugging Face models from local files.

Nothing here downloads: the built-in CNN is built from a fixed seed, and timm / HF models
are loaded only from a path on disk the user already has.
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import Tensor, nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class SmallCNN(nn.Module):
    """A small convolutional embedder (4 strided conv blocks + global average and max pooling).

    Its weights come from a fixed seed (no download), so it is a deterministic texture/colour
    descriptor rather than a pathology foundation model; swap in one of those for real studies.

    Shapes:
        x: ``[n, 3, H, W]`` float (normalised) -> ``[n, out_dim]``.
    """

    def __init__(self, out_dim: int = 128, width: int = 32, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        chans = [3, width, width * 2, width * 4, out_dim // 2]
        layers: list[nn.Module] = []
        for cin, cout in zip(chans[:-1], chans[1:]):
            conv = nn.Conv2d(cin, cout, 3, stride=2, padding=1)
            with torch.no_grad():  # He init from our own generator: same weights everywhere
                conv.weight.copy_(torch.randn(conv.weight.shape, generator=g) * (2.0 / (cin * 9)) ** 0.5)
                conv.bias.zero_()
            layers += [conv, nn.ReLU(inplace=True)]
        self.features = nn.Sequential(*layers)
        self.out_dim = out_dim

    def forward(self, x: Tensor) -> Tensor:
        h = self.features(x)
        return torch.cat([h.mean((2, 3)), h.amax((2, 3))], 1)


class Backbone:
    """An embedder with its preprocessing and an identity (part of the bag cache key).

    Args:
        module: maps ``[n, 3, H, W]`` float to ``[n, D]`` (or to a tuple/object whose first
            element / ``pooler_output`` is that).
        name: a stable name; with the weights' hash it keys cached bags.
        mean, std: per-channel normalisation of ``[0, 1]`` pixels.
        batch_size: patches per forward pass.
    """

    def __init__(self, module: nn.Module, name: str, mean: tuple = IMAGENET_MEAN, std: tuple = IMAGENET_STD,
                 batch_size: int = 64, device: str | torch.device = "cpu") -> None:
        self.module = module.eval().to(device)
        self.name = name
        self.mean = torch.tensor(mean, device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(std, device=device).view(1, 3, 1, 1)
        self.batch_size = batch_size
        self.device = torch.device(device)
        self._identity: str | None = None

    @property
    def identity(self) -> str:
        """``name`` plus a hash of the weights: a changed model never reuses old bags."""
        if self._identity is None:
            h = hashlib.sha256(self.name.encode())
            for k, v in sorted(self.module.state_dict().items()):
                h.update(k.encode())
                h.update(v.detach().cpu().contiguous().numpy().tobytes())
            self._identity = f"{self.name}:{h.hexdigest()[:16]}"
        return self._identity

    @torch.inference_mode()
    def embed(self, patches: np.ndarray) -> np.ndarray:
        """Shapes: patches ``[n, H, W, 3]`` uint8 -> float32 ``[n, D]``."""
        if patches.ndim != 4 or patches.shape[-1] != 3 or patches.dtype != np.uint8:
            raise ValueError(f"backbone {self.name!r}: expected uint8 patches [n, H, W, 3], got {patches.dtype} {patches.shape}")
        outs = []
        for s in range(0, len(patches), self.batch_size):
            x = torch.from_numpy(patches[s:s + self.batch_size]).to(self.device).permute(0, 3, 1, 2).float().div_(255.0)
            y = _first_tensor(self.module((x - self.mean) / self.std))
            if y.dim() != 2:
                raise ValueError(f"backbone {self.name!r} returned shape {tuple(y.shape)}; expected [n, D]")
            outs.append(y.float().cpu())
        return torch.cat(outs).numpy() if outs else np.zeros((0, 0), np.float32)


def _first_tensor(y: object) -> Tensor:
    if isinstance(y, Tensor):
        return y
    if hasattr(y, "pooler_output") and y.pooler_output is not None:  # HF ModelOutput
        return y.pooler_output
    if hasattr(y, "last_hidden_state"):
        return y.last_hidden_state[:, 0]
    if isinstance(y, (tuple, list)) and y and isinstance(y[0], Tensor):
        return y[0]
    raise TypeError(f"backbone returned {type(y).__name__}; expected a tensor [n, D]")


def builtin_backbone(out_dim: int = 128, seed: int = 0, **kw: object) -> Backbone:
    """The built-in :class:`SmallCNN` (no download)."""
    return Backbone(SmallCNN(out_dim=out_dim, seed=seed), f"smallcnn-{out_dim}-s{seed}", **kw)  # type: ignore[arg-type]


def timm_backbone(model_name: str, checkpoint: str | Path, **kw: object) -> Backbone:
    """A timm architecture with weights from a local file (``.safetensors`` or ``.pt``/``.bin``).

    Built with ``pretrained=False, num_classes=0`` (pooled features), then the local weights
    are loaded; nothing is fetched from the hub.
    """
    try:
        import timm
    except ImportError as e:
        raise ImportError("timm_backbone needs timm installed (pip install timm)") from e
    path = Path(checkpoint)
    if not path.is_file():
        raise FileNotFoundError(f"timm checkpoint {str(path)!r} does not exist")
    model = timm.create_model(model_name, pretrained=False, num_classes=0)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing:
        raise ValueError(f"timm checkpoint {str(path)!r} lacks weights for {model_name!r}: {missing[:5]}")
    cfg = model.pretrained_cfg or {}
    return Backbone(model, f"timm-{model_name}", tuple(cfg.get("mean", IMAGENET_MEAN)), tuple(cfg.get("std", IMAGENET_STD)), **kw)  # type: ignore[arg-type]


def hf_backbone(path: str | Path, **kw: object) -> Backbone:
    """A Hugging Face vision model from a local directory (``local_files_only``): CLS / pooled output."""
    try:
        from transformers import AutoModel
    except ImportError as e:
        raise ImportError("hf_backbone needs transformers installed") from e
    if not Path(path).is_dir():
        raise FileNotFoundError(f"Hugging Face model directory {str(path)!r} does not exist")
    model = AutoModel.from_pretrained(str(path), local_files_only=True)
    return Backbone(model, f"hf-{Path(path).name}", **kw)  # type: ignore[arg-type]


BACKBONES: dict[str, Callable[..., Backbone]] = {"smallcnn": builtin_backbone, "timm": timm_backbone, "hf": hf_backbone}


def make_backbone(spec: "Backbone | nn.Module | str | dict | None") -> Backbone:
    """A :class:`Backbone` from an instance, a bare module, a name, or ``{"name": ..., **kwargs}``."""
    if spec is None:
        return builtin_backbone()
    if isinstance(spec, Backbone):
        return spec
    if isinstance(spec, nn.Module):
        return Backbone(spec, type(spec).__name__)
    if isinstance(spec, str):
        spec = {"name": spec}
    if isinstance(spec, dict):
        spec = dict(spec)
        name = spec.pop("name", "smallcnn")
        if name not in BACKBONES:
            raise ValueError(f"unknown backbone {name!r}; choose one of {sorted(BACKBONES)} or pass an nn.Module")
        return BACKBONES[name](**spec)
    raise TypeError(f"backbone must be a Backbone, nn.Module, name or dict, got {type(spec).__name__}")
