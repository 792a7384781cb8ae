"""Cross-task BN's precision at large activation means, against torch's BatchNorm in float64.

    python -m benchmarks.bn_precision

One float32 `CrossTaskBatchNorm2d` (training mode, one process) on inputs whose mean is 0, 100
and 1000 standard deviations from zero; the relative error of its output against
`F.batch_norm` in float64 on the same values. (The 3-rank version, with gradients and running
statistics and under hard routes, is `tests/test_cross_bn.py`.)
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

from gppf.dist.cross_bn import CrossTaskBatchNorm2d

OFFSETS = (0.0, 100.0, 1000.0)


def relative_errors(channels: int = 16, seed: int = 0) -> dict[float, float]:
    """{|mean|/std: relative output error} for one input per offset (std 1, 8 x C x 12 x 12)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for offset in OFFSETS:
        x = (torch.randn(8, channels, 12, 12, generator=g, dtype=torch.float64) + offset).float()
        stats = torch.zeros(channels, dtype=torch.float64), torch.ones(channels, dtype=torch.float64)
        ref = F.batch_norm(x.double(), *stats, None, None, True, 0.1, 1e-5)
        with torch.no_grad():
            y = CrossTaskBatchNorm2d(channels)(x)
        out[offset] = float((y.double() - ref).norm() / ref.norm())
    return out


def main() -> None:
    print("cross-task BN (float32) vs torch BN (float64), relative output error")
    for offset, err in relative_errors().items():
        print(f"  |mean|/std = {offset:>6g}   {err:.1e}")


if __name__ == "__main__":
    main()
