"""Zhang et al. 2020's dual certificate for their non-Gaussian smoothing families, computed once
per (family, parameters, dimension) as a radius curve and then read off per image.

The families (Sec. 4.2-4.3), z in R^d, k >= 0 (k = 0: Laplace and Gaussian):

* ``l1``: pi0(z) ∝ ||z||_1^-k exp(-||z||_1 / b)                 (Eq. 10), ``scale`` = b
* ``l2``: pi0(z) ∝ ||z||_2^-k exp(-||z||_2^2 / (2 sigma^2))     (Eq. 11), ``scale`` = sigma
* ``linf``: pi0(z) ∝ ||z||_inf^-k exp(-||z||_2^2 / (2 sigma^2)) (Eq. 13), ``scale`` = sigma

Theorem 1 (Eq. 6): the smoothed classifier's probability of class A at x0 + delta is at least
max over lambda >= 0 of [lambda p_A - D(lambda)], D(lambda) = E_{z~pi0}[(lambda - R)_+] with
R = pi0(z - delta*) / pi0(z), and the worst delta* of the ball of radius r is r e1 (Theorem 2,
l1 and l2) or r (1, ..., 1) (Theorem 3, l-infinity with Eq. 13). A radius r is certified where
that bound exceeds 1/2.

The bound depends on the image only through p_A, so the curve of thresholds p*(r) is computed
once from n samples drawn here (exactly: the statistics R depends on are sampled from their
laws, no MCMC) and every image costs a search in it. ``threshold`` bounds D from those samples
with exact binomial bounds in the tails and an empirical Bernstein bound near p_A = 1/2, valid
with probability >= 1 - delta at each radius; ``radius_curve`` says why that suffices for every
image. Failure probabilities add: alpha for p_A's Clopper-Pearson bound, ``delta`` for the curve.
"""

from __future__ import annotations

import functools
import math

import numpy as np
from scipy import special  # not scipy.stats (half a second to import): norm.sf(x) is ndtr(-x), isf(q) -ndtri(q)

from certlib.certificates.bounds import clopper_pearson_upper_table, empirical_bernstein_width

NORMS = ("l1", "l2", "linf")
# k may come this close to d: the radial law's shape d - k (l2: (d - k) / 2) stays large enough
# that a float64 draw underflows to 0 with probability < 1e-7; closer, most draws would.
K_GAP = 0.05


def _check(norm: str, k: float, scale: float, dim: int) -> None:
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
    if not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"scale must be a finite number > 0, got {scale}")
    if isinstance(dim, bool) or int(dim) != dim or dim < 1:
        raise ValueError(f"dim must be a positive integer, got {dim}")
    if not (math.isfinite(k) and 0 <= k <= dim - K_GAP):
        raise ValueError(
            f"k must lie in [0, d - {K_GAP}] = [0, {dim - K_GAP:g}] (the density needs k < d; nearer d its radii "
            f"underflow float64), got {k}"
        )


# --------------------------------------------------------------------------- exact samples of R's statistics


def _l1_radii(k: float, b: float, d: int, n: int, rng: np.random.Generator) -> np.ndarray:
    """n draws of ||z||_1 for z ~ Eq. 10: Gamma(d - k, b)."""
    return rng.gamma(d - k, b, n)


def _l2_radii(k: float, sigma: float, d: int, n: int, rng: np.random.Generator) -> np.ndarray:
    """n draws of ||z||_2 for z ~ Eq. 11: ||z||^2 / (2 sigma^2) is Gamma((d - k) / 2, 1)."""
    return np.sqrt(2 * sigma**2 * rng.gamma((d - k) / 2, 1.0, n))


def _shares(a: float, rest: float, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """n draws of (B, 1 - B), B ~ Beta(a, rest) (rest 0: B = 1), as ratios of Gamma draws (1 - B keeps its accuracy)."""
    if rest == 0:
        return np.ones(n), np.zeros(n)
    first, second = rng.gamma(a, 1.0, n), rng.gamma(rest, 1.0, n)
    total = first + second
    return first / total, second / total


def _l1_statistics(k: float, b: float, d: int, n: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """||z||_1, z_1 and ||z||_1 - |z_1| for z ~ Eq. 10: the radius is Gamma(d - k, b) (the
    density of ||z||_1 is r^(d-1) r^-k exp(-r/b) up to a constant) and |z_1| / ||z||_1 is a
    coordinate of a uniform point of the simplex, Beta(1, d - 1), with a random sign."""
    radius = _l1_radii(k, b, d, n, rng)
    share, rest = _shares(1.0, d - 1.0, n, rng)
    return {"norm": radius, "z1": radius * share * rng.choice((-1.0, 1.0), n), "rest": radius * rest}


def _l2_statistics(k: float, sigma: float, d: int, n: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """||z||_2^2, z_1 and ||z||_2^2 - z_1^2 for z ~ Eq. 11: ||z||^2 / (2 sigma^2) is
    Gamma((d - k) / 2, 1) and z_1^2 / ||z||^2 is a squared coordinate of a uniform point of the
    sphere, Beta(1/2, (d - 1)/2)."""
    square = _l2_radii(k, sigma, d, n, rng) ** 2
    share, rest = _shares(0.5, (d - 1) / 2, n, rng)
    return {"square": square, "z1": np.sqrt(square * share) * rng.choice((-1.0, 1.0), n), "rest": square * rest}


def _linf_log_density(t: np.ndarray, k: float, sigma: float, d: int) -> np.ndarray:
    """log of the density of t = ||z||_inf for z ~ Eq. 13, up to a constant:
    t^-k exp(-t^2 / (2 sigma^2)) (2 Phi(t / sigma) - 1)^(d - 1) (one coordinate at +-t, the
    others Gaussian within [-t, t])."""
    with np.errstate(divide="ignore"):
        return -k * np.log(t) - t**2 / (2 * sigma**2) + (d - 1) * np.log(special.erf(t / (sigma * math.sqrt(2))))


@functools.lru_cache(maxsize=4)  # ImageNet-sized d: about a million cells, 27 MB each
def _linf_envelope(k: float, sigma: float, d: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Cells and envelope of t = ||z||_inf's density f (``_linf_log_density``) for rejection.

    Returns the cell edges (0 = t_0 < t_1 < ... < t_m), the log envelope on each body cell
    [t_i, t_i+1] (i >= 1) and the probabilities of the cells: [0, t_1], the body cells and the
    tail past t_m. On a body cell every factor of f is monotone, so
    t_i^-k exp(-t_i^2 / 2sigma^2) erf(t_i+1 / sigma sqrt2)^(d-1) bounds it; since erf(u) / u
    decreases, f varies on the cell by at most (t_i+1 / t_i)^(k+d-1) exp((t_i+1^2 - t_i^2) /
    2sigma^2). Cells grow geometrically by 1 + 1 / (k + d) (the first factor <= e), at most
    sigma / 48 wide (the second <= e^(1/4)), so every draw is accepted with probability
    >= e^-1.25 whatever k and d (equal-width cells stalled as k neared d). On [0, t_1],
    erf(u) <= 2u / sqrt(pi) gives the power law c^(d-1) t^(d-1-k), within e of f by the choice
    of t_1; past t_m = 12 sigma, t_m^-k exp(-t^2 / 2sigma^2) (a Gaussian tail)."""
    c = math.sqrt(2 / math.pi) / sigma  # erf(t / sigma sqrt2) <= c t
    # log(erf(u) / (2u / sqrt(pi))) >= -u^2 / 3: the power law is within e of f up to t_1.
    t1 = min(sigma * math.sqrt(2 * 3 / (d + 2)), sigma)
    t_max, widest = 12 * sigma, sigma / 48
    ratio = 1 + 1 / (k + d)
    switch = min(t_max, max(t1, widest * (k + d)))  # where geometric cells reach the widest
    geometric = t1 * ratio ** np.arange(math.ceil(math.log(switch / t1) / math.log(ratio)) + 1)
    geometric = geometric[geometric < switch]
    linear = np.linspace(switch, t_max, max(1, math.ceil((t_max - switch) / widest)) + 1)
    edges = np.concatenate([[0.0], geometric, np.unique(linear)])
    lo, hi = edges[1:-1], edges[2:]
    log_env = -k * np.log(lo) - lo**2 / (2 * sigma**2) + (d - 1) * np.log(special.erf(hi / (sigma * math.sqrt(2))))
    log_first = (d - 1) * math.log(c) + (d - k) * math.log(t1) - math.log(d - k)  # integral of c^(d-1) t^(d-1-k)
    log_tail = -k * math.log(t_max) + math.log(sigma * math.sqrt(math.pi / 2))
    log_tail += math.log(special.erfc(t_max / (sigma * math.sqrt(2))))
    log_mass = np.concatenate([[log_first], log_env + np.log(hi - lo), [log_tail]])
    weights = np.exp(log_mass - log_mass.max())
    return edges, log_env, weights / weights.sum()


def _linf_radii(k: float, sigma: float, d: int, n: int, rng: np.random.Generator) -> np.ndarray:
    """n exact draws of ||z||_inf for z ~ Eq. 13 by rejection from ``_linf_envelope``."""
    edges, log_env, weights = _linf_envelope(k, sigma, d)
    c = math.sqrt(2 / math.pi) / sigma
    t1, t_max = edges[1], edges[-1]
    out = np.empty(0)
    while len(out) < n:
        want = 2 * (n - len(out)) + 64  # acceptance is at least e^-1.25 (the envelope's doc)
        cell = rng.choice(len(weights), want, p=weights)
        u = rng.random(want)
        t, log_envelope = np.empty(want), np.empty(want)
        first, tail = cell == 0, cell == len(weights) - 1
        body = ~(first | tail)
        t[first] = t1 * u[first] ** (1 / (d - k))
        log_envelope[first] = (d - 1) * math.log(c) + (d - 1 - k) * np.log(t[first])
        lo, hi = edges[cell[body]], edges[cell[body] + 1]
        t[body] = lo + u[body] * (hi - lo)
        log_envelope[body] = log_env[cell[body] - 1]
        tail_u = special.ndtr(-t_max / sigma) * u[tail]
        t[tail] = -sigma * special.ndtri(tail_u)
        log_envelope[tail] = -k * math.log(t_max) - t[tail] ** 2 / (2 * sigma**2)
        accept = np.log(rng.random(want)) < _linf_log_density(t, k, sigma, d) - log_envelope
        out = np.concatenate([out, t[accept & (t > 0)]])
    return out[:n]


def truncated_normal(u: np.ndarray, t: np.ndarray, sigma: float) -> np.ndarray:
    """N(0, sigma^2) truncated to [-t, t] by its inverse distribution function at u in [0, 1).
    Near the center (t < sigma) through erf, which keeps its relative accuracy as t -> 0 (the
    tail form's 1 - 2 Phi(-t / sigma) cancels to nothing below t ~ 1e-8 sigma); farther out
    through ndtri of the lower tail's mass, which keeps it in the tails."""
    s = sigma * math.sqrt(2)
    # What depends on t alone is computed on t's shape; each element takes its own branch, all at
    # once where they share one (d = 3072: all far), else through masks (their gathers cost 4x).
    shape, t = np.broadcast_shapes(np.shape(u), np.shape(t)), np.asarray(t, dtype=float)
    near, width, edge = t < sigma, special.erf(t / s), special.ndtr(-t / sigma)
    if near.all() or not near.any():
        out = (
            s * special.erfinv((2 * u - 1) * width) if near.all() else sigma * special.ndtri(edge + u * (1 - 2 * edge))
        )
        return out if out.shape == shape else np.array(np.broadcast_to(out, shape))
    near, width, edge, u = (np.broadcast_to(x, shape) for x in (near, width, edge, u))
    out = np.empty(shape)
    out[near] = s * special.erfinv((2 * u[near] - 1) * width[near])
    out[~near] = sigma * special.ndtri(edge[~near] + u[~near] * (1 - 2 * edge[~near]))
    return out


def _linf_statistics(k: float, sigma: float, d: int, n: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """||z||_inf, sum, squared norm, max and min of z ~ Eq. 13: t = ||z||_inf exactly
    (``_linf_radii``), one coordinate at +-t, the d - 1 others N(0, sigma^2) truncated to
    [-t, t] (``truncated_normal``), drawn in blocks to bound memory."""
    t = _linf_radii(k, sigma, d, n, rng)
    sign = rng.choice((-1.0, 1.0), n)
    out = {"t": t, "sum": sign * t, "square": t**2, "max": sign * t, "min": sign * t}
    block = max(1, 2**22 // max(1, d - 1))
    for start in range(0, n, block):
        rows = slice(start, min(n, start + block))
        u = rng.random((len(t[rows]), d - 1))
        rest = np.clip(truncated_normal(u, t[rows, None], sigma), -t[rows, None], t[rows, None])
        out["sum"][rows] += rest.sum(axis=1)
        out["square"][rows] += (rest**2).sum(axis=1)
        if d > 1:
            out["max"][rows] = np.maximum(out["max"][rows], rest.max(axis=1))
            out["min"][rows] = np.minimum(out["min"][rows], rest.min(axis=1))
    return out


# The radial part of each family, shared by the certificate and the families' samplers.
RADII = {"l1": _l1_radii, "l2": _l2_radii, "linf": _linf_radii}


def sample_statistics(norm: str, k: float, scale: float, dim: int, n: int, seed: int) -> dict[str, np.ndarray]:
    """Exact i.i.d. samples of what log R depends on, for n draws z ~ pi0 (module docstring)."""
    _check(norm, k, scale, dim)
    rng = np.random.default_rng(seed)
    sampler = {"l1": _l1_statistics, "l2": _l2_statistics, "linf": _linf_statistics}[norm]
    return sampler(float(k), float(scale), int(dim), int(n), rng)


def log_ratio(
    statistics: dict[str, np.ndarray], r: float, *, norm: str, k: float, scale: float, dim: int
) -> np.ndarray:
    """log R = log pi0(z - delta*) - log pi0(z) for delta* of Theorem 2 (r e1) or 3 (r 1). The
    shifted norm is summed from its parts (|z_1 - r| and the other coordinates' share), not as
    the norm plus its change, which would cancel where z nears delta* and pi0 is singular. At
    k = 0 (Laplace, Gaussian) log R is the exponent's change alone: exact, and no log is taken."""
    if norm == "l1":
        z1 = statistics["z1"]
        exponent = (np.abs(z1 - r) - np.abs(z1)) / scale  # (||z - r e1||_1 - ||z||_1) / b
    else:  # (||z - r e1||^2 or ||z - r 1||^2) - ||z||^2, over 2 sigma^2
        change = r * r - 2 * r * statistics["z1"] if norm == "l2" else dim * r * r - 2 * r * statistics["sum"]
        exponent = change / (2 * scale**2)
    if k == 0:
        return -exponent
    with np.errstate(divide="ignore"):  # z = delta* exactly: R = inf where k > 0
        if norm == "l1":
            log_norms = np.log(np.abs(z1 - r) + statistics["rest"]) - np.log(statistics["norm"])
        elif norm == "l2":  # of squared norms: half of it
            log_norms = np.log((statistics["z1"] - r) ** 2 + statistics["rest"]) - np.log(statistics["square"])
        else:  # ||z - r 1||_inf
            log_norms = np.log(np.maximum(statistics["max"] - r, r - statistics["min"])) - np.log(statistics["t"])
    return -(k / 2 if norm == "l2" else k) * log_norms - exponent


# --------------------------------------------------------------------------- the bound and the curve

# The bound's name, part of a shard's identity: changing how thresholds are bounded recomputes
# the shards certified with the old curve.
BOUND = "binomial-tails+empirical-bernstein"
# Theorem 1's lambda is taken from this lattice, fixed before any sample is drawn (the union
# bound below runs over it): log lambda = m * LAMBDA_STEP for |m| <= LAMBDA_POINTS. Only
# lambda > 1/2 can certify (the bound is at most lambda p_A); the lattice is symmetric so that
# 1/lambda lies on it too.
LAMBDA_STEP = 0.01
LAMBDA_POINTS = 5000  # lambda up to e^50
# Floating-point slack: computed log R is taken to be within LOG_SLACK of the exact value, and
# the computed bound's other roundings within BOUND_SLACK (a few thousand ulps of 1).
LOG_SLACK = 1e-9
BOUND_SLACK = 1e-9


@functools.lru_cache(maxsize=1)
def _lattice() -> tuple[np.ndarray, ...]:
    """(lambda_m, lambda_m^2, bin of m, bin of -m) over the lattice points lambda_m > 1/2 (bin of
    m: the samples with log R <= m step). Read-only; cached, as a curve asks at every radius."""
    m = np.arange(math.floor(math.log(0.5) / LAMBDA_STEP) + 1, LAMBDA_POINTS + 1)
    lam = np.exp(m * LAMBDA_STEP)
    arrays = (lam, lam**2, m + LAMBDA_POINTS + 1, -m + LAMBDA_POINTS + 1)
    for array in arrays:
        array.flags.writeable = False
    return arrays


def threshold(log_ratios: np.ndarray, delta: float) -> float:
    """The smallest p_A whose Theorem 1 bound exceeds 1/2 at one radius, given n i.i.d. samples
    of log R (R = pi0(z - delta*) / pi0(z), z ~ pi0), valid with probability >= 1 - delta.

    For every lambda, with F the distribution function of R, the bound is
    lambda p_A - E[(lambda - R)_+] = lambda (p_A - F(lambda)) + E[R 1{R <= lambda}], and
    E[R 1{R <= lambda}] = P(R >= 1/lambda) because pi0 is symmetric (pi0(-z) = pi0(z): the
    change of variables z = delta* - w maps R to 1/R). Two lower bounds on it, each linear in p_A
    (so the threshold is the smallest of their crossings over the lattice of lambda):

    * tail form: lambda (p_A - U(F(lambda))) + 1 - U(F((1/lambda)^-)), with exact one-sided
      Clopper-Pearson upper bounds U on the two probabilities. It tightens in the tails: large
      p_A needs lambda near R's upper quantiles, where a binomial bound's width shrinks;
    * mean form: lambda p_A - lambda (mean + width) of Y = (lambda - R)_+ / lambda in [0, 1],
      with the empirical Bernstein width (Maurer & Pontil 2009, Theorem 4), tight near
      p_A = 1/2 where Y varies little (the paper's Hoeffding term does not use that).

    delta is split evenly among the 3 bounds at each of the K lattice points (Bonferroni).
    Returns +inf where nothing below 1 certifies.
    """
    n = len(log_ratios)
    lam, lam_squared, at, mirror = _lattice()
    level = delta / (3 * len(lam))
    # Counts at every lattice point in one pass: bin b holds log R in ((b-1) step, b step]
    # (shifted by the slack, which only over-counts: conservative for upper bounds on F).
    # NaN (0 * inf at a draw of norm 0) is read as R = 0: counted below every lambda, which only
    # raises the bounds on F and on E[(lambda - R)_+].
    # (In place where it can: at n = 100,000 fresh arrays cost a quarter of the time.)
    logs = np.where(np.isnan(log_ratios), -np.inf, log_ratios)
    scaled = np.subtract(logs, LOG_SLACK)
    scaled /= LAMBDA_STEP
    bins = np.clip(np.ceil(scaled, out=scaled), -LAMBDA_POINTS - 1, LAMBDA_POINTS + 1, out=scaled).astype(np.int64)
    bins += LAMBDA_POINTS + 1
    size = 2 * LAMBDA_POINTS + 3
    # Past the lattice's last point no lambda reads a sample's value: weigh it 0 (no overflow).
    np.copyto(logs, -np.inf, where=bins == size - 1)
    ratios = np.exp(logs, out=logs)
    counts = np.cumsum(np.bincount(bins, minlength=size))
    sums = np.cumsum(np.bincount(bins, weights=ratios, minlength=size))
    squares = np.cumsum(np.bincount(bins, weights=np.square(ratios, out=ratios), minlength=size))
    upper = clopper_pearson_upper_table(n, level)
    c, s1, s2 = counts[at], sums[at], squares[at]
    tail = upper[c] + (upper[counts[mirror]] - 0.5) / lam
    mean = (c - s1 / lam) / n  # Y = 1 - R / lambda on R <= lambda, 0 above
    second = (c - 2 * s1 / lam + s2 / lam_squared) / n
    variance = np.maximum(second - mean**2, 0.0) * n / (n - 1)
    discrepancy = mean + BOUND_SLACK + empirical_bernstein_width(variance + BOUND_SLACK, n, level)
    by_mean = (0.5 + lam * discrepancy) / lam
    best = max(0.5, float(min(tail.min(), by_mean.min()))) * (1 + BOUND_SLACK)
    return best if best < 1 else math.inf


# The radius grid, fixed before any sample is drawn (the argument in ``radius_curve`` needs it):
# unit * RADIUS_RATIO^j for integers j from RADIUS_FLOOR units up, unit = the scale (l-infinity:
# scale / sqrt d), until the threshold passes P_CEILING. A radius rounds down by less than
# 1 - 1/RADIUS_RATIO of itself. P_CEILING is above any p_A lower bound of n <= 10^6 samples at
# alpha >= 10^-3; RADIUS_REACH (units) stops a curve that would not pass it.
RADIUS_RATIO = 1.005
RADIUS_FLOOR = 1e-3
RADIUS_REACH = 1e3
P_CEILING = 1 - 1e-6


@functools.lru_cache(maxsize=32)
def radius_curve(
    norm: str, k: float, scale: float, dim: int, n: int, delta: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """(radii, thresholds): radius radii[j] is certified for p_A > thresholds[j]. Thresholds
    are made non-decreasing (a larger ball never needs less), which only raises them. Both
    arrays are read-only (cached).

    One set of n samples serves every radius, and no union over radii is needed: for an image
    with true p_A, let j* be the first grid radius that p_A does not truly certify. A radius
    at or above j* is reported only if the (non-decreasing) threshold at j* is below p_A's
    lower bound, which needs j*'s bound to have failed: each image's radius is wrong with
    probability <= alpha + delta, and a table at one radius is wrong for any of its images
    only if the bound at the first grid radius at or above it failed (probability delta). Both
    need the grid fixed before the samples: it is (``RADIUS_RATIO``); only where it stops
    depends on them, and every radius reported lies below that."""
    _check(norm, k, scale, dim)
    if not 0 < delta < 1:
        raise ValueError(f"delta must lie in (0, 1), got {delta}")
    if isinstance(n, bool) or int(n) != n or n < 2:
        raise ValueError(f"n must be an integer >= 2, got {n}")
    statistics = sample_statistics(norm, k, scale, dim, n, seed)

    def at(r: float) -> float:
        return threshold(log_ratio(statistics, r, norm=norm, k=k, scale=scale, dim=dim), delta)

    unit = scale / math.sqrt(dim) if norm == "linf" else scale
    radii: list[float] = []
    thresholds: list[float] = []
    j = math.ceil(math.log(RADIUS_FLOOR) / math.log(RADIUS_RATIO))
    while (r := unit * RADIUS_RATIO**j) <= unit * RADIUS_REACH and (t := at(r)) <= P_CEILING:
        radii.append(r)
        thresholds.append(t)
        j += 1
    curve = np.array(radii, dtype=np.float64), np.maximum.accumulate(np.array(thresholds, dtype=np.float64))
    for array in curve:
        array.flags.writeable = False
    return curve


def zhang_radius(
    p_lower, *, norm: str, k: float, scale: float, dim: int, n: int = 100_000, delta: float = 0.001, seed: int = 0
) -> np.ndarray:
    """Certified radius in ``norm`` (pixel scale) of Zhang et al. 2020's family (Eq. 10, 11 or
    13; Theorem 1, Eq. 6 with Theorems 2-3) from lower bounds ``p_lower`` of p_A: the largest
    radius of the curve whose bound exceeds 1/2 (binary certificate); 0 where p_lower > 1/2
    certifies the prediction but no radius of the curve; NaN (abstain) where p_lower <= 1/2.

    ``scale`` is b (l1) or sigma (l2, linf); ``dim`` the input dimension d; ``n`` the samples of
    pi0 behind the curve, ``seed`` their stream and ``delta`` the curve's failure probability
    (``threshold``, ``radius_curve``): each radius holds with probability >= 1 - alpha - delta
    where alpha is p_lower's. Radii are rounded down to the curve's geometric grid (less than
    0.5% of the radius; ``RADIUS_RATIO``).
    """
    p = np.asarray(p_lower, dtype=np.float64)
    if np.isnan(p).any() or (p < 0).any() or (p > 1).any():
        raise ValueError("p_lower must lie in [0, 1]")
    for name, value in (("dim", dim), ("n", n), ("seed", seed)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise ValueError(f"{name} must be an integer, got {value!r}")
    radii, thresholds = radius_curve(norm, float(k), float(scale), int(dim), int(n), float(delta), int(seed))
    count = np.searchsorted(thresholds, p, side="left")  # thresholds[j] < p for j < count
    on_curve = radii[np.maximum(count, 1) - 1] if len(radii) else np.zeros(p.shape)
    return np.where(count > 0, on_curve, np.where(p > 0.5, 0.0, np.nan))
