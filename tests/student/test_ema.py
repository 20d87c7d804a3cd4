"""The exponential moving average of the student's weights (kdcache.student.ema)."""

import json

import pytest
import torch
from helpers import FAST, crash_after_first_save, weights
from transformers import pipeline

from kdcache.outputs import TRAINING_RECORD
from kdcache.student.train import train_student


def test_ema_is_what_is_saved_and_both_load_as_pipelines(tmp_path, tiny_cache, monkeypatch):
    from PIL import Image

    from kdcache.student import trainer as train_module

    kept = []

    class Recorded(train_module.StudentEMA):
        def __init__(self, decay):
            super().__init__(decay)
            kept.append(self)

    monkeypatch.setattr(train_module, "StudentEMA", Recorded)
    train_student(
        tiny_cache, output=tmp_path / "ema", epochs=2, ema_decay=0.5, eval_split=None, save_checkpoints=False, **FAST
    )
    train_student(tiny_cache, output=tmp_path / "plain", epochs=2, eval_split=None, save_checkpoints=False, **FAST)
    averaged = kept[0].ema.module.state_dict()
    saved, plain = weights(tmp_path / "ema"), weights(tmp_path / "plain")
    for name, value in saved.items():
        assert torch.allclose(value.float(), averaged[name].float().cpu()), name  # trained on a GPU where one is
    assert any(not torch.allclose(saved[name].float(), plain[name].float()) for name in saved), (
        "the EMA is not the last step"
    )
    for folder in ("ema", "plain"):
        assert len(pipeline("image-classification", model=str(tmp_path / folder))(Image.new("RGB", (40, 36)))) == 3
    recorded = json.loads((tmp_path / "ema" / TRAINING_RECORD).read_text())
    assert (
        recorded["recipe"]["ema_decay"] == 0.5 and "EMA with decay 0.5" in (tmp_path / "ema" / "README.md").read_text()
    )


def test_the_ema_forgets_the_random_initial_weights_within_a_few_steps():
    from torch.optim.swa_utils import AveragedModel

    from kdcache.student.ema import ema_decay_at, warmed_up_ema

    assert ema_decay_at(0.99, 0) == 0.1 and ema_decay_at(0.99, 1000) == 0.99
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
    averaged = AveragedModel(model, multi_avg_fn=warmed_up_ema(0.999), use_buffers=True)
    averaged.update_parameters(model)  # the first update copies the weights as they are: the random ones
    with torch.no_grad():
        for step in range(30):
            model[0].weight.fill_(1.0)
            model[1].num_batches_tracked.fill_(step + 1)
            averaged.update_parameters(model)
    # the random weights' share is the product of the warmed-up decays (2/11 * 3/12 * ... < 1e-4), not 0.999**30
    assert torch.allclose(averaged.module[0].weight, torch.ones(3, 4), atol=1e-3)
    assert averaged.module[1].num_batches_tracked.item() == 30, "integer buffers follow the model"


def test_ema_with_evaluation_and_resume(tmp_path, tiny_cache, monkeypatch):
    whole = train_student(tiny_cache, output=tmp_path / "whole", epochs=2, ema_decay=0.8, **FAST)
    with crash_after_first_save(monkeypatch), pytest.raises(KeyboardInterrupt):
        train_student(tiny_cache, output=tmp_path / "resumed", epochs=2, ema_decay=0.8, **FAST)
    resumed = train_student(tiny_cache, output=tmp_path / "resumed", epochs=2, ema_decay=0.8, resume=True, **FAST)
    assert resumed["train_losses"][-3:] == whole["train_losses"][-3:], "training resumed from the training weights"
    assert [e["eval_accuracy"] for e in resumed["history"]] == [e["eval_accuracy"] for e in whole["history"]]
    a, b = weights(tmp_path / "whole"), weights(tmp_path / "resumed")
    assert all(torch.allclose(a[name].float(), b[name].float(), atol=1e-6) for name in a)
