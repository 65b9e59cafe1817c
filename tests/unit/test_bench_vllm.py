"""bench.bench_vllm's CPU-side logic (no server is started): the base folder it writes from an
export, the concurrent load driver, the table and its ratios."""

from __future__ import annotations

import threading
import time

import torch
from hf_native_helpers import CFG, build_output, tiny_base

from bench.bench_vllm import run_load, summarize, write_base_folder
from moce_plugin.export import export_model


def test_base_folder_is_the_export_without_moce(tmp_path):
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_base(tmp_path / "base"))
    build_output(tmp_path / "base", tmp_path / "out", None)
    export = export_model(tmp_path / "out", tmp_path / "export")
    folder = write_base_folder(export, tmp_path / "plain")
    plain = AutoModelForCausalLM.from_pretrained(folder)  # no remote code
    assert type(plain).__name__ == "LlamaForCausalLM"
    want = base.state_dict()
    got = plain.state_dict()
    assert set(got) == set(want)
    for name in want:
        torch.testing.assert_close(got[name], want[name], msg=name)
    assert CFG.num_clusters == 3


def test_run_load_runs_clients_concurrently_and_counts_tokens():
    active, peak = [0], [0]
    lock = threading.Lock()

    def send(prompt: str) -> int:
        with lock:
            active[0] += 1
            peak[0] = max(peak[0], active[0])
        time.sleep(0.05)
        with lock:
            active[0] -= 1
        return 7

    tokens, seconds = run_load(send, 4, 2)
    assert tokens == 4 * 2 * 7 and peak[0] == 4
    assert 0.09 < seconds < 2


def test_summary_table_ratios():
    lines = summarize({"a": {1: 10.0, 8: 60.0}, "b": {1: 11.0, 8: 64.0}, "c": {1: 5.0, 8: 10.0}})
    table = "\n".join(lines)
    assert "| a | 10.0 | 60.0 |" in table
    assert "| a/b (target >= 0.85 at 8) | 0.91 | 0.94 |" in table
    assert "| a/c (target >= 5.0 at 8) | 2.00 | 6.00 |" in table
    partial = "\n".join(summarize({"a": {1: 10.0}}))
    assert "| a/b (target >= 0.85 at 8) | - |" in partial
