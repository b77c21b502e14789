"""Training-health alarms: robust overfitting fires on a rise and fall, not on a plateau, and never in
natural training; training collapse on accuracy that stays down under the regulariser, not on a dip;
gradient masking fires on a model whose input layer has no gradient; all reach the model card."""

import json
import shutil

import torch

import pytest

from cure_hub.alarms import TrainingCollapsedError, gradient_masking, large_epsilon_accuracy, robust_overfitting, training_collapse
from cure_hub.cli import main as cli_main
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


#: [training accuracy, main loss, regulariser] of the first step, then per logged step. The run that
#: collapsed on an H200 (docs/cure.md): from a natural model at 88.5 %, training accuracy near 25 %
#: from step 100 to its end at 1,560, with L_CR the largest part of its loss.
START = [[0.88, 1.0, 0.5]]
DOWN = [[0.25, 1.9, 2.4]] * 20


def test_training_collapse_fires_when_accuracy_stays_down_while_the_regulariser_leads():
    fired = training_collapse(START + DOWN, drop=0.5, patience=20)
    assert fired == ("training collapse: training accuracy 0.2500 has stayed below 0.5 x its start 0.8800 for 20 logged "
                     "steps while the regulariser (2.4) outweighs every other term of the loss (at most 1.9)")
    recovered = [[0.5, 1.5, 1.0]]  # above half of the start: TRADES's dip and recovery
    for calm in (START + DOWN[:19],  # not yet `patience` logged steps
                 START + DOWN[:10] + recovered + DOWN[:19],  # one step back up restarts the count
                 START + [[0.25, 2.4, 1.9]] * 20,  # down, but the main loss leads
                 START + [[0.45, 1.0, 2.0]] * 20,  # the regulariser leads, but above half of the start
                 DOWN[:2] + DOWN):  # started down: there was nothing to fall from
        assert training_collapse(calm, drop=0.5, patience=20) is None, calm


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


class ScriptedTrainingMetrics(Trainer):
    """The real trainer, whose logged steps report these [training accuracy, main loss, regulariser]
    in turn: a start, a dip and a recovery (TRADES's), a fall under the main loss, a recovery, then a
    fall under the regulariser that lasts (the H200 CURE run's)."""

    RECOVERED, MAIN_LEADS = [[0.6, 1.2, 1.0]], [[0.3, 2.0, 1.0]]
    SCRIPT = START + DOWN[:3] + RECOVERED + MAIN_LEADS * 4 + RECOVERED + DOWN

    def _watch_collapse(self, metrics):
        accuracy, main, regulariser = (torch.tensor(v) for v in self.SCRIPT[len(self.state.training_history)])
        return super()._watch_collapse({**metrics, "clean_acc": accuracy, "main_loss": main, "regulariser": regulariser})


@pytest.mark.parametrize("stop", [False, True])
def test_training_collapse_reaches_the_log_the_summary_and_the_card_or_stops_the_run(tmp_path, stop):
    """Patience 4 over the script above, a logged step every 2 steps after the first step (the start):
    the dip and the stretch where the main loss leads do not fire; the last fall does at its fourth
    logged step, step 26. With --stop-on-collapse the run ends there, with a checkpoint, the cause and
    fix named, no export."""
    sections = dict(data={"dataset": "digits", "train_subset": 32, "eval_subset": 16}, method={"method": "trades"},
                    optim={"max_steps": 30}, run={"collapse_patience": 4, "stop_on_collapse": stop, "log_every_steps": 2})
    trainer = ScriptedTrainingMetrics(tiny_config(tmp_path / "run", **sections))
    run = tmp_path / "run"
    if stop:
        with pytest.raises(TrainingCollapsedError, match=r"^training collapse: .* \(step 26\)\. Likely cause and fix: .*--lr"):
            trainer.train()
        assert (run / "checkpoints" / "step_0000026").is_dir() and not (run / "export").exists()
        return
    trainer.train()
    assert len(trainer.state.training_history) == 1 + 30 // 2
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    (fired,) = [r for r in records if "training collapse" in r.get("health/alarms", "")]
    assert fired["step"] == 26 and "train/loss" in fired
    summary = json.loads((run / "summary.json").read_text())
    assert [a for a in summary["alarms"] if a.startswith("training collapse")] == [fired["health/alarms"]]
    assert "  - training collapse: training accuracy 0.2500 has stayed below 0.5 x its start 0.8800" in (
        run / "export" / "README.md").read_text()


def test_a_real_run_made_to_collapse_fires_and_stops_in_one_line(natural_run, tmp_path, capsys):
    """CURE pulled by a large gamma towards a revision model frozen at its natural start (d = 1), at a
    learning rate that start cannot bear: training accuracy falls from about 97 % to about 10 % in two
    steps and stays there while gamma L_CR is ten times L_adv."""
    args = ["train", "--model", "cifar_resnet18", "--model-kwargs", "width=8", "--dataset", "digits", "--augment", "none",
            "--init-from", str(natural_run), "--method", "cure", "--revision-decay", "1", "--revision-rate", "1",
            "--gamma", "5", "--beta", "6", "--steps", "3", "--lr", "0.2", "--lr-schedule", "constant", "--batch-size", "64",
            "--max-steps", "30", "--log-every-steps", "1", "--eval-subset", "16", "--eval-attack-steps", "2",
            "--collapse-patience", "10", "--stop-on-collapse", "--output-dir", str(tmp_path / "run")]
    assert cli_main(args) == 2
    error = capsys.readouterr().err
    assert "Traceback" not in error
    (line,) = [line for line in error.splitlines() if "error:" in line]
    assert line.startswith("cure-hub train: error: training collapse: training accuracy") and "--revision-warmup" in line


class NaturalScriptedRobustness(Trainer):
    """ScriptedRobustness's rise and fall, counted by evaluations (natural training keeps no PGD history)."""

    def evaluate(self):
        self.evaluations = getattr(self, "evaluations", -1) + 1
        results = super().evaluate()
        key = next(k for k in results if k.startswith("eval/pgd"))
        return {**results, key: ScriptedRobustness.PGD_ACCURACIES[self.evaluations]}


def test_robust_overfitting_is_not_watched_in_natural_training(tmp_path):
    """PGD accuracy near zero wobbles below its best in natural training: no alarm there."""
    sections = dict(data={"dataset": "digits", "train_subset": 32, "eval_subset": 16}, method={"method": "standard"},
                    optim={"epochs": 6, "max_steps": None},
                    run={"stop_on_robust_overfitting": True, "overfitting_margin": 0.02, "overfitting_patience": 2})
    NaturalScriptedRobustness(tiny_config(tmp_path / "run", **sections)).train()
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["steps"] == 6 * 2 and not summary["stopped_by_alarm"]
    assert not any(alarm.startswith("robust overfitting") for alarm in summary["alarms"])
