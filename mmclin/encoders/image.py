"""Radiology images (kind ``image``): featurizer (paths -> resampled, normalised tensors) and a
2-D / 3-D CNN encoder giving one token per image (views, time points): a small CNN from
scratch, or a resnet18 that starts from a local pretrained checkpoint (never downloaded).

A subject's images come from several path columns (one per view, e.g. ``["ct_path", "mr_path"]``)
or one ``list[str]`` column (any number of images). Each image is a token; a learned view
embedding tells the columns apart. Images are stored flat (:class:`~mmclin.batch.Ragged`),
so subjects with one image and subjects with five share a table without padding it.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import polars as pl
import torch
from torch import Tensor, nn

from mmclin.batch import ModalityTokens
from mmclin.encoders.base import Featurizer, ModalityEncoder
from mmclin.registry import ENCODERS, FEATURIZERS
from mmclin.batch import Ragged


class ImageFeaturizer(Featurizer):
    """Path columns -> ``Ragged({"image": [E, 1, *size], "view": [E]})`` (batch adds ``"mask"``).

    Options (``ModalitySpec.options``): ``size`` (``[H, W]`` for 2-D, ``[D, H, W]`` for 3-D;
    default ``[64, 64]``), ``spacing`` (target mm per pixel/voxel, same length; default: keep
    the grid), ``ct_window`` (HU, default ``[-1000, 1000]``), ``root`` (data root: relative paths
    are taken under it and a path that resolves outside it is refused, see
    :func:`mmclin.persistence.paths.resolve_under_root`). Null paths are absent images; a subject with no
    image has the modality absent.
    """

    kind = "image"
    option_names = ("size", "spacing", "ct_window", "root")

    def _paths(self, frame: pl.DataFrame) -> list[list[tuple[int, str]]]:
        cols = self.spec.columns
        name = self.spec.name
        if len(cols) == 1 and isinstance(frame.schema[cols[0]], pl.List):
            if frame.schema[cols[0]].inner not in (pl.String, pl.Utf8):
                raise ValueError(f"modality {name!r}, column {cols[0]!r}: expected a list of file paths, got {frame.schema[cols[0]]}")
            return [[(0, p) for p in (row or []) if p is not None] for row in frame[cols[0]].to_list()]
        for c in cols:
            if frame.schema[c] not in (pl.String, pl.Utf8, pl.Null):
                raise ValueError(f"modality {name!r}, column {c!r}: expected image file paths (strings), got {frame.schema[c]}")
        values = [frame[c].to_list() for c in cols]
        return [[(v, values[v][r]) for v in range(len(cols)) if values[v][r] is not None] for r in range(frame.height)]

    def _images(self, frame: pl.DataFrame) -> tuple[list[list[tuple[int, np.ndarray]]], Tensor]:
        from mmclin.datasets.radiology import preprocess, read_image
        from mmclin.persistence.paths import option_root, resolve_under_root, with_location

        o = self.spec.options
        size = tuple(int(s) for s in o.get("size", (64, 64)))
        spacing = tuple(float(s) for s in o["spacing"]) if o.get("spacing") is not None else None
        window = tuple(float(s) for s in o.get("ct_window", (-1000.0, 1000.0)))
        root = option_root(o, self.spec.name)
        cols = self.spec.columns
        rows = []
        for r, items in enumerate(self._paths(frame)):
            out = []
            for view, path in items:
                where = f"modality {self.spec.name!r}, column {cols[min(view, len(cols) - 1)]!r}, row {r}"
                file = resolve_under_root(path, root, where)
                try:
                    vol = read_image(file, root=root)
                    out.append((view, preprocess(vol, size, spacing, window)))  # type: ignore[arg-type]
                except (ValueError, OSError) as e:
                    raise with_location(e, where) from e
            rows.append(out)
        return rows, torch.tensor([bool(x) for x in rows], dtype=torch.bool)

    def fit(self, frame: pl.DataFrame) -> "ImageFeaturizer":
        size = self.spec.options.get("size", (64, 64))
        if len(size) not in (2, 3):
            raise ValueError(f"modality {self.spec.name!r}: option 'size' must be [H, W] or [D, H, W], got {size}")
        self.size = [int(s) for s in size]
        cols = self.spec.columns
        list_col = len(cols) == 1 and isinstance(frame.schema[cols[0]], pl.List)
        self.n_views = 1 if list_col else len(cols)
        _, present = self._images(frame)
        self.check_present_in_training(frame, present)
        return self

    def transform(self, frame: pl.DataFrame) -> tuple[Ragged, Tensor]:
        rows, present = self._images(frame)
        lengths = np.array([len(r) for r in rows], dtype=np.int64)
        offsets = np.zeros(len(rows) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        flat = [img for r in rows for _, img in r]
        views = [v for r in rows for v, _ in r]
        images = torch.from_numpy(np.stack(flat)) if flat else torch.zeros((0, 1, *self.size))
        return Ragged({"image": images, "view": torch.tensor(views, dtype=torch.long)}, torch.from_numpy(offsets)), present

    def encoder_kwargs(self) -> dict[str, Any]:
        return {"size": list(self.size), "n_views": self.n_views}

    def state_dict(self) -> dict[str, Any]:
        return {"size": self.size, "n_views": self.n_views}

    def load_state_dict(self, state: dict[str, Any]) -> "ImageFeaturizer":
        self.size, self.n_views = state["size"], state["n_views"]
        return self


FEATURIZERS.register("image")(ImageFeaturizer)


@ENCODERS.register("image")
class ImageCNNEncoder(ModalityEncoder):
    """A 2-D or 3-D CNN per image (a small conv-GroupNorm-ReLU net from scratch, or a resnet18
    that can start from a local torchvision / timm / MONAI checkpoint), global average pool
    concatenated with global max pool (a small lesion survives max pooling), linear, plus a
    learned view embedding; one token per image.

    GroupNorm (``"cnn"``) and BatchNorm with frozen running statistics (``"resnet18"``) keep
    each image's embedding independent of the batch. A checkpoint is read from a local file
    only (``.safetensors``, or ``.pt``/``.pth`` through ``torch.load(weights_only=True)``); RGB
    first-layer weights are summed for the one-channel images, the checkpoint's classifier is
    dropped, and a checkpoint that does not fit is refused with its missing/unexpected keys
    (:func:`mmclin.encoders.image_backbones.load_checkpoint`). It is read when the encoder is
    built, so a model saved after fitting still needs the file where it is loaded again.

    Args:
        size: image size ``[H, W]`` or ``[D, H, W]`` (from the data; picks 2-D or 3-D convs).
        n_views: number of view slots (path columns; from the data). d_model: token width D.
        width: ``"cnn"``: channels of the first block (doubled per block). n_blocks: ``"cnn"``: conv blocks.
        backbone: ``"cnn"`` (default) or ``"resnet18"`` (torchvision's architecture and key
            names, widths 64-512; without a checkpoint its BatchNorms start as identities).
        checkpoint: path of a local state dict for the backbone (None: random initialisation).
        freeze_backbone: keep the backbone's weights fixed (only the projection and view
            embedding learn).

    Shapes:
        inputs["image"]: ``[B, T, 1, *size]``; inputs["view"]: ``[B, T]`` long; inputs["mask"]: ``[B, T]`` bool.
        output: tokens ``[B, T, D]``, mask ``[B, T]``.
    """

    kind = "image"

    def __init__(self, size: list[int], n_views: int = 1, d_model: int = 32, width: int = 8, n_blocks: int = 3,
                 backbone: str = "cnn", checkpoint: str | None = None, freeze_backbone: bool = False) -> None:
        super().__init__()
        from mmclin.encoders.image_backbones import BACKBONES, load_checkpoint

        self.size, self.n_views, self.output_dim = list(size), n_views, d_model
        if len(self.size) not in (2, 3):
            raise ValueError(f"image encoder: 'size' must be [H, W] or [D, H, W], got {size}")
        if backbone == "cnn":
            conv = {2: nn.Conv2d, 3: nn.Conv3d}[len(size)]
            layers: list[nn.Module] = []
            cin = 1
            for i in range(n_blocks):
                cout = width * 2**i
                layers += [conv(cin, cout, 3, stride=2, padding=1), nn.GroupNorm(min(4, cout), cout), nn.ReLU()]
                cin = cout
            self.cnn: nn.Module = nn.Sequential(*layers)
        elif backbone in BACKBONES:
            self.cnn = BACKBONES[backbone](dims=len(self.size), in_channels=1)
            cin = self.cnn.output_channels
        else:
            raise ValueError(f"image encoder: option 'backbone' must be one of {['cnn', *BACKBONES]}, got {backbone!r}")
        if checkpoint is not None:
            load_checkpoint(self.cnn, checkpoint, backbone)
        if freeze_backbone:
            self.cnn.requires_grad_(False)
        self.proj = nn.Linear(2 * cin, d_model)
        self.view = nn.Embedding(n_views, d_model)
        nn.init.normal_(self.view.weight, std=0.02)  # small: must not drown the image content at init

    def forward(self, inputs: dict[str, Tensor]) -> ModalityTokens:
        x, mask = inputs["image"], inputs["mask"]
        if x.dim() != len(self.size) + 3 or list(x.shape[3:]) != self.size:
            raise ValueError(f"image encoder: expected images [B, T, 1, {', '.join(map(str, self.size))}], got {tuple(x.shape)}")
        B, T = mask.shape
        tokens = x.new_zeros(B, T, self.output_dim)
        if mask.any():
            h = self.cnn(x[mask])
            h = h.flatten(2)
            h = self.proj(torch.cat([h.mean(2), h.amax(2)], 1)) + self.view(inputs["view"][mask].clamp(0, self.n_views - 1))
            tokens = tokens.masked_scatter(mask.unsqueeze(-1), h)
        return ModalityTokens(tokens, mask)

    @classmethod
    def example(cls) -> "ImageCNNEncoder":
        return cls(size=[16, 16], n_views=2, d_model=8, width=4, n_blocks=2)

    def example_input(self, batch_size: int, seed: int = 0) -> dict[str, Tensor]:
        g = torch.Generator().manual_seed(seed)
        T = 2
        mask = torch.ones(batch_size, T, dtype=torch.bool)
        mask[1::2, 1] = False  # some subjects have one image
        return {"image": torch.randn(batch_size, T, 1, *self.size, generator=g) * mask[:, :, None, None, None],
                "view": torch.arange(T).expand(batch_size, T).clone(), "mask": mask}
