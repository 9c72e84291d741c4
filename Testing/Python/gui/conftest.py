"""Fixtures of the panel tests: real trained-model files (see ../trained_models.py)."""

import importlib.util
from pathlib import Path

_spec = importlib.util.spec_from_file_location("_trained_models_loader",
                                               Path(__file__).parents[1] / "trained_models.py")
_loader = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_loader)

trainedModelFile = _loader.load().trainedModelFile
