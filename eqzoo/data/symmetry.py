"""Group elements acting on images: parse a group spec, draw elements, transform image batches.

An element is ``(flip, angle)``: first mirror left-right if ``flip``, then rotate counter-clockwise
by ``angle`` (radians) about the image centre. Rotations by multiples of 90 degrees use
``torch.rot90`` and are exact on the pixel grid (so C4/D4 data sets are exactly C4/D4-transformed);
other angles resample bilinearly.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from ..groups import get_group

__all__ = ["parse_group", "sample_elements", "transform_images", "GROUP_HELP"]

GROUP_HELP = "C1 (none), CN (N rotations, e.g. C4), DN (N rotations and flips, e.g. D4; D1 = flips only), SO2, O2"


def parse_group(spec: str) -> tuple[int | None, bool]:
    """``"D4"`` -> ``(4, True)``, ``"SO2"`` -> ``(None, False)``: (number of rotations or None for
    all angles, whether flips are included), as :func:`eqzoo.groups.get_group` parses it. Raises
    ValueError naming the accepted specs."""
    try:
        G = get_group(str(spec))
    except ValueError:
        raise ValueError(f"unknown symmetry group {spec!r}; accepted: {GROUP_HELP}") from None
    return (G.n_rot if G.is_finite else None), G.has_flip


def sample_elements(spec: str, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """``n`` elements drawn uniformly (Haar) from the group: ``(flips int64[n], angles float64[n])``."""
    n_rot, flips = parse_group(spec)
    flip = rng.integers(0, 2, size=n) if flips else np.zeros(n, dtype=np.int64)
    if n_rot is None:
        angle = rng.uniform(0.0, 2 * math.pi, size=n)
    else:
        angle = rng.integers(0, n_rot, size=n) * (2 * math.pi / n_rot)
    return flip.astype(np.int64), angle.astype(np.float64)


def _rotate_bilinear(x: torch.Tensor, angle: torch.Tensor) -> torch.Tensor:
    """Rotate ``x [N, H, W]`` counter-clockwise by ``angle [N]`` about the centre (zeros outside)."""
    c, s = torch.cos(angle), torch.sin(angle)
    zero = torch.zeros_like(c)
    # grid_sample maps each output pixel (x right, y down, in [-1, 1]) to an input location: for a
    # counter-clockwise rotation on screen (y down) the output pixel p samples the input at R(θ)p
    theta = torch.stack([torch.stack([c, -s, zero], -1), torch.stack([s, c, zero], -1)], -2)
    grid = F.affine_grid(theta, (x.shape[0], 1, *x.shape[-2:]), align_corners=False)
    return F.grid_sample(x[:, None], grid, mode="bilinear", padding_mode="zeros", align_corners=False)[:, 0]


def transform_images(x: torch.Tensor, flip, angle) -> torch.Tensor:
    """Apply element ``(flip[i], angle[i])`` to image ``x[i]`` (``x: [N, H, W]`` float); returns a new tensor."""
    flip = torch.as_tensor(np.asarray(flip), dtype=torch.bool)
    angle = np.asarray(angle, dtype=np.float64)
    out = x.clone()
    out[flip] = out[flip].flip(-1)
    quarters = angle / (math.pi / 2)
    k = np.rint(quarters)
    exact = np.abs(quarters - k) < 1e-9
    for q in range(4):  # exact pixel permutations for multiples of 90 degrees
        idx = torch.as_tensor(np.nonzero(exact & (k.astype(np.int64) % 4 == q))[0])
        if q and len(idx):
            out[idx] = torch.rot90(out[idx], q, dims=(-2, -1))
    rest = torch.as_tensor(np.nonzero(~exact)[0])
    for chunk in (rest.split(4096) if len(rest) else ()):
        out[chunk] = _rotate_bilinear(out[chunk], torch.as_tensor(angle[chunk.numpy()], dtype=x.dtype))
    return out
