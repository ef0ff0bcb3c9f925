"""The checkpoint template of a sweep spec (``models.path``): the fields it may name, how it may
format them, and which it must name so that every model has a file of its own."""

from __future__ import annotations

import re
import string as formatting
from typing import TYPE_CHECKING

from cluster.spec.fields import SpecError, shown

if TYPE_CHECKING:
    from cluster.spec import Sweep

MODEL_FIELDS = ("method", "training", "sigma", "seed")
TEMPLATE_FIELDS = (*MODEL_FIELDS, "dataset")


def check_template_text(template: str, where: str) -> None:
    """A checkpoint template names the five fields, plainly or with a short format (``{sigma}``,
    ``{seed:03d}``): no other field, attribute or index, no nested field, and no width or
    precision beyond 255 (a file name's length: a width of 10**9 would build a gigabyte); and it
    formats (a trial with every field)."""
    fields = ", ".join("{" + f + "}" for f in TEMPLATE_FIELDS)
    try:
        parts = list(formatting.Formatter().parse(template))
    except ValueError as err:
        raise SpecError(f"{where}: bad template ({err}); use the fields {fields}") from None
    for _, field, spec, _conversion in parts:
        if field is None:
            continue
        if field not in TEMPLATE_FIELDS:
            raise SpecError(f"{where}: bad template field {{{shown(field)[1:-1]}}}; use the fields {fields}")
        if "{" in (spec or "") or any(len(n) > 3 or int(n) > 255 for n in re.findall(r"\d+", spec or "")):
            raise SpecError(f"{where}: the format of {{{field}}} may not nest fields or exceed a width of 255")
    try:
        template.format(method="m", training="t", sigma=1.0, seed=0, dataset="d")
    except Exception as err:  # noqa: BLE001 - any formatting failure is a bad template
        raise SpecError(f"{where}: bad template ({shown(str(err))}); use the fields {fields}") from None


def check_template(sweep: Sweep) -> None:
    """models.path must name each field that varies across the sweep's models, so that every
    model has its own file; a field with one value may be left out (one imported model)."""
    values = {
        "method": (sweep.models.noise,) if sweep.models.noise else sweep.methods,
        "training": sweep.training,
        "sigma": sweep.models.sigmas or sweep.sigmas,
        "seed": sweep.seeds,
    }
    for name in MODEL_FIELDS:
        if len(values[name]) > 1 and "{" + name + "}" not in sweep.models.path:
            raise SpecError(
                f"models.path: the template must contain {{{name}}}: the sweep's models differ in it "
                "and each needs its own file"
            )
