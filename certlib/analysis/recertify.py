"""Re-certification from stored votes, without the model: another certificate (Voracek &
Hein's box-constrained radii), multiclass instead of binary, or another alpha. Each row's
family, from the registry, decides what applies and computes it."""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import pandas as pd

from certlib.analysis.tables import _groups
from certlib.families import FAMILIES, SAMPLINGS, CertifySettings, with_certificate
from certlib.rows import RADIUS_COLUMNS, smoothing_columns, stored_noise, stored_votes

CERTIFICATES = tuple(dict.fromkeys(c for cls in FAMILIES.values() for c in cls.accepted_certificates))


@functools.lru_cache(maxsize=4)
def _dataset(name: str, split: str, root: str | None):
    from certlib.data import load_dataset

    return load_dataset(name, split, root)


def _images_of(rows: pd.DataFrame, dataset_root: str | Path | None) -> np.ndarray:
    """The rows' images in pixel scale, flattened, read from their dataset."""
    ((name, split),) = rows[["dataset", "split"]].drop_duplicates().itertuples(index=False, name=None)
    data = _dataset(name, split, None if dataset_root is None else str(dataset_root))
    position = pd.Series(np.arange(len(data)), index=data.indices)
    wanted = rows["image_index"].to_numpy()
    missing = ~np.isin(wanted, data.indices)
    if missing.any():
        raise ValueError(f"recertify: image index {wanted[missing][0]} is not in {name}/{split}")
    return data.pixels(position.loc[wanted].to_numpy()).flatten(1).numpy().astype(np.float64)


# What a row's certificate depends on besides its smoothing: the bound's kind and level, and the
# images (input-dependent box certificates read them from the dataset).
CERTIFICATION_COLUMNS = ("certificate", "multiclass", "sampling", "alpha", "dataset", "split")


def _smoothings(rows: pd.DataFrame):
    """(rows, their shared column values) for each smoothing and certification: grouped by the
    columns each family rebuilds its smoothing from (``smoothing_columns``: its own parameters,
    so none a family depends on can be left out) and by CERTIFICATION_COLUMNS."""
    for (method,), of_method in _groups(rows, ["method"], sort=False):
        try:
            parameters = smoothing_columns(method)
        except ValueError as err:
            raise ValueError(f"recertify: {err}") from None
        keys = [c for c in dict.fromkeys((*parameters, *CERTIFICATION_COLUMNS)) if c in rows]
        for values, group in _groups(of_method, keys, sort=False):
            yield group, {"method": method, **dict(zip(keys, values))}


def recertify(
    df: pd.DataFrame,
    certificate: str = "standard",
    *,
    multiclass: bool | None = None,
    alpha: float | None = None,
    dataset_root: str | Path | None = None,
) -> pd.DataFrame:
    """Recompute predictions and radii from the stored vote/count vectors, without the model.

    ``certificate``: ``standard`` (each family's own certificate), ``box`` (Voracek & Hein
    uniform++/split++, Prop. 2.5, uniform and ssn rows), ``box_input`` (their input-dependent
    Theorem 2.8; reads the images from the dataset, ``dataset_root`` for CIFAR-10/ImageNet);
    each family lists the ones it accepts. ``multiclass`` switches between binary and
    Bonferroni multiclass certification (default: each row's own);
    ``alpha`` sets a new one-sided level (default: each row's own; exact families have none).

    Rows are re-certified in groups that share every column their family's smoothing depends on
    (``smoothing_columns``: a sweep's rows of several Zhang et al. k each get their own curve).

    Returns a copy with prediction, correct, the radius column, p_a_lower, p_b_upper, alpha,
    certificate (and Zhang et al.'s curve failure probability delta) replaced; ``selected``
    (the n0 choice) is unchanged.
    """
    if certificate not in CERTIFICATES:
        raise ValueError(f"recertify: certificate must be one of {CERTIFICATES}, got {certificate!r}")
    out = df.reset_index(drop=True)  # positions below must be unique labels
    for rows, params in _smoothings(out):
        try:
            noise = stored_noise(rows)
        except ValueError as err:
            raise ValueError(f"recertify: {err}") from None
        if certificate not in noise.accepted_certificates:
            raise ValueError(
                f"recertify: the {certificate!r} certificate does not apply to {noise.name} rows "
                f"(it applies to {', '.join(with_certificate(certificate))} rows); select those rows first"
            )
        stored_multiclass = params.get("multiclass")
        multi = bool(stored_multiclass is True) if multiclass is None else multiclass
        level = (np.nan if noise.exact else float(params["alpha"])) if alpha is None else float(alpha)
        x = _images_of(rows, dataset_root) if certificate == "box_input" else None
        try:
            votes = stored_votes(rows, noise.exact)
            # Counts stopped adaptively get the anytime-valid sequence again (valid at any level
            # and stopping time), never a fixed-n bound, which optional stopping invalidates.
            sampling = params.get("sampling") if params.get("sampling") in SAMPLINGS else "fixed"
            settings = CertifySettings(alpha=level, multiclass=multi, certificate=certificate, sampling=sampling)
            result = noise.certify(votes, settings, x)
        except ValueError as err:
            raise ValueError(f"recertify: {err}") from None
        out.loc[rows.index, "prediction"] = result["prediction"]
        out.loc[rows.index, RADIUS_COLUMNS[noise.norm]] = result["radius"]
        for column in ("p_a_lower", "p_b_upper", "certificate", "multiclass", "sampling", "delta"):
            if column in result:
                out.loc[rows.index, column] = result[column]
        if not noise.exact:
            out.loc[rows.index, "alpha"] = level
    out["correct"] = out["prediction"].to_numpy() == out["label"].to_numpy()
    out.index = df.index
    return out
