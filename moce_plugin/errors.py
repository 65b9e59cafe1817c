"""The errors moce_plugin raises on purpose: one family, each message names the problem and the fix.

Catch :class:`MoCEError` for all of them, or a leaf for one kind of problem::

    MoCEError
    ├── ConfigError                     the ``moce:`` settings do not fit the model
    ├── UnsupportedArchitectureError    a decoder family with no registered architecture
    ├── ClusterIdsError                 cluster ids missing or not fitting the batch / model
    │   ├── MissingClusterIdsError      a MoCE forward ran without ``moce_cluster_ids``
    │   └── InvalidClusterIdsError      wrong dtype, shape or values
    ├── ClusteringError                 stage 1: bad options, data that cannot be clustered
    │   └── ClusterArtifactError        an artifact is missing, damaged or does not match
    ├── FileFormatError                 a file the package wrote (or expects) can't be read
    ├── LoadError                       a folder can't be loaded as a MoCE model
    └── ExportError                     an export can't be written or used as asked

Every leaf is also a :class:`ValueError` (and ``MissingClusterIdsError`` a
:class:`RuntimeError`), so code catching those keeps working; the command-line entry points
print any of them as one line (:func:`moce_plugin.utils.cli_errors`).

This module imports nothing, so every layer (``model`` included) can raise from it.
"""

from __future__ import annotations

__all__ = [
    "MISSING_CLUSTER_IDS_FIX",
    "ClusterArtifactError",
    "ClusterIdsError",
    "ClusteringError",
    "ConfigError",
    "ExportError",
    "FileFormatError",
    "InvalidClusterIdsError",
    "LoadError",
    "MissingClusterIdsError",
    "MoCEError",
    "UnsupportedArchitectureError",
]


class MoCEError(Exception):
    """Base of every error moce_plugin raises on purpose."""


class ConfigError(MoCEError, ValueError):
    """The ``moce:`` settings are invalid or do not fit the model they are applied to."""


class UnsupportedArchitectureError(MoCEError, ValueError):
    """The model's family has no registered architecture (``register_architecture`` adds one)."""


class ClusterIdsError(MoCEError, ValueError):
    """Cluster ids are missing, or do not fit the batch, the data or the model."""


#: What to do when a MoCE forward has no cluster ids, whichever path noticed it.
MISSING_CLUSTER_IDS_FIX = (
    "Pass `moce_cluster_ids` (per sequence [B], or per token [B, S] with -1 for padding) to "
    "forward/generate, or wrap direct layer calls in moce_plugin.cluster_ids_context(...); "
    "moce_plugin.load_moce_model(...).generate assigns them from text. In axolotl training the "
    "MoCE collator adds them: check `plugins: [moce_plugin.MoCEPlugin]` is in the YAML."
)


class MissingClusterIdsError(ClusterIdsError, RuntimeError):
    """A MoCE forward ran without ``moce_cluster_ids``.

    The message is always the same fix (:data:`MISSING_CLUSTER_IDS_FIX`), after what the
    raising path saw (``situation``)."""

    def __init__(self, situation: str = "The MoCE model was called without cluster ids.") -> None:
        # Only the situation is in ``args``, so a pickled copy (dataloader workers, ranks)
        # rebuilds the same message instead of appending the fix twice.
        super().__init__(situation)

    def __str__(self) -> str:
        return f"{self.args[0]} {MISSING_CLUSTER_IDS_FIX}"


class InvalidClusterIdsError(ClusterIdsError):
    """Cluster ids have the wrong dtype, shape or values."""


class ClusteringError(MoCEError, ValueError):
    """A user-facing clustering problem (bad options, data that cannot be clustered)."""


class ClusterArtifactError(ClusteringError):
    """A cluster artifact is missing, damaged, or does not match the data or the model."""


class FileFormatError(MoCEError, ValueError):
    """A file the package wrote (or expects) cannot be read; the message names the file."""


class LoadError(MoCEError, ValueError):
    """A folder can't be loaded as a MoCE model (the message says why and what to do)."""


class ExportError(MoCEError, ValueError):
    """An export can't be written, or an exported folder can't be used as asked."""
