"""Errors of stage 1: each message names the problem and the fix."""

from __future__ import annotations


class ClusteringError(ValueError):
    """A user-facing clustering problem (bad options, data that cannot be clustered)."""


class ClusterArtifactError(ClusteringError):
    """A cluster artifact is missing, damaged, or does not match the data or the model."""
