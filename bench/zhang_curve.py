"""Zhang et al. 2020's radius curve at k = 0 against the closed forms it must recover (issue 24's
targets: at least 0.9 of the closed form for p_A in [0.55, 0.999], 0.8 at 0.9999, never above),
side by side with the additive DKW band the project used before, in one run.

    python bench/zhang_curve.py            # n = 100,000 curve samples, delta = 0.001, d = 3072

Columns: p_A; per norm, the project's radius / closed form and the DKW band's (the band of
Zhang et al.'s Theorem 1 made uniform over lambda and 1,024 radii: F_n + sqrt(log(2 m / delta)
/ 2n), rounded down to a grid of 1,024 radii up to 20 b (l1) or 7 sigma (l2, linf / sqrt d)).
The closed forms: Laplace -b log(2 (1 - p)) (l1), Cohen's sigma Phi^-1(p) (l2) and
sigma Phi^-1(p) / sqrt(d) (l-infinity). Also the time to build each curve.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import numpy as np
from scipy import stats

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from certlib.certificates.dual import log_ratio, sample_statistics, zhang_radius  # noqa: E402

P = (0.55, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 0.999, 0.9999)
SCALES = {"l1": 0.5 / math.sqrt(2), "l2": 0.5, "linf": 0.5}  # sigma = 0.5 (Laplace b = sigma / sqrt 2)


def closed_form(norm: str, p: np.ndarray, scale: float, d: int) -> np.ndarray:
    if norm == "l1":
        return -scale * np.log(2 * (1 - p))
    return scale * stats.norm.ppf(p) / (math.sqrt(d) if norm == "linf" else 1.0)


def dkw_radius(p: np.ndarray, norm: str, scale: float, d: int, n: int, delta: float) -> np.ndarray:
    """The previous certificate: integral (p - min(1, F_n + eps))_+ > 1/2 on 1,024 grid radii."""
    points, reach = 1024, {"l1": 20.0, "l2": 7.0, "linf": 7.0}[norm]
    radii = reach * scale / (math.sqrt(d) if norm == "linf" else 1) * np.arange(1, points + 1) / points
    eps = math.sqrt(math.log(2 * points / delta) / (2 * n))
    statistics = sample_statistics(norm, 0.0, scale, d, n, seed=0)
    thresholds = []
    for r in radii:
        ratios = np.sort(np.exp(np.minimum(log_ratio(statistics, r, norm=norm, k=0.0, scale=scale, dim=d), 700)))
        levels = np.minimum(1.0, np.arange(n + 1) / n + eps)
        edges = np.concatenate([[0.0], ratios])
        area = np.concatenate([[0.0], np.cumsum(levels[:-1] * np.diff(edges))])
        at_ends = levels[1:] * edges[1:] - area[1:]
        passing = np.flatnonzero(at_ends > 0.5)
        if not passing.size:
            thresholds.append(math.inf)
            continue
        i = passing[0] + 1
        thresholds.append(max(0.5, levels[i - 1], (0.5 + area[i]) / edges[i]))
    count = np.searchsorted(np.maximum.accumulate(thresholds), p, side="left")
    return np.where(count > 0, radii[np.maximum(count, 1) - 1], 0.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=100_000, help="curve samples")
    parser.add_argument("--delta", type=float, default=0.001)
    parser.add_argument("--dim", type=int, default=3072)
    args = parser.parse_args()
    p = np.array(P)
    ratios, seconds = {}, {}
    for norm, scale in SCALES.items():
        exact = closed_form(norm, p, scale, args.dim)
        started = time.perf_counter()
        ours = zhang_radius(p, norm=norm, k=0.0, scale=scale, dim=args.dim, n=args.n, delta=args.delta)
        seconds[norm] = time.perf_counter() - started
        ratios[norm] = (ours / exact, dkw_radius(p, norm, scale, args.dim, args.n, args.delta) / exact)
    print(f"radius / closed form at k = 0 (n = {args.n:,} curve samples, delta = {args.delta}, d = {args.dim})\n")
    print("| p_A | " + " | ".join(f"{norm} (DKW band)" for norm in SCALES) + " |")
    print("|---:|" + "---:|" * len(SCALES))
    for i, value in enumerate(P):
        cells = [f"{ratios[norm][0][i]:.3f} ({ratios[norm][1][i]:.3f})" for norm in SCALES]
        print(f"| {value:g} | " + " | ".join(cells) + " |")
    worst = {norm: (ratios[norm][0][:-1].min(), ratios[norm][0][-1], ratios[norm][0].max()) for norm in SCALES}
    print("\ntargets: >= 0.9 on [0.55, 0.999], >= 0.8 at 0.9999, never above 1")
    for norm, (low, last, high) in worst.items():
        verdict = "PASS" if low >= 0.9 and last >= 0.8 and high <= 1 else "FAIL"
        print(f"{norm}: min {low:.3f}, at 0.9999 {last:.3f}, max {high:.3f}: {verdict}; curve {seconds[norm]:.1f} s")


if __name__ == "__main__":
    main()
