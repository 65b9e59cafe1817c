"""The console shows the aggregate routing summary; per-layer metrics go to the trackers."""

from __future__ import annotations

from transformers import TrainerControl, TrainerState, TrainingArguments
from transformers.trainer_callback import CallbackHandler, PrinterCallback, TrainerCallback

from moce_plugin.integration.trainer import _keep_layer_metrics_off_console, console_logs

LOGS = {"loss": 1.0, "learning_rate": 0.1, "moce/aux_loss": 1.01, "moce/load_imbalance": 1.2,
        "moce/router_entropy": 0.6, "moce/layer_0/load_imbalance": 1.3,
        "moce/layer_1/router_entropy": 0.5}


def test_console_logs_drop_only_per_layer_values():
    assert console_logs(LOGS) == {k: v for k, v in LOGS.items() if "layer_" not in k}


class _Tracker(TrainerCallback):
    def __init__(self) -> None:
        self.seen: dict = {}

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.seen = dict(logs)


def test_printer_gets_aggregate_and_tracker_gets_everything(tmp_path, capsys):
    tracker = _Tracker()
    handler = CallbackHandler([PrinterCallback(), tracker], None, None, None, None)

    class _Trainer:
        callback_handler = handler

    _keep_layer_metrics_off_console(_Trainer())
    _keep_layer_metrics_off_console(_Trainer())  # idempotent
    state = TrainerState()
    handler.on_log(TrainingArguments(output_dir=str(tmp_path), report_to=[]), state,
                   TrainerControl(), dict(LOGS))
    printed = capsys.readouterr().out
    assert "moce/aux_loss" in printed and "moce/layer_" not in printed
    assert "moce/layer_0/load_imbalance" in tracker.seen
