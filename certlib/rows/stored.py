"""Reading back, from rows, the smoothing that certified them and their votes: what
re-certification needs besides the rows' own columns."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from certlib.families import family

if TYPE_CHECKING:
    from certlib.families import SmoothingNoise, Votes


def _constant(rows: pd.DataFrame, column: str) -> Any:
    """The one value ``rows`` hold in ``column``; ValueError where they hold several or lack it."""
    if column not in rows:
        raise ValueError(f"the rows lack the {column!r} column their smoothing is rebuilt from")
    values = rows[column].unique()
    if len(values) != 1:
        shown = ", ".join(str(v) for v in values[:4])
        raise ValueError(f"rows of one smoothing differ in {column} ({shown}{', ...' if len(values) > 4 else ''})")
    return values[0]


# The row column each family parameter is stored in (the input dimension: the dataset's).
PARAMETER_COLUMNS = {"q": "q", "seed": "seed", "k": "k", "dim": "dataset"}


def smoothing_columns(method: str) -> tuple[str, ...]:
    """The row columns the smoothing of ``method``'s rows is rebuilt from: sigma and its
    family's own parameters (``parameters``)."""
    return ("sigma", *(PARAMETER_COLUMNS[name] for name in family(method).parameters))


def stored_noise(rows: pd.DataFrame) -> SmoothingNoise:
    """The smoothing that certified ``rows``, rebuilt through the registry from the columns of
    its family's parameters (``smoothing_columns``: sigma, DSSN's q and seed, Zhang et al.'s k
    and the dataset's input dimension), which must be the same in every row, and checked
    against what the rows store (DSSN's L)."""
    # The smoothings and datasets (torch) are imported by re-certification only, not by every
    # reader of results (``certify table``).
    from certlib.data import DATASETS
    from certlib.families import make_noise

    method = _constant(rows, "method")
    values = {column: _constant(rows, column) for column in smoothing_columns(method)}
    if "dataset" in values and values["dataset"] not in DATASETS:
        raise ValueError(f"{method} rows name an unknown dataset {values['dataset']!r}")
    parameters = {
        "q": lambda: int(values["q"]),
        "seed": lambda: int(values["seed"]),
        "k": lambda: float(values["k"]),
        "dim": lambda: math.prod(DATASETS[values["dataset"]].input_shape),
    }
    own = {name: parameters[name]() for name in family(method).parameters}
    noise = make_noise(method, float(values["sigma"]), **own)
    stored, levels = (rows["levels"].iloc[0] if "levels" in rows else None), noise.describe().get("levels")
    if levels is not None and pd.notna(stored) and int(stored) != levels:
        raise ValueError(
            f"{method} rows store L={int(stored)}, but sigma={values['sigma']} at q={noise.describe()['q']} "
            f"gives L={levels}"
        )
    return noise


def stored_votes(rows: pd.DataFrame, exact: bool) -> Votes:
    """The vote counts ``rows`` store: all copies' (exact), or Monte Carlo's estimation and
    selection counts."""
    from certlib.families import Votes

    if rows["votes"].isna().any() or (not exact and rows["selection_votes"].isna().any()):
        raise ValueError(f"{rows['method'].iloc[0]} rows without stored counts cannot be re-certified")
    counts = np.stack(list(rows["votes"])).astype(np.int64)
    return Votes(counts, None if exact else np.stack(list(rows["selection_votes"])).astype(np.int64))
