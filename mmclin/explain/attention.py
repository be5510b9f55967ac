"""Attention of a fitted model's slide MIL encoder per patch, and heatmaps of it over the slide thumbnail."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from mmclin.cohort import to_polars
from mmclin.training.data import featurize


def _fitted(model: Any) -> Any:
    return getattr(model, "model_", model)


def slide_attention(model: Any, frame: Any, modality: str) -> list[dict[str, np.ndarray] | None]:
    """Per row: ``{"attention": [N], "coords": [N, 2]}`` from the fitted model's slide encoder (None if absent).

    Each bag is run alone (no padding) in eval mode, so every patch is scored.
    """
    fitted = _fitted(model)
    frame = to_polars(frame)
    nets = getattr(fitted.net, "members", [fitted.net])
    enc = nets[0].encoders[modality] if modality in nets[0].encoders else None
    if enc is None or not hasattr(enc, "forward_with_attention"):
        raise ValueError(f"modality {modality!r} has no attention MIL encoder in this model "
                         f"(encoders: {list(nets[0].encoders)})")
    feats = {modality: fitted.featurizers[modality]}
    table = featurize(frame, feats, where="the frame given to slide_attention")
    out: list[dict[str, np.ndarray] | None] = []
    for i in range(len(table)):
        b = table.batch(torch.tensor([i]))
        if not bool(b.present[modality][0]):
            out.append(None)
            continue
        inputs = b.inputs[modality]
        device = next(enc.parameters()).device
        att = torch.stack([n.encoders[modality].attention({k: v.to(device) for k, v in inputs.items()}) for n in nets]).mean(0)
        m = inputs["mask"][0]
        out.append({"attention": att[0][m].cpu().numpy(), "coords": inputs["coords"][0][m].numpy()})
    return out


def export_heatmaps(model: Any, frame: Any, modality: str, out_dir: str | Path, id_column: str | None = None,
                    run_id: str | None = None, tracking_uri: str | None = None, **overlay: Any) -> list[Path]:
    """Attention heatmap PNGs (overlay on the slide thumbnail) for rows whose slide cell is an mmclin bag;
    logged to MLflow under ``heatmaps/`` when ``run_id`` is given (or a run is active)."""
    from mmclin.wsi.bags import BAG_SUFFIX
    from mmclin.wsi.heatmap import log_heatmaps, save_heatmap

    frame = to_polars(frame)
    fitted = _fitted(model)
    bag_paths = fitted.featurizers[modality].bag_paths(frame)
    ids = frame[id_column].to_list() if id_column else list(range(frame.height))
    written = []
    for row, (att, bag) in enumerate(zip(slide_attention(fitted, frame, modality), bag_paths)):
        if att is None or not str(bag).endswith(BAG_SUFFIX):
            continue  # absent, or a foreign bag without a thumbnail
        written.append(save_heatmap(Path(out_dir) / f"{modality}_{ids[row]}.png", bag, att["attention"], att["coords"], **overlay))
    if written and (run_id is not None or _active_run()):
        log_heatmaps(written, run_id=run_id, tracking_uri=tracking_uri)
    return written


def _active_run() -> bool:
    try:
        import mlflow

        return mlflow.active_run() is not None
    except ImportError:  # pragma: no cover
        return False
