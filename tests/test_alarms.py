"""Training-health alarms: robust overfitting fires on a rise and fall, not on a plateau; gradient
masking fires on a model whose input layer has no gradient; both reach the model card."""

import json
import shutil

import torch

from cure_hub.alarms import gradient_masking, large_epsilon_accuracy, robust_overfitting
from cure_hub.config import TrainConfig
from cure_hub.hub import export_run
from cure_hub.trainer import Trainer
from helpers import Brightness
from test_trainer import tiny_config


def test_robust_overfitting_fires_on_a_rise_and_fall_only():
    fired = robust_overfitting([0.30, 0.40, 0.45, 0.41, 0.40], margin=0.02, patience=2)
    assert fired.startswith("robust overfitting: PGD accuracy 0.4000") and "best 0.4500 (evaluation 3)" in fired
    for calm in ([0.30, 0.40, 0.45, 0.44, 0.445],  # a plateau within the margin
                 [0.30, 0.40, 0.45, 0.40, 0.45],  # a dip and a recovery
                 [0.30, 0.40, 0.45, 0.40],  # one evaluation below: not yet `patience`
                 [0.30, 0.35, 0.40, 0.45]):  # still rising
        assert robust_overfitting(calm, margin=0.02, patience=2) is None, calm


def test_gradient_masking_fires_on_a_model_without_input_gradients():
    # Classes 1-8 only: the random start is clipped to [0, 1], which shifts the mean of the darkest
    # and brightest classes by up to 0.04 of their 0.05 margin, enough to cross it by chance.
    labels = 1 + torch.arange(16) % 8
    images = ((labels + 0.5) / 10).view(-1, 1, 1, 1) + 0.02 * (torch.rand(16, 3, 8, 8, generator=torch.Generator().manual_seed(0)) - 0.5)
    masked = large_epsilon_accuracy(Brightness(rounding=True), images, labels, torch.Generator().manual_seed(1)).float().mean().item()
    honest = large_epsilon_accuracy(Brightness(), images, labels, torch.Generator().manual_seed(1)).float().mean().item()
    assert masked == 1.0 and honest == 0.0
    assert gradient_masking(1.0, 1.0, masked).startswith("gradient masking: PGD at eps = 64/255 still leaves 1.0000")
    assert gradient_masking(1.0, 0.0, honest) is None
    assert "above clean accuracy" in gradient_masking(0.5, 0.6, 0.0)


def test_alarms_and_the_best_last_gap_reach_the_card(natural_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(natural_run, run, ignore=shutil.ignore_patterns("checkpoints", "export"))
    summary = json.loads((run / "summary.json").read_text())
    summary.update(alarms=["robust overfitting: PGD accuracy 0.4000 has stayed more than 0.02 below its best 0.4500"],
                   stopped_by_alarm=True, best_pgd_accuracy=0.45, final_eval={"eval/clean_acc": 0.8, "eval/pgd20_acc": 0.4})
    (run / "summary.json").write_text(json.dumps(summary))
    card = (export_run(run, tmp_path / "export") / "README.md").read_text()
    assert "\n# run\n" in card and 'load_robust_model("<your-username>/run")' in card  # the run's name, not "export"
    assert "best 45.00 %, last 40.00 % (this model holds the last weights)" in card
    assert "Training-health alarms (the run was stopped by one):\n  - robust overfitting: PGD accuracy 0.4000" in card


class ScriptedRobustness(Trainer):
    """The real trainer, whose evaluations report these PGD accuracies in turn: a rise and a fall,
    robust overfitting on cue (a tiny run on digits does not overfit on demand)."""

    PGD_ACCURACIES = [0.30, 0.45, 0.41, 0.40, 0.39, 0.38]

    def evaluate(self):
        results = super().evaluate()
        key = next(k for k in results if k.startswith("eval/pgd"))
        return {**results, key: self.PGD_ACCURACIES[len(self.state.robust_history)]}


def test_stop_on_robust_overfitting_ends_the_run_and_says_so(tmp_path):
    """Patience 2, margin 0.02: the fourth evaluation (0.41, 0.40 after a best of 0.45) fires the
    alarm and ends a 6-epoch run after epoch 4 (2 steps each); the summary, the log and the card say so, the best
    weights are those of the second evaluation, and resuming the stopped run trains no further."""
    sections = dict(data={"dataset": "digits", "train_subset": 32, "eval_subset": 16}, method={"method": "pgd_at"},
                    optim={"epochs": 6, "max_steps": None},
                    run={"stop_on_robust_overfitting": True, "overfitting_margin": 0.02, "overfitting_patience": 2})
    ScriptedRobustness(tiny_config(tmp_path / "run", **sections)).train()
    run = tmp_path / "run"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["stopped_by_alarm"] and summary["steps"] == 4 * 2  # 32 examples in batches of 16
    assert any(alarm.startswith("robust overfitting") for alarm in summary["alarms"])
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "robust overfitting" in r.get("health/alarms", "")][0] == 8
    assert json.loads((run / "weights" / "best.json").read_text())["step"] == 4
    card = (run / "export" / "README.md").read_text()
    assert "robust overfitting" in card and "stopped" in card
    ScriptedRobustness(TrainConfig.from_dict({**tiny_config(tmp_path / "run", **sections).to_dict(),
                                              "run": {**tiny_config(tmp_path / "run", **sections).to_dict()["run"],
                                                      "resume_from": str(run)}})).train()
    assert json.loads((run / "summary.json").read_text())["steps"] == 8
