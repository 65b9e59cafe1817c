"""Errors of stage 1: each message names the problem and the fix.

The classes are :mod:`moce_plugin.errors`' (one family with every other error); this module
keeps the names stage 1's code and its users import.
"""

from __future__ import annotations

from ..errors import ClusterArtifactError, ClusteringError

__all__ = ["ClusterArtifactError", "ClusteringError"]
