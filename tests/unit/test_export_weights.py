"""An export loaded the Hugging Face way (``AutoModelForCausalLM.from_pretrained(EXPORT,
trust_remote_code=True)``) refuses damaged MoCE weights like ``load_moce_model`` does: a NaN
in one expert, or bytes overwritten in the export's model weights, is a one-line error naming
the tensor and the file (``outputs.hf_native.check_export_weights``)."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from hf_native_helpers import build_output, tiny_base
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from moce_plugin.errors import MoCEError
from moce_plugin.export import export_model
from moce_plugin.outputs.load import load_moce_model

# one expert's up-projection in the export's model.safetensors (layer 1, a full save's key)
TARGET = "model.layers.1.mlp.moce_experts.up"


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("export_weights")
    build_output(tiny_base(root / "base"), root / "out", None)
    return export_model(root / "out", root / "dest")


def _auto(path):
    return AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)


def _copy(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return dst


def _tensor_bytes(file, key) -> tuple[int, int]:
    """(start, end) byte offsets of ``key``'s data in a safetensors file."""
    with open(file, "rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(size))
    start, end = header[key]["data_offsets"]
    return 8 + size + start, 8 + size + end


def test_clean_export_loads_with_the_trained_experts(export_dir):
    model = _auto(export_dir)
    with safe_open(str(export_dir / "model.safetensors"), framework="pt") as st:
        saved = st.get_tensor(TARGET)
    loaded = dict(model.named_parameters())[TARGET]
    torch.testing.assert_close(loaded, saved, atol=0, rtol=0)
    assert bool(saved.abs().sum() > 0)  # trained (perturbed) experts, not zeros


def test_nan_in_one_expert_is_refused_naming_the_tensor_and_file(export_dir, tmp_path):
    broken = _copy(export_dir, tmp_path / "nan")
    file = broken / "model.safetensors"
    with safe_open(str(file), framework="pt") as st:
        metadata = st.metadata()
    state = load_file(str(file))
    state[TARGET][0, 0, :16] = float("nan")  # 16 NaN in group 0's first expert
    save_file(state, str(file), metadata=metadata)
    with pytest.raises(MoCEError) as err:
        _auto(broken)
    msg = str(err.value)
    assert f"{TARGET} in {file}" in msg and "holds 16 non-finite values" in msg, msg
    assert "moce-export" in msg


def test_overwritten_bytes_are_refused_by_the_recorded_checksum(export_dir, tmp_path):
    broken = _copy(export_dir, tmp_path / "flipped")
    file = broken / "model.safetensors"
    start, end = _tensor_bytes(file, TARGET)
    data = bytearray(file.read_bytes())
    for i in range(start + 64, start + 96, 4):  # the lowest mantissa byte: finite, wrong
        data[i] ^= 0x5A
    file.write_bytes(bytes(data))
    with pytest.raises(MoCEError) as err:
        _auto(broken)
    msg = str(err.value)
    assert f"is damaged: MoCE tensor {TARGET} in {file} differs from the checksum" in msg, msg
    # the training-output loader reads moce_weights.safetensors, which is intact
    assert load_moce_model(broken).model is not None


def test_sharded_export_names_the_shard_holding_the_damaged_tensor(export_dir, tmp_path):
    """A multi-file export (``model.safetensors.index.json``): only the shards holding MoCE
    tensors are read, and the error names the shard."""
    broken = _copy(export_dir, tmp_path / "sharded")
    file = broken / "model.safetensors"
    with safe_open(str(file), framework="pt") as st:
        metadata = st.metadata()
    state = load_file(str(file))
    file.unlink()
    keys = sorted(state)
    shards = {"model-00001-of-00002.safetensors": keys[: len(keys) // 2],
              "model-00002-of-00002.safetensors": keys[len(keys) // 2:]}
    holder = next(name for name, names in shards.items() if TARGET in names)
    state[TARGET][1, 0, :3] = float("inf")
    for name, names in shards.items():
        save_file({k: state[k] for k in names}, str(broken / name), metadata=metadata)
    index = {"metadata": {}, "weight_map": {k: n for n, names in shards.items() for k in names}}
    (broken / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(MoCEError, match=f"{TARGET} in {broken / holder} holds 3 non-finite"):
        _auto(broken)
