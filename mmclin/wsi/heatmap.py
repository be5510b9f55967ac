"""Attention heatmaps: per-patch scores painted over the slide thumbnail, saved as PNG, logged to MLflow."""
from __future__ import annotations

from pathlib import Path

import numpy as np


def attention_map(scores: np.ndarray, coords: np.ndarray, patch_size0: int, slide_dimensions: tuple[int, int],
                  thumb_shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Per-patch scores rasterised on the thumbnail grid (overlapping patches are averaged).

    Shapes:
        scores: ``[N]``; coords: ``[N, 2]`` level-0 ``(x, y)`` -> (values ``[h, w]`` float, covered ``[h, w]`` bool).
    """
    scores = np.asarray(scores, dtype=np.float64).ravel()
    if scores.shape[0] != coords.shape[0]:
        raise ValueError(f"attention has {scores.shape[0]} scores but the bag has {coords.shape[0]} patch coordinates")
    h, w = thumb_shape
    W, H = slide_dimensions
    sx, sy = w / W, h / H
    acc = np.zeros((h, w))
    cnt = np.zeros((h, w))
    for (x, y), s in zip(coords, scores):
        x0, y0 = int(x * sx), int(y * sy)
        x1, y1 = max(int(np.ceil((x + patch_size0) * sx)), x0 + 1), max(int(np.ceil((y + patch_size0) * sy)), y0 + 1)
        acc[y0:y1, x0:x1] += s
        cnt[y0:y1, x0:x1] += 1
    covered = cnt > 0
    return np.where(covered, acc / np.maximum(cnt, 1), 0.0), covered


def heatmap_overlay(thumbnail: np.ndarray, scores: np.ndarray, coords: np.ndarray, patch_size0: int,
                    slide_dimensions: tuple[int, int], alpha: float = 0.5, cmap: str = "jet",
                    normalize: str = "rank") -> np.ndarray:
    """RGB uint8 thumbnail with the scores blended over the patches that were scored.

    ``normalize="rank"`` spreads colours by percentile (attention is heavy-tailed: min-max would
    paint all but a few patches the same blue); ``"minmax"`` keeps the raw scale.

    Shapes:
        thumbnail: ``[h, w, 3]`` uint8; scores ``[N]``; coords ``[N, 2]`` -> ``[h, w, 3]`` uint8.
    """
    import matplotlib

    s = np.asarray(scores, dtype=np.float64).ravel()
    if normalize == "rank":
        s = (np.argsort(np.argsort(s)) / max(len(s) - 1, 1)) if len(s) > 1 else np.ones_like(s)
    elif normalize == "minmax":
        s = (s - s.min()) / (s.max() - s.min()) if s.max() > s.min() else np.ones_like(s)
    else:
        raise ValueError(f"normalize must be 'rank' or 'minmax', got {normalize!r}")
    values, covered = attention_map(s, coords, patch_size0, slide_dimensions, thumbnail.shape[:2])
    colours = matplotlib.colormaps[cmap](values)[..., :3] * 255
    out = thumbnail[..., :3].astype(np.float64)
    out[covered] = (1 - alpha) * out[covered] + alpha * colours[covered]
    return out.clip(0, 255).astype(np.uint8)


def save_heatmap(path: str | Path, bag_path: str | Path, scores: np.ndarray, coords: np.ndarray | None = None,
                 **kw: object) -> Path:
    """Overlay ``scores`` on the thumbnail stored in an mmclin ``.bag`` directory and write a PNG.

    ``coords`` (level-0 ``[N, 2]``) default to the bag's own; pass them when scores cover a subset.
    """
    import json

    from PIL import Image

    bag_path = Path(bag_path)
    meta_file = bag_path / "meta.json"
    if not meta_file.is_file():
        raise ValueError(f"{str(bag_path)!r} is not an mmclin bag directory (no meta.json); heatmaps need its thumbnail and coordinates")
    meta = json.loads(meta_file.read_text())
    from safetensors.numpy import load_file

    if coords is None:
        coords = load_file(str(bag_path / "features.safetensors"))["coords"]
    thumb = np.asarray(Image.open(bag_path / "thumbnail.png").convert("RGB"))
    img = heatmap_overlay(thumb, scores, coords, int(meta["patch_size_level0"]), tuple(meta["slide_dimensions"]), **kw)  # type: ignore[arg-type]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(img).save(path)
    return path


def log_heatmaps(paths: list[str | Path], run_id: str | None = None, tracking_uri: str | None = None,
                 artifact_path: str = "heatmaps") -> None:
    """Log heatmap PNGs as MLflow artifacts of ``run_id`` (default: the active run)."""
    import mlflow

    if run_id is None:
        run = mlflow.active_run()
        if run is None:
            raise RuntimeError("log_heatmaps: no active MLflow run; pass run_id=")
        run_id = run.info.run_id
    client = mlflow.MlflowClient(tracking_uri=tracking_uri)
    for p in paths:
        client.log_artifact(run_id, str(p), artifact_path)
