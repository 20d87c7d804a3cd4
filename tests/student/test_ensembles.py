"""Teacher ensembles in stage two: several caches of the same rows and views, their teachers' probabilities averaged at
T."""

import json

import numpy as np
import pytest
import torch
from helpers import FAST, save_vit_teacher, weights
from transformers import AutoImageProcessor

from kdcache import KdcacheError
from kdcache.data import ImagePipeline
from kdcache.format.manifest import LOGITS, MANIFEST
from kdcache.format.reader import load_cache
from kdcache.format.replay import Collator
from kdcache.outputs import TRAINING_RECORD
from kdcache.student.train import train_student


@pytest.fixture(scope="module")
def second_cache(tmp_path_factory, make_cache):
    """The tiny dataset cached by another tiny teacher (other initial weights): a second member of an ensemble."""
    folder = tmp_path_factory.mktemp("ensemble")
    return make_cache(folder / "cache", teacher=save_vit_teacher(folder / "teacher", seed=1))


def test_an_ensemble_distils_from_its_teachers_probabilities_averaged_by_hand(
    tmp_path, tiny_cache, second_cache, monkeypatch
):
    from kdcache.student.trainer import DistillationTrainer

    seen = []  # each training step's rows, teacher logits, student logits and loss, as compute_loss had them
    compute_loss = DistillationTrainer.compute_loss

    def recording(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss, outputs = compute_loss(self, model, inputs, return_outputs=True)
        if model.training:
            seen.append({key: value.detach().cpu().clone() for key, value in inputs.items()})  # off a GPU too
            seen[-1].update(student=outputs.logits.detach().cpu().clone(), loss=loss.detach().cpu().clone())
        return (loss, outputs) if return_outputs else loss

    monkeypatch.setattr(DistillationTrainer, "compute_loss", recording)
    temperature, alpha = 4.0, 0.7
    summary = train_student(
        [tiny_cache, second_cache],
        output=tmp_path / "ensemble",
        teacher_weights=[1, 3],
        temperature=temperature,
        alpha=alpha,
        max_steps=3,
        precision="fp32",  # on a GPU, auto would be bf16: another rounding than the fp64 by hand
        eval_split=None,
        **FAST,
    )
    # by hand: each cache's rows, the student's input as the collator makes it, and the average of the teachers'
    # softmax at T with the weights normalised (1/4, 3/4)
    collate = Collator(ImagePipeline(AutoImageProcessor.from_pretrained(str(tiny_cache), backend="pil")))
    rows = collate(load_cache(tiny_cache)[0]["train"].with_format("numpy").__getitems__(list(range(24))))
    member_logits = [
        torch.as_tensor(np.asarray(load_cache(cache)[0]["train"].with_format("numpy")[LOGITS])).double()
        for cache in (tiny_cache, second_cache)
    ]
    averaged = 0.25 * torch.softmax(member_logits[0] / temperature, -1) + 0.75 * torch.softmax(
        member_logits[1] / temperature, -1
    )
    assert not torch.allclose(member_logits[0], member_logits[1], atol=0.1), "two different teachers"
    assert len(seen) == 3
    for step in seen:
        order = [  # which cache row each of the batch's images is, found by its pixels
            next(row for row in range(24) if torch.equal(rows["pixel_values"][row], image))
            for image in step["pixel_values"]
        ]
        assert torch.equal(step["labels"], rows["labels"][order])
        targets = torch.softmax(step["teacher_logits"].double() / temperature, -1)
        assert torch.allclose(targets, averaged[order], rtol=0, atol=1e-6), "the targets the loss sees"
        student = step["student"].double()
        kl = (averaged[order] * (averaged[order].log() - torch.log_softmax(student / temperature, -1))).sum(-1)
        by_hand = (1 - alpha) * torch.nn.functional.cross_entropy(
            student, step["labels"]
        ) + alpha * temperature**2 * kl.mean()
        assert step["loss"].item() == pytest.approx(by_hand.item(), rel=1e-5), "the loss value"
    recipe = summary["recipe"]
    fingerprints = [json.loads((cache / MANIFEST).read_text())["fingerprint"] for cache in (tiny_cache, second_cache)]
    assert recipe["cache"] == [str(tiny_cache), str(second_cache)] and recipe["cache_fingerprint"] == fingerprints
    assert recipe["teacher_weights"] == [0.25, 0.75] and len(recipe["teacher"]) == 2
    card = (tmp_path / "ensemble" / "README.md").read_text()
    assert "an ensemble of 2 teachers" in card and all(fingerprint in card for fingerprint in fingerprints)
    assert "(0.25, weights sha256" in card and "(0.75, weights sha256" in card


@pytest.mark.parametrize("cache", ["tiny_cache", "four_view_cache"])
def test_an_ensemble_of_a_cache_with_itself_trains_exactly_like_the_cache(tmp_path, request, cache):
    cache = request.getfixturevalue(cache)
    options = dict(epochs=2, learning_rate=3e-3, **FAST)
    alone = train_student(cache, output=tmp_path / "alone", **options)
    twice = train_student([cache, cache], output=tmp_path / "twice", **options)
    assert twice["recipe"]["cache"] == [str(cache)] * 2, "the ensemble's path was taken"
    assert twice["train_losses"] == alone["train_losses"] and len(alone["train_losses"]) == 6
    assert twice["history"] == alone["history"]
    a, b = weights(tmp_path / "alone"), weights(tmp_path / "twice")
    assert all(torch.equal(a[name], b[name]) for name in a)


@pytest.fixture(scope="module")
def mismatched_caches(tmp_path_factory, make_cache):
    """Caches that cannot join the tiny cache, or the view cache, in an ensemble: each differs in one way."""
    from helpers import make_dataset_dict

    folder = tmp_path_factory.mktemp("mismatched")
    make_dataset_dict(seed=7).save_to_disk(str(folder / "other-data"))  # same splits and sizes, other images
    smaller_teacher = save_vit_teacher(folder / "teacher-24", seed=1, image_size=24)
    return {
        "other rows": make_cache(folder / "other-rows", dataset=folder / "other-data"),
        "other pixels": make_cache(folder / "other-pixels", teacher=smaller_teacher),
        "other view seed": make_cache(folder / "other-seed", views=4, view_seed=1),
    }


@pytest.mark.parametrize(
    "first,other,message",
    [
        (
            "tiny_cache",
            "other rows",
            r"split 'train' was made from other rows than cache '.*tiny-cache' \(fingerprint",
        ),
        ("tiny_cache", "four_view_cache", r"has 4 views per image of split 'train' and cache '.*tiny-cache' 1; make"),
        (
            "four_view_cache",
            "other view seed",
            r"draws the views of split 'train' otherwise than cache .*\(seed 1 vs 0\)",
        ),
        ("tiny_cache", "other pixels", r"split 'train' holds other pixels than cache '.*tiny-cache' \(rows 0 to 23\)"),
    ],
)
def test_caches_of_other_rows_or_views_are_refused(tmp_path, request, mismatched_caches, first, other, message):
    first = request.getfixturevalue(first)
    other = mismatched_caches[other] if other in mismatched_caches else request.getfixturevalue(other)
    with pytest.raises(KdcacheError, match=message) as refused:
        train_student([first, other], output=tmp_path / "s", max_steps=1, **FAST)
    assert "\n" not in str(refused.value) and str(other) in str(refused.value)
    assert not (tmp_path / "s").exists() and not (tmp_path / "s.partial").exists()


def test_the_command_line_trains_an_ensemble(tmp_path, tiny_cache, second_cache):
    from typer.testing import CliRunner

    from kdcache.cli import app

    command = ["train-student", str(tiny_cache), str(second_cache), "--output", str(tmp_path / "s"), "--epochs", "1"]
    command += ["--batch-size", "8", "--eval-split", "none"]
    result = CliRunner().invoke(app, command + ["--teacher-weights", "0.5,x"])
    assert result.exit_code == 1 and result.output.strip().splitlines() == [
        "kdcache: error: --teacher-weights '0.5,x' is not a comma-separated list of numbers, one per cache (e.g. 0.5,0.5)"
    ]
    result = CliRunner().invoke(app, command + ["--teacher-weights", "2,1"])
    assert result.exit_code == 0, result.output
    recorded = json.loads((tmp_path / "s" / TRAINING_RECORD).read_text())["recipe"]
    assert recorded["cache"] == [tiny_cache.name, second_cache.name], "the file names them by folder, not path"
    assert recorded["teacher_weights"] == pytest.approx([2 / 3, 1 / 3])
