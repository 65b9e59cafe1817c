"""Compatibility path: `python -m moce_plugin.export` (documented); the code lives in
:mod:`moce_plugin.outputs.export`."""

from .outputs.export import *  # noqa: F401,F403
from .outputs.export import main

if __name__ == "__main__":
    raise SystemExit(main())
