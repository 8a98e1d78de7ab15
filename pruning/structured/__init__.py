"""Global structured pruning: remove whole attention groups and MLP channels across the model.

  result = structured_prune(model, "embedded", ratio=0.2, importance="taylor",
                            tokenizer=tokenizer)      # the model is now smaller, in place
  save_structured("out/", model, tokenizer, result)
  model, tokenizer = load_structured("out/")         # any per-layer sizes

Data flows one way: units (units.py) -> calibration statistics and importance (importance.py)
-> the optional H-GSP prior (prior.py) -> one global selection (select.py) -> slicing into a
smaller model (slicing.py) -> config and loading (io.py). The result runs with ordinary dense
kernels, and can be pruned again three-tier (``pruning.prune``) on what remains.
"""
from .api import StructuredResult, save_structured, structured_prune, write_structured_outputs
from .importance import IMPORTANCES, unit_importance, unit_statistics
from .io import is_structured, load_structured
from .prior import prior_factors, skip_losses
from .select import Plan, select_units
from .units import LayerUnits, discover_units

__all__ = ["structured_prune", "save_structured", "load_structured", "is_structured",
           "StructuredResult", "write_structured_outputs", "IMPORTANCES", "unit_importance",
           "unit_statistics", "prior_factors", "skip_losses", "Plan", "select_units",
           "LayerUnits", "discover_units"]
