"""kdcache evaluate (kdcache.evaluation.evaluate): models side by side on a split, with their cache's teacher, from the
command line; one evaluation per output, the free space it needs."""

import json

import datasets
import numpy as np
import pytest
import torch
from helpers import LABELS, direct_ece, make_dataset_dict, save_mobilenet_student, save_student, save_vit_teacher
from PIL import Image
from scipy.special import rel_entr, softmax
from transformers import AutoImageProcessor, AutoModelForImageClassification

from kdcache import KdcacheError
from kdcache.evaluation.evaluate import evaluate_models
from kdcache.evaluation.quality import classification_metrics, teacher_agreement
from kdcache.evaluation.report import COMPARISON_PNG, CONFUSION_PNG, METRICS, RELIABILITY_PNG, describe


def plain_logits(model_path, dataset_path, split="test"):
    """What pipeline() computes: the model's own processor on the RGB images, then the model."""
    processor = AutoImageProcessor.from_pretrained(str(model_path), backend="pil")
    model = AutoModelForImageClassification.from_pretrained(str(model_path)).eval()
    images = [image.convert("RGB") for image in datasets.load_from_disk(str(dataset_path))[split]["image"]]
    with torch.no_grad():
        return model(**processor(images, return_tensors="pt")).logits.numpy()


def test_one_model_with_its_cache(tmp_path, tiny_dataset, tiny_teacher, tiny_cache):
    report = evaluate_models(
        [str(tiny_teacher)],
        cache=str(tiny_cache),
        split="test",
        batch_size=5,
        output=tmp_path / "eval",
        progress=False,
    )
    assert report["dataset"] == str(tiny_dataset), "the dataset defaults to the one the cache was made from"
    saved = json.loads((tmp_path / "eval" / METRICS).read_text())
    result = report["models"][0]
    assert saved == result
    references = datasets.load_from_disk(str(tiny_dataset))["test"]["labels"][:]
    expected = classification_metrics(plain_logits(tiny_teacher, tiny_dataset).argmax(1), references, LABELS)
    for key in ("accuracy", "macro_f1", "per_class", "confusion_matrix"):
        assert result[key] == expected[key]
    assert result["parameters"] == sum(
        p.numel() for p in AutoModelForImageClassification.from_pretrained(str(tiny_teacher)).parameters()
    )
    assert result["weights_bytes"] == (tiny_teacher / "model.safetensors").stat().st_size
    assert result["speed"]["forward_images_per_second"] > 0 and result["speed"]["end_to_end_images_per_second"] > 0
    # the teacher against its own cached logits: the same predictions, up to float noise from batching
    agreement = result["teacher_agreement"]
    assert agreement["top1_agreement"] == 1.0 and agreement["kl_teacher_student"] < 1e-9
    assert agreement["teacher_accuracy"] == result["accuracy"]
    with Image.open(tmp_path / "eval" / CONFUSION_PNG) as image:
        image.verify()
    with Image.open(tmp_path / "eval" / CONFUSION_PNG) as image:
        assert image.format == "PNG" and image.width > 300 and image.height > 300
    assert "accuracy" in describe(report) and "top-1 agreement 1.0000" in describe(report)
    logits = plain_logits(tiny_teacher, tiny_dataset)
    # evaluate's batches are not plain_logits' and, on some CPUs, a row's logits move in the 7th digit with its batch
    assert result["expected_calibration_error"] == pytest.approx(
        direct_ece(softmax(logits.astype(np.float64), -1), references), abs=1e-6
    )
    assert f"ECE {result['expected_calibration_error']:.4f} (15 bins)" in describe(report)
    with Image.open(tmp_path / "eval" / RELIABILITY_PNG) as image:
        assert image.format == "PNG" and image.width > 300 and image.height > 300
    assert not (tmp_path / "eval.partial").exists()


def test_several_models_side_by_side(tmp_path, tiny_dataset, tiny_teacher, tiny_cache):
    student = save_student(tmp_path / "student", tiny_teacher)
    # the teacher's weights with its outputs named in another order: output i now means permuted[i]
    permuted = save_vit_teacher(tmp_path / "permuted", id2label={0: LABELS[2], 1: LABELS[0], 2: LABELS[1]})
    models = [str(tiny_teacher), str(student), str(permuted)]
    report = evaluate_models(
        models,
        dataset=str(tiny_dataset),
        cache=str(tiny_cache),
        batch_size=8,
        output=tmp_path / "compare",
        progress=False,
    )
    teacher_raw, student_raw = plain_logits(tiny_teacher, tiny_dataset), plain_logits(student, tiny_dataset)
    cached = datasets.load_from_disk(str(tiny_cache))["test"].with_format("numpy")[:]["teacher_logits"]
    references = datasets.load_from_disk(str(tiny_dataset))["test"]["labels"][:]
    for result, logits in zip(report["models"], (teacher_raw, student_raw, teacher_raw[:, [1, 2, 0]])):
        assert result["accuracy"] == classification_metrics(logits.argmax(1), references, LABELS)["accuracy"]
        direct = teacher_agreement(logits, cached, references)
        for key, value in direct.items():
            assert result["teacher_agreement"][key] == pytest.approx(value, abs=1e-6)
    combined = json.loads((tmp_path / "compare" / METRICS).read_text())
    assert [m["model"] for m in combined["models"]] == models
    for name in ("teacher", "student", "permuted"):
        assert (tmp_path / "compare" / name / METRICS).exists() and (
            tmp_path / "compare" / name / CONFUSION_PNG
        ).exists()
        assert (tmp_path / "compare" / name / RELIABILITY_PNG).exists()
    with Image.open(tmp_path / "compare" / COMPARISON_PNG) as image:
        image.verify()
    table = describe(report)
    assert all(name in table for name in ("teacher", "student", "permuted", "macro-F1", "ECE", "agree"))
    # evaluating again replaces the earlier evaluation
    evaluate_models([str(tiny_teacher)], dataset=str(tiny_dataset), output=tmp_path / "compare", progress=False)
    assert not (tmp_path / "compare" / COMPARISON_PNG).exists()


def test_default_output_is_beside_a_local_model(tmp_path, tiny_dataset, tiny_teacher):
    student = save_student(tmp_path / "student", tiny_teacher)
    report = evaluate_models(str(student), dataset=str(tiny_dataset), split="validation", progress=False)
    assert report["output"] == str(student / "eval-validation") and (student / "eval-validation" / METRICS).exists()
    assert "teacher_agreement" not in report["models"][0]


def test_input_errors_are_one_clear_line(tmp_path, tiny_dataset, tiny_teacher, tiny_cache):
    other_names = save_vit_teacher(tmp_path / "other-names", id2label={0: "cat", 1: "dog", 2: "healthy"})
    no_processor = save_mobilenet_student(tmp_path / "no-processor")
    other_data = tmp_path / "other-data"
    make_dataset_dict(seed=7).save_to_disk(str(other_data))  # same splits and sizes, other images
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep me")
    empty_test = make_dataset_dict({"train": 3, "test": 3})
    empty_test["test"] = empty_test["test"].select([])
    empty_test.save_to_disk(str(tmp_path / "empty-test"))
    cases = [
        (
            dict(dataset=str(tmp_path / "empty-test")),
            f"^split 'test' of dataset '{tmp_path / 'empty-test'}' is empty; evaluate on another --split$",
        ),
        (
            dict(models=[str(tiny_teacher), str(other_names)]),
            "labels .*cat, dog, healthy.* do not match the dataset's.*no match for angular_leaf_spot, bean_rust",
        ),
        (dict(split="nope"), "split 'nope' is not in dataset .*pass one of them with --split"),
        (dict(cache=str(tiny_cache), dataset=str(other_data)), "cache .* was made from other data than split 'test'"),
        (dict(cache=str(tiny_cache), split="nope"), "cache .* has no split 'nope'"),
        (dict(models=[str(no_processor)]), "no preprocessor_config.json"),
        (dict(models=["no-such-org/no-such-model"]), "could not load the model 'no-such-org/no-such-model'"),
        (dict(output=precious), "not a kdcache evaluation"),
        (dict(batch_size=0), "^--batch-size 0 must be at least 1$"),
    ]
    for overrides, message in cases:
        arguments = dict(
            models=[str(tiny_teacher)], dataset=str(tiny_dataset), output=tmp_path / "out", progress=False
        )
        arguments.update(overrides)
        with pytest.raises(KdcacheError, match=message) as error:
            evaluate_models(**arguments)
        assert "\n" not in str(error.value)
        assert not (tmp_path / "out").exists()
    assert (precious / "notes.txt").read_text() == "keep me"


def test_cli(tmp_path, tiny_dataset, tiny_teacher):
    from typer.testing import CliRunner

    from kdcache.cli import app

    runner = CliRunner()
    result = runner.invoke(
        app,
        [
            "evaluate",
            str(tiny_teacher),
            "--dataset",
            str(tiny_dataset),
            "--split",
            "validation",
            "--batch-size",
            "4",
            "--output",
            str(tmp_path / "eval"),
        ],
    )
    assert result.exit_code == 0, result.output
    assert "accuracy" in result.stdout and "macro-F1" in result.stdout and "img/s" in result.stdout
    assert (tmp_path / "eval" / METRICS).exists()
    result = runner.invoke(app, ["evaluate", str(tiny_teacher), "--dataset", str(tiny_dataset), "--split", "nope"])
    assert result.exit_code == 1
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("kdcache: error: split 'nope'")


def test_agreement_with_each_teacher_and_with_the_ensemble(tmp_path, tiny_dataset, tiny_teacher, tiny_cache):
    from typer.testing import CliRunner

    from kdcache.cli import app
    from kdcache.teacher.run import teacher_logits

    second_teacher = save_vit_teacher(tmp_path / "second-teacher", seed=1)  # another tiny teacher, other weights
    second = teacher_logits(
        str(tiny_dataset), str(second_teacher), output=tmp_path / "second", splits=["test"], progress=False
    )
    student = save_student(tmp_path / "student", tiny_teacher)
    models = [str(student), str(tiny_teacher)]
    report = evaluate_models(
        models, cache=[tiny_cache, second], teacher_weights=[1, 3], output=tmp_path / "eval", progress=False
    )
    references = np.asarray(datasets.load_from_disk(str(tiny_dataset))["test"]["labels"][:])
    cached = [
        datasets.load_from_disk(str(cache))["test"].with_format("numpy")[:]["teacher_logits"].astype(np.float64)
        for cache in (tiny_cache, second)
    ]
    averaged = 0.25 * softmax(cached[0], -1) + 0.75 * softmax(cached[1], -1)  # by hand, at T=1
    assert not np.allclose(cached[0], cached[1], atol=0.1), "two different teachers"
    for result, model in zip(report["models"], models):
        logits = plain_logits(model, tiny_dataset).astype(np.float64)
        for each, teacher, cache in zip(result["teacher_agreements"], cached, (tiny_cache, second)):
            assert each["cache"] == str(cache)
            for key, value in teacher_agreement(logits, teacher, references).items():
                assert each[key] == pytest.approx(value, abs=1e-6)
        ensemble = result["teacher_agreement"]
        assert ensemble["cache"] == [str(tiny_cache), str(second)] and ensemble["teacher_weights"] == [0.25, 0.75]
        assert ensemble["top1_agreement"] == pytest.approx((logits.argmax(1) == averaged.argmax(1)).mean())
        assert ensemble["teacher_accuracy"] == pytest.approx((averaged.argmax(1) == references).mean())
        kl = rel_entr(averaged, softmax(logits, -1)).sum(-1).mean()
        assert ensemble["kl_teacher_student"] == pytest.approx(kl, abs=1e-6)
    table = describe(report)
    assert all(f"{name}: {label}" in table for name in ("student", "teacher") for label in ("teacher 1", "teacher 2"))
    assert "teacher: ensemble    top-1 agreement" in table and "weights 0.25, 0.75" in table
    one = evaluate_models(str(student), cache=[tiny_cache, second], output=tmp_path / "one", progress=False)
    assert one["models"][0]["teacher_agreement"]["teacher_weights"] == [0.5, 0.5]
    assert "  ensemble    top-1 agreement" in describe(one) and "  teacher 2   top-1 agreement" in describe(one)
    with pytest.raises(KdcacheError, match=f"cache '{second}' has no split 'validation'.*every cache has"):
        evaluate_models(str(student), cache=[tiny_cache, second], split="validation", progress=False)
    with pytest.raises(KdcacheError, match="--teacher-weights 1 gives 1 weights for 2 caches"):
        evaluate_models(str(student), cache=[tiny_cache, second], teacher_weights=[1], progress=False)
    command = [
        "evaluate",
        str(student),
        "--cache",
        str(tiny_cache),
        "--cache",
        str(second),
        "--teacher-weights",
        "1,3",
    ]
    result = CliRunner().invoke(app, command + ["--output", str(tmp_path / "cli")])
    assert result.exit_code == 0, result.output
    assert "ensemble" in result.stdout and "weights 0.25, 0.75" in result.stdout


def test_a_compact_cache_gives_the_teachers_agreement_from_its_rebuilt_logits(tmp_path, tiny_teacher, compact_cache):
    report = evaluate_models(
        [str(tiny_teacher)], cache=str(compact_cache), split="test", output=tmp_path / "eval", progress=False
    )
    agreement = report["models"][0]["teacher_agreement"]
    # the top-1 class is stored exactly; the other two share the rest of the mass, so the KL is small but not 0
    assert agreement["top1_agreement"] == 1.0 and 0 < agreement["kl_teacher_student"] < 0.1


# An evaluation in another process, stopped before its first model runs (holding the output's lock) until the file
# named by its last argument appears.
PAUSED_EVALUATION = """
import sys, time
from pathlib import Path
from kdcache.evaluation import evaluate as evaluation
model, dataset, output, go = sys.argv[1:5]
real_predict = evaluation.predict
def wait_then_predict(*args, **kwargs):
    print("paused", flush=True)
    while not Path(go).exists():
        time.sleep(0.05)
    return real_predict(*args, **kwargs)
evaluation.predict = wait_then_predict
evaluation.evaluate_models([model], dataset=dataset, split="validation", output=output, progress=False)
print("done", flush=True)
"""


def test_two_evaluations_of_one_output_one_is_refused_in_one_line_before_reading_anything(
    tmp_path, tiny_dataset, tiny_teacher, monkeypatch
):
    import os
    import subprocess
    import sys
    from pathlib import Path

    from typer.testing import CliRunner

    from kdcache.cli import app
    from kdcache.evaluation import evaluate as evaluation

    reports = tmp_path / "reports"
    reports.mkdir()
    (reports / "notes.txt").write_text("mine")
    output = reports / "eval"
    repo = Path(__file__).resolve().parents[2]
    environment = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(repo), os.environ.get("PYTHONPATH")])))
    first = subprocess.Popen(
        [sys.executable, "-c", PAUSED_EVALUATION, str(tiny_teacher), str(tiny_dataset), str(output), tmp_path / "go"],
        env=environment,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        line = first.stdout.readline().strip()
        assert line == "paused", first.stderr.read()[-2000:]
        read = []
        monkeypatch.setattr(evaluation, "_evaluation_rows", lambda *args: read.append(args))
        second = CliRunner().invoke(
            app, ["evaluate", str(tiny_teacher), "--dataset", str(tiny_dataset), "--output", str(output)]
        )
        assert second.exit_code == 1 and not read, "refused before the dataset or the cache is read"
        assert second.stderr.count("\n") == 1 and second.stderr.startswith(
            f"kdcache: error: --output '{output}' is being written by another kdcache run (pid {first.pid} on "
        ), second.stderr
        (tmp_path / "go").touch()
        out, err = first.communicate(timeout=300)
    finally:
        first.kill()
    assert first.returncode == 0 and out.strip() == "done", err[-2000:]
    assert sorted(path.name for path in reports.iterdir()) == ["eval", "notes.txt"], "no lock, no work folder"
    assert json.loads((output / METRICS).read_text())["split"] == "validation"


def test_evaluate_checks_free_space_and_leaves_nothing_when_refused(tmp_path, tiny_dataset, tiny_teacher, monkeypatch):
    from kdcache import outputs
    from kdcache.evaluation import evaluate as evaluation

    reports = tmp_path / "reports"
    reports.mkdir()
    (reports / "notes.txt").write_text("mine")
    arguments = dict(dataset=str(tiny_dataset), split="validation", progress=False)
    ran = []
    real_predict = evaluation.predict
    monkeypatch.setattr(
        evaluation, "predict", lambda *args, **kwargs: (ran.append(1), real_predict(*args, **kwargs))[1]
    )
    monkeypatch.setattr(outputs, "free_bytes", lambda folder: 1_000_000)
    with pytest.raises(KdcacheError) as refused:
        evaluate_models([str(tiny_teacher)], output=reports / "eval", **arguments)
    assert str(refused.value) == (
        f"--output '{reports / 'eval'}' needs about 2.1 MB free for the evaluation report, but its file system has "
        "1.0 MB free; free some space or choose another --output"
    )
    assert not ran and sorted(path.name for path in reports.iterdir()) == ["notes.txt"]
    monkeypatch.undo()
    # refused by a bad input once the output is locked: the folders made for the output go too
    with pytest.raises(KdcacheError, match="split 'nope'"):
        evaluate_models(
            [str(tiny_teacher)], output=reports / "new" / "deeper" / "eval", **{**arguments, "split": "nope"}
        )
    assert sorted(path.name for path in reports.iterdir()) == ["notes.txt"]
    evaluate_models([str(tiny_teacher)], output=reports / "eval", **arguments)
    assert sorted(path.name for path in reports.iterdir()) == ["eval", "notes.txt"]
    assert evaluation.report_bytes(1, 3) == 2 * 1024**2 + 16 * 3 * 11


def test_report_estimate_covers_what_an_evaluation_writes(tmp_path, tiny_dataset, tiny_teacher):
    from kdcache.evaluation.evaluate import report_bytes
    from kdcache.outputs import bytes_under

    student = save_student(tmp_path / "student", tiny_teacher)
    for models in ([str(tiny_teacher)], [str(tiny_teacher), str(student)]):
        output = tmp_path / f"eval-{len(models)}"
        evaluate_models(models, dataset=str(tiny_dataset), output=output, progress=False)
        assert bytes_under(output) <= report_bytes(len(models), len(LABELS))
