"""Compatibility path: ``from moce_plugin.inference import load_moce_model`` (documented);
the code lives in :mod:`moce_plugin.outputs.load`."""

from .outputs.load import *  # noqa: F401,F403
from .outputs.load import MoCEInferenceModel, MoCELoadError, load_moce_model  # noqa: F401
