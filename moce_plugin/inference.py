"""Shim kept for ``from moce_plugin.inference import load_moce_model`` (0.1 docs use it);
the import is ``from moce_plugin import load_moce_model``, the code lives in
:mod:`moce_plugin.outputs.load`."""

from .outputs.load import *  # noqa: F401,F403
from .outputs.load import MoCEInferenceModel, MoCELoadError, load_moce_model  # noqa: F401
