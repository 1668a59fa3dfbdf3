"""The paper's measures of a trained model: the batches they run on, the model state they leave
as found, and the result they return."""

from .batches import as_batches, check_model, measuring
from .results import MeasureResult, json_ready

__all__ = ["MeasureResult", "as_batches", "check_model", "json_ready", "measuring"]
