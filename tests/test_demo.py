import json

import datasets
import numpy as np
import pytest
from transformers import AutoModelForImageClassification

from kdcache.demo import DIGIT_NAMES, LABELED_FRACTION, MODELS, build_digits_dataset, run_demo
from kdcache.outputs import TRAINING_RECORD


def rows(path):
    loaded = datasets.load_from_disk(str(path))
    return {
        name: (np.stack([np.asarray(image) for image in split["image"]]), list(split["label"]))
        for name, split in loaded.items()
    }


def test_digits_dataset_is_deterministic_and_stratified(tmp_path):
    first, again, other = (
        build_digits_dataset(tmp_path / name, seed=seed) for name, seed in (("a", 0), ("b", 0), ("c", 1))
    )
    a, b, c = rows(first), rows(again), rows(other)
    for name in ("train", "validation", "test"):
        assert np.array_equal(a[name][0], b[name][0]) and a[name][1] == b[name][1]
    assert not np.array_equal(a["test"][0], c["test"][0]), "another seed, another split"
    sizes = {name: len(labels) for name, (_, labels) in a.items()}
    assert sum(sizes.values()) == 1797 and sizes["train"] > 2 * sizes["test"]
    assert a["train"][0].shape[1:] == (32, 32, 3) and a["train"][0].dtype == np.uint8
    for name in ("train", "validation", "test"):
        assert set(a[name][1]) == set(range(10)), "every digit in every split"
    assert datasets.load_from_disk(str(first))["train"].features["label"].names == DIGIT_NAMES


@pytest.mark.slow
def test_quick_demo_runs_every_stage_and_writes_its_outputs(tmp_path, capsys):
    results = run_demo(tmp_path / "demo", quick=True, progress=False)
    root = tmp_path / "demo"
    students = ("student-distilled", "student-scratch", "student-distilled-few-labels", "student-scratch-few-labels")
    for folder in ("digits", "teacher", "cache", "eval", *students):
        assert (root / folder).is_dir(), folder
    assert (root / "cache" / "kdcache.json").exists()
    assert (root / "eval" / "comparison.png").exists()
    for student in students:
        AutoModelForImageClassification.from_pretrained(str(root / student))
    recorded = json.loads((root / "demo.json").read_text())
    assert recorded == json.loads(json.dumps(results))
    assert list(recorded["accuracy"]) == list(MODELS) and list(recorded["parameters"]) == list(MODELS)
    assert recorded["seconds_per_epoch"]["cached"] > 0 and recorded["seconds_per_epoch"]["online"] > 0
    # the label budget: 10% of the 18 training rows of each digit (rounded: 2), the same steps for both students
    assert recorded["labeled_fraction"] == LABELED_FRACTION and recorded["labeled_rows"] == 20
    assert recorded["train_rows"] == 180
    steps = recorded["steps"]
    assert steps["scratch_few_labels"] == steps["distilled_few_labels"] == steps["distilled"] == steps["scratch"]
    training = json.loads((root / "student-scratch-few-labels" / TRAINING_RECORD).read_text())
    assert training["recipe"]["labeled_rows"] == training["recipe"]["training_rows"] == 20, "labelled rows alone"
    lines = capsys.readouterr().out.splitlines()
    header = next(index for index, line in enumerate(lines) if line.startswith("model "))
    assert [line[:34].strip() for line in lines[header + 1 : header + 7]] == [
        "teacher (ResNet, run once)",
        "student from scratch (alpha=0)",
        "student distilled from the cache",
        "10% of the labels (20 rows):",
        "student from scratch on them",
        "student distilled, every image",
    ]
    assert any(line.startswith("seconds per training epoch") for line in lines)


def test_validation_of_a_few_labels_student_is_as_often_in_steps_as_a_whole_split_epoch():
    from kdcache.demo import epochs_per_validation

    # 1,074 rows in batches of 32 make 34 steps an epoch; 107 labelled rows make 4: validate every 8 of their epochs
    assert epochs_per_validation({"steps": 510, "epochs": 15.0}, 107, 32) == 8
    assert epochs_per_validation({"steps": 510, "epochs": 15.0}, 1074, 32) == 1
    assert epochs_per_validation({"steps": 12, "epochs": 2.0}, 180, 32) == 1


def test_a_few_labels_student_is_validated_every_k_epochs_and_at_its_last_step():
    from transformers import TrainerControl, TrainerState, TrainingArguments

    from kdcache.demo import evaluate_every

    callback, arguments = evaluate_every(3), TrainingArguments(output_dir="unused", report_to="none")
    validated = []
    for epoch in range(1, 9):  # 8 epochs of 4 steps, max_steps 30: the last one ends part-way
        state = TrainerState(epoch=float(epoch), global_step=min(4 * epoch, 30), max_steps=30)
        control = TrainerControl(should_evaluate=True, should_save=True)  # as the Trainer's epoch strategy sets them
        callback.on_epoch_end(arguments, state, control)
        assert control.should_evaluate == control.should_save
        if control.should_evaluate:
            validated.append(epoch)
    assert validated == [3, 6, 8]


def test_a_folder_the_demo_did_not_write_is_refused_and_left_intact(tmp_path, monkeypatch):
    import time

    import pytest

    from kdcache import KdcacheError, demo

    photos = tmp_path / "photos"
    photos.mkdir()
    (photos / "holiday.jpg").write_bytes(b"a photo")
    built = []
    monkeypatch.setattr(demo, "build_digits_dataset", lambda *args, **kwargs: built.append(args))
    started = time.perf_counter()
    with pytest.raises(KdcacheError) as refused:
        run_demo(photos, quick=True, progress=False)
    assert time.perf_counter() - started < 5 and not built, "refused before any work"
    message = str(refused.value)
    assert "\n" not in message and message.startswith(
        f"--output '{photos}' holds files that kdcache demo did not write"
    )
    assert sorted(path.name for path in photos.iterdir()) == ["holiday.jpg"]
    assert sorted(path.name for path in tmp_path.iterdir()) == ["photos"], "no lock file left beside it either"
    assert (photos / "holiday.jpg").read_bytes() == b"a photo"
    (tmp_path / "a-file").write_text("")
    with pytest.raises(KdcacheError, match="is a file"):
        run_demo(tmp_path / "a-file", quick=True, progress=False)


def test_the_demo_replaces_only_its_own_folder_or_an_empty_one(tmp_path):
    from kdcache.demo import DEMO_MARKER, DEMO_OUTPUT
    from kdcache.outputs import safe_output

    def claim(root):
        with safe_output(root, DEMO_OUTPUT):
            return sorted(path.name for path in root.iterdir())

    earlier = tmp_path / "earlier"
    assert claim(earlier) == [DEMO_MARKER]  # new: created and marked
    (earlier / "cache").mkdir()
    (earlier / "cache" / "data.arrow").write_bytes(b"old run")
    (earlier / "demo.json").write_text("{}")
    assert claim(earlier) == [DEMO_MARKER]
    empty = tmp_path / "empty"
    empty.mkdir()
    assert claim(empty) == [DEMO_MARKER]
