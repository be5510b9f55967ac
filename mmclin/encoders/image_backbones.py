"""Image backbones whose weights can come from a local pretrained checkpoint (never downloaded).

``ResNet18`` is torchvision's ``resnet18`` written in plain torch, 2-D or 3-D, so that its
``state_dict`` keys are torchvision's (``conv1``, ``bn1``, ``layer1.0.conv1`` ...,
``layer2.0.downsample.0`` ...). timm's ``resnet18`` and MONAI's ``resnet18`` (``spatial_dims``
2 or 3, ``shortcut_type="B"``, ``bias_downsample=False``) use the same names, so their
checkpoints load too. :func:`load_checkpoint` reads ``.safetensors`` or, for ``.pt`` / ``.pth``
/ ``.bin`` / ``.ckpt``, ``torch.load(weights_only=True)`` only (no pickled code is run), maps
the keys and refuses a checkpoint that does not fit with one message naming the file and the
missing, unexpected or mis-shaped keys. Neither timm, torchvision nor MONAI is needed.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# wrappers around a state dict: Lightning / MedicalNet ("state_dict"), timm / others ("model", ...)
CONTAINER_KEYS = ("state_dict", "model_state_dict", "model", "net", "module")
# classifier heads of the checkpoint: the encoder has its own projection, so they are not loaded
HEAD_PREFIXES = ("fc.", "classifier.", "head.")
TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")


class FrozenStatsBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm that always normalises with its running statistics (the checkpoint's), training
    included: a sample's embedding never depends on the rest of the batch. Weight and bias
    still learn. Keys are ``nn.BatchNorm2d``'s."""

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() not in (4, 5):
            raise ValueError(f"expected a 4-D or 5-D input, got {input.dim()}-D")

    def forward(self, x: Tensor) -> Tensor:
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)


class BasicBlock(nn.Module):
    """torchvision's ``BasicBlock``: two 3x3 convs, identity or 1x1-conv shortcut."""

    def __init__(self, conv: type[nn.Module], cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = conv(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = FrozenStatsBatchNorm(cout)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv(cout, cout, 3, stride=1, padding=1, bias=False)
        self.bn2 = FrozenStatsBatchNorm(cout)
        self.downsample = (nn.Sequential(conv(cin, cout, 1, stride=stride, bias=False), FrozenStatsBatchNorm(cout))
                           if stride != 1 or cin != cout else None)

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + (x if self.downsample is None else self.downsample(x)))


class ResNet18(nn.Module):
    """torchvision's ``resnet18`` without its classifier (``fc``), 2-D or 3-D.

    Args:
        dims: 2 (``Conv2d``) or 3 (``Conv3d``). in_channels: image channels (1).

    Shapes:
        ``[N, in_channels, *spatial]`` -> feature maps ``[N, 512, *spatial / 32]``.
    """

    output_channels = 512

    def __init__(self, dims: int = 2, in_channels: int = 1) -> None:
        super().__init__()
        conv = {2: nn.Conv2d, 3: nn.Conv3d}[dims]
        self.conv1 = conv(in_channels, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = FrozenStatsBatchNorm(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = {2: nn.MaxPool2d, 3: nn.MaxPool3d}[dims](3, stride=2, padding=1)
        widths = (64, 128, 256, 512)
        cin = 64
        for i, w in enumerate(widths):
            stride = 1 if i == 0 else 2
            setattr(self, f"layer{i + 1}", nn.Sequential(BasicBlock(conv, cin, w, stride), BasicBlock(conv, w, w, 1)))
            cin = w

    def forward(self, x: Tensor) -> Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))


BACKBONES = {"resnet18": ResNet18}


def read_state_dict(path: Path) -> dict[str, Tensor]:
    """Tensors of a checkpoint file; ``.safetensors`` or a torch file read with ``weights_only=True``."""
    if not path.is_file():
        raise FileNotFoundError(f"image checkpoint {str(path)!r} does not exist (it is read locally, never downloaded)")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path), device="cpu")
    elif path.suffix in TORCH_SUFFIXES:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # pickled code, or not a torch file
            lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
            why = next((ln.split(". Please use")[0] for ln in lines if "Unsupported global" in ln), f"{type(err).__name__}: {lines[0] if lines else ''}")
            raise ValueError(f"image checkpoint {str(path)!r}: torch.load(weights_only=True) refused it ({why}); save "
                             "the weights alone, e.g. torch.save(model.state_dict(), path), or as .safetensors") from None
    else:
        raise ValueError(f"image checkpoint {str(path)!r}: expected a .safetensors file or one of {list(TORCH_SUFFIXES)}")
    for _ in range(3):  # unwrap {"state_dict": {...}} and similar, possibly nested
        if isinstance(state, dict):
            inner = [k for k in CONTAINER_KEYS if isinstance(state.get(k), dict)]
            if inner and not any(isinstance(v, Tensor) for v in state.values()):
                state = state[inner[0]]
    if not isinstance(state, dict) or not state or not all(isinstance(v, Tensor) for v in state.values()):
        raise ValueError(f"image checkpoint {str(path)!r}: expected a state dict (names -> tensors)"
                         + (f", found keys {sorted(state)[:8]}" if isinstance(state, dict) else f", found {type(state).__name__}"))
    return state


def _strip_prefix(state: dict[str, Tensor], expected: set[str]) -> dict[str, Tensor]:
    """Drop the wrapper prefix (``module.``, ``model.``, ``backbone.`` ...) that makes most keys match."""
    counts: dict[str, int] = {}
    for k in state:
        for e in expected:
            if k.endswith(e) and (len(k) == len(e) or k[-len(e) - 1] == "."):
                p = k[: len(k) - len(e)]
                counts[p] = counts.get(p, 0) + 1
    if not counts:
        return state
    best = max(counts, key=lambda p: (counts[p], -len(p)))
    return {k[len(best):]: v for k, v in state.items() if k.startswith(best)} if best else state


def load_checkpoint(module: nn.Module, checkpoint: str | Path, backbone: str) -> None:
    """Load a local checkpoint into ``module`` (a backbone of :data:`BACKBONES` or any module),
    in place. The first conv's input channels are adapted when they differ (RGB weights summed
    for a one-channel image, as timm's ``adapt_input_conv`` does). Classifier heads (``fc.``,
    ``classifier.``, ``head.``) in the file are ignored; anything else that does not fit is an error."""
    path = Path(checkpoint).expanduser()
    mine = module.state_dict()
    state = _strip_prefix(read_state_dict(path), set(mine))
    state = {k: v for k, v in state.items() if not k.startswith(HEAD_PREFIXES)}
    first = "conv1.weight"
    if first in state and first in mine and state[first].dim() == mine[first].dim() \
            and state[first].shape[1] != mine[first].shape[1] and mine[first].shape[1] == 1:
        state[first] = state[first].sum(1, keepdim=True)
    missing = sorted(set(mine) - set(state))
    unexpected = sorted(set(state) - set(mine))
    shapes = sorted(f"{k} {tuple(state[k].shape)} (expected {tuple(mine[k].shape)})"
                    for k in set(mine) & set(state) if state[k].shape != mine[k].shape)
    if missing or unexpected or shapes:
        def listed(keys: list[str]) -> str:
            return ", ".join(keys[:10]) + (f" and {len(keys) - 10} more" if len(keys) > 10 else "")
        parts = [f"missing keys: {listed(missing)}" if missing else "",
                 f"unexpected keys: {listed(unexpected)}" if unexpected else "",
                 f"mis-shaped: {listed(shapes)}" if shapes else ""]
        raise ValueError(f"image checkpoint {str(path)!r} does not fit backbone {backbone!r} ("
                         + "; ".join(p for p in parts if p) + "); expected the layout of torchvision's / timm's / "
                         "MONAI's resnet18 for 'resnet18', or a state dict of this encoder's own backbone")
    module.load_state_dict({k: v.to(mine[k].dtype) for k, v in state.items()})
