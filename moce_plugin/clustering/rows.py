"""A training row as stage 1 clusters it: its own module because both the pipeline that makes
rows and the report that describes them use it, and neither should import the other for it."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Row:
    """One training example as clustered: where it came from and what was embedded."""

    dataset: str
    index: int
    text: str
    source: str
