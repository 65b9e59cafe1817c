"""The error family and the one cluster-id check (dtype, shape, range) every path calls."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

from moce_plugin import errors
from moce_plugin.errors import InvalidClusterIdsError, MissingClusterIdsError, MoCEError
from moce_plugin.model.cluster_ids import IGNORE_CLUSTER_ID, check_cluster_ids, single_group_ids


def test_every_error_is_a_moce_error_and_a_value_error():
    leaves = [getattr(errors, name) for name in errors.__all__
              if isinstance(getattr(errors, name), type) and getattr(errors, name) is not MoCEError]
    assert len(leaves) >= 10
    for cls in leaves:
        assert issubclass(cls, MoCEError) and issubclass(cls, ValueError), cls
    assert issubclass(MissingClusterIdsError, RuntimeError)


def test_old_names_are_the_family_classes():
    from moce_plugin.clustering.errors import ClusterArtifactError, ClusteringError
    from moce_plugin.integration.datasets import ClusterIdError
    from moce_plugin.model.architectures import UnsupportedArchitectureError
    from moce_plugin.model.routing import ClusterIdsError
    from moce_plugin.outputs.export import ExportError
    from moce_plugin.outputs.hf_native import MoCEExportError
    from moce_plugin.outputs.load import MoCELoadError
    from moce_plugin.utils import FileFormatError

    assert ClusterIdError is ClusterIdsError is errors.ClusterIdsError
    assert MoCEExportError is ExportError is errors.ExportError
    assert MoCELoadError is errors.LoadError
    assert ClusteringError is errors.ClusteringError
    assert ClusterArtifactError is errors.ClusterArtifactError
    assert FileFormatError is errors.FileFormatError
    assert UnsupportedArchitectureError is errors.UnsupportedArchitectureError


def test_missing_ids_message_is_one_fix_and_survives_pickling():
    default, kv = MissingClusterIdsError(), MissingClusterIdsError("A KV cache continued.")
    for exc in (default, kv):
        assert str(exc).endswith(errors.MISSING_CLUSTER_IDS_FIX)
        assert str(pickle.loads(pickle.dumps(exc))) == str(exc)
    assert str(kv).startswith("A KV cache continued.")


@pytest.mark.parametrize("ids", [torch.tensor([0, 3, 1]), np.array([0, 3, 1]), [0, 3, 1]])
def test_out_of_range_names_the_first_bad_row(ids):
    with pytest.raises(InvalidClusterIdsError, match=r"1 row has x outside \[0, 3\) "
                                                     r"\(first: row 1 = 3\)\. fix it"):
        check_cluster_ids(ids, 3, what="x", fix=". fix it")


def test_per_token_ids_name_row_and_token_and_padding_is_allowed():
    ids = torch.tensor([[0, 1, IGNORE_CLUSTER_ID], [2, -2, 5]])
    with pytest.raises(InvalidClusterIdsError, match=r"2 tokens have .*row 1, token 1 = -2"):
        check_cluster_ids(ids, 3)
    ok = torch.tensor([[0, 1, IGNORE_CLUSTER_ID]])
    assert check_cluster_ids(ok, 3) is not None
    with pytest.raises(InvalidClusterIdsError, match="row 0, token 2 = -1"):
        check_cluster_ids(ok, 3, allow_ignore=False)


def test_scalar_and_python_values():
    assert int(check_cluster_ids(2, 3)) == 2
    with pytest.raises(InvalidClusterIdsError, match=r"--cluster 7 is out of range \[0, 3\)"):
        check_cluster_ids(7, 3, what="--cluster")
    with pytest.raises(InvalidClusterIdsError, match=r"row 1 has c = '2' \(str\)"):
        check_cluster_ids([0, "2"], 3, what="c")
    with pytest.raises(InvalidClusterIdsError, match=r"row 0 has c = True \(bool\)"):
        check_cluster_ids([True, 0], 3, what="c")
    with pytest.raises(InvalidClusterIdsError, match=r"row 2 has c = 1\.5"):
        check_cluster_ids([0.0, 1.0, 1.5], 3, what="c")
    with pytest.raises(InvalidClusterIdsError, match=r"row 0 has c = 0\.0 .*stored as floats"):
        check_cluster_ids([0.0, 1.0], 3, what="c")
    assert check_cluster_ids([[0, 1], [2, -1]], 3).shape == (2, 2)
    with pytest.raises(InvalidClusterIdsError, match="different lengths"):
        check_cluster_ids([[0, 1], [2]], 3)


@pytest.mark.parametrize("ids", [torch.tensor([0.0, 1.0]), torch.tensor([True, False]),
                                 np.array([0.0, 1.0])])
def test_non_integer_dtypes_are_refused(ids):
    with pytest.raises(InvalidClusterIdsError, match="must be integers"):
        check_cluster_ids(ids, 3)


@pytest.mark.parametrize("shape,ids,match", [
    ((2, 4), torch.zeros(3, dtype=torch.long), "3 per-sequence ids for a batch of 2"),
    ((2, 4), torch.zeros(3, 4, dtype=torch.long), "batch size 3"),
    ((2, 4), torch.zeros(2, 3, dtype=torch.long), "covers 3 positions but the sequence has 4"),
    ((2, 4), torch.zeros(2, 4, 1, dtype=torch.long), "per sequence"),
    ((8,), torch.zeros(7, dtype=torch.long), r"shape \(7,\), expected \(8,\)"),
])
def test_shapes(shape, ids, match):
    with pytest.raises(InvalidClusterIdsError, match=match):
        check_cluster_ids(ids, batch_shape=shape)


def test_accepted_shapes_pass():
    for ids in (torch.zeros(2, dtype=torch.long), torch.zeros(2, 4, dtype=torch.long),
                torch.zeros(2, 9, dtype=torch.long)):  # longer: a KV-cache step
        check_cluster_ids(ids, 3, batch_shape=(2, 4))


def test_single_group_ids():
    assert single_group_ids(1, 3) == [0, 0, 0]
    assert single_group_ids(2, 3) is None


def test_dataset_column_check_uses_the_same_error():
    from moce_plugin.integration.datasets import _check_ids

    with pytest.raises(InvalidClusterIdsError,
                       match=r"Dataset 'd': 1 row has 'cid' outside \[0, 3\) \(first: row 2 = 3\)"):
        _check_ids([0, 1, 3], 3, "cid", "d")
    with pytest.raises(InvalidClusterIdsError, match=r"first: row 0 = -1"):  # no padding
        _check_ids([-1, 1], 3, "cid", "d")
