"""Shim kept for ``python -m moce_plugin.lm_eval_model`` and
``from moce_plugin.lm_eval_model import MoCELM`` (0.1 docs use them); the command is
``python -m moce_plugin lm-eval``, the code lives in :mod:`moce_plugin.outputs.lm_eval`."""

from .outputs.lm_eval import MoCELM, main  # noqa: F401

if __name__ == "__main__":
    raise SystemExit(main())
