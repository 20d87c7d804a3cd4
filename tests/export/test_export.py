"""kdcache export (kdcache.export): the fp32 ONNX model gives the student's top-1 on every row, the int8 models run
(static calibrated on a cache's replayed views, dynamic), a quantization-aware student is quantized as it trained,
and every refusal is one line that leaves nothing behind and the student as it was."""

import hashlib
import json
import sys

import datasets
import numpy as np
import pytest
import torch
from transformers import AutoImageProcessor, AutoModelForImageClassification
from typer.testing import CliRunner

import kdcache
from kdcache.cli import app
from kdcache.export.run import ATOL, export
from kdcache.onnx_runtime import EXPORT_RECORD, FP32_MODEL, INT8_MODEL
from kdcache.outputs import lock_file

onnx = pytest.importorskip("onnx", reason="the export extra is not installed: pip install -e '.[export]'")
onnxruntime = pytest.importorskip("onnxruntime", reason="the export extra is not installed")


def images_and_pixels(folder, dataset, split="test"):
    """The split's images through the folder's own image processor, as pipeline() feeds a model."""
    processor = AutoImageProcessor.from_pretrained(str(folder), backend="pil")
    images = [image.convert("RGB") for image in datasets.load_from_disk(str(dataset))[split]["image"]]
    return processor(images, return_tensors="pt")["pixel_values"]


def onnx_logits(file, pixel_values):
    session = onnxruntime.InferenceSession(str(file), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: pixel_values.numpy()})[0]


def folder_digest(folder) -> dict:
    return {
        str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in folder.rglob("*")
        if path.is_file()
    }


def left_behind(output) -> list:
    """What a refused export leaves beside its output: nothing (no folder, no OUTPUT.partial, no lock)."""
    return [path for path in (output, output.with_name(output.name + ".partial"), lock_file(output)) if path.exists()]


def test_fp32_export_runs_in_onnx_runtime_with_the_students_top1_on_every_row(exported, student, tiny_dataset):
    assert {path.name for path in exported.iterdir()} == {
        FP32_MODEL,
        "config.json",
        "preprocessor_config.json",
        "README.md",
        EXPORT_RECORD,
    }
    for split in ("train", "test"):  # every row of two splits, through the export's own processor
        pixel_values = images_and_pixels(exported, tiny_dataset, split)
        with torch.no_grad():
            expected = AutoModelForImageClassification.from_pretrained(str(student))(pixel_values=pixel_values).logits
        got = onnx_logits(exported / FP32_MODEL, pixel_values)
        assert np.array_equal(got.argmax(1), expected.numpy().argmax(1)), split
        assert np.abs(got - expected.numpy()).max() <= ATOL
    assert onnx_logits(exported / FP32_MODEL, pixel_values[:1]).shape == (1, 3)  # the batch dimension is dynamic
    record = json.loads((exported / EXPORT_RECORD).read_text())
    check = record["check"]
    assert record["int8"] == "none" and record["model"] == FP32_MODEL and "int8" not in check
    assert check["rows"]["split"] == "validation" and check["rows"]["rows"] == 12 and check["rows"]["views"] == 1
    assert check["fp32"]["passed"] and check["fp32"]["top1_agreement_with_student"] == 1.0
    assert check["fp32"]["max_abs_logit_difference"] <= ATOL
    assert check["fp32"]["accuracy"] == check["pytorch"]["accuracy"]
    card = (exported / "README.md").read_text()
    assert "| ONNX fp32 | model.onnx |" in card and "12 of the 12 rows of split 'validation'" in card
    assert not left_behind(exported)[1:]


def test_static_int8_calibrated_on_a_caches_replayed_views_runs(tmp_path, student, view_cache, tiny_dataset):
    before = folder_digest(student)
    record = export(
        student, tmp_path / "int8", int8="static", calibration=view_cache, calibration_rows=10, progress=False
    )
    assert folder_digest(student) == before, "the student folder is only read"
    calibration = record["calibration"]
    assert calibration["split"] == "train" and calibration["rows"] == 10 and calibration["views"] == 3
    assert record["check"]["rows"]["cache"] == str(view_cache), "the calibration cache is the check's by default"
    model = onnx.load(str(tmp_path / "int8" / INT8_MODEL))
    quantizers = [node for node in model.graph.node if node.op_type == "DequantizeLinear"]
    initializers = {tensor.name: tensor for tensor in model.graph.initializer}
    per_channel = [node for node in quantizers if len(initializers.get(node.input[1], onnx.TensorProto()).dims) == 1]
    assert quantizers and per_channel, "QDQ, with weights quantized per channel"
    pixel_values = images_and_pixels(tmp_path / "int8", tiny_dataset)
    assert onnx_logits(tmp_path / "int8" / INT8_MODEL, pixel_values).shape == (12, 3)
    int8 = record["check"]["int8"]
    assert 0 <= int8["top1_agreement_with_student"] <= 1 and 0 <= int8["top1_agreement_with_teacher"] <= 1
    assert record["models"]["int8"]["bytes"] < record["models"]["fp32"]["bytes"]


def test_dynamic_int8_runs(tmp_path, student, tiny_cache, tiny_dataset):
    record = export(student, tmp_path / "dynamic", int8="dynamic", check_cache=tiny_cache, progress=False)
    assert record["int8"] == "dynamic" and record["calibration"] is None and record["model"] == INT8_MODEL
    model = onnx.load(str(tmp_path / "dynamic" / INT8_MODEL))
    assert {"ConvInteger", "DynamicQuantizeLinear"} <= {node.op_type for node in model.graph.node}
    pixel_values = images_and_pixels(tmp_path / "dynamic", tiny_dataset)
    assert onnx_logits(tmp_path / "dynamic" / INT8_MODEL, pixel_values).shape == (12, 3)


@pytest.mark.parametrize("entry", [{"weights": "int8 per channel", "activations": "int8 per tensor"}, True])
def test_a_quantization_aware_student_is_quantized_static_on_the_cache_it_trained_on(
    tmp_path, recorded_student, tiny_cache, entry
):
    qat = recorded_student("qat", quantization_aware=entry)
    record = kdcache.export(qat, tmp_path / "out", calibration_rows=8, progress=False)
    assert record["int8"] == "static" and "quantization-aware" in record["int8_chosen_by"]
    assert record["calibration"]["cache"] == str(tiny_cache) and record["check"]["rows"]["cache"] == str(tiny_cache)
    assert record["quantization_aware"] == (entry if isinstance(entry, dict) else {"entry": entry})
    assert "trained quantization-aware" in (tmp_path / "out" / "README.md").read_text()
    ordinary = recorded_student("ordinary")  # the same record, without the entry
    assert kdcache.export(ordinary, tmp_path / "out2", progress=False)["int8"] == "none"


def cli(*arguments):
    return CliRunner().invoke(app, ["export", *map(str, arguments)])


def refused(result) -> str:
    """The one line of a refusal (on stderr; the progress lines before it are on stdout)."""
    assert result.exit_code == 1, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("kdcache: error: "), result.output
    return lines[0]


def test_the_command_prints_the_check_table(tmp_path, student, tiny_cache):
    result = cli(student, "--output", tmp_path / "out", "--int8", "dynamic", "--check-cache", tiny_cache)
    assert result.exit_code == 0, result.output
    assert "ONNX fp32" in result.output and "ONNX int8 dynamic" in result.output and "agree teacher" in result.output


def test_bad_inputs_are_refused_in_one_line_leaving_nothing(tmp_path, student, tiny_teacher, view_cache):
    from transformers import BertConfig

    empty, text_model, output = tmp_path / "empty", tmp_path / "bert", tmp_path / "out"
    empty.mkdir()
    BertConfig(
        vocab_size=50, hidden_size=8, num_hidden_layers=1, num_attention_heads=1, intermediate_size=8
    ).save_pretrained(str(text_model))
    AutoImageProcessor.from_pretrained(str(tiny_teacher), backend="pil").save_pretrained(str(text_model))
    before = folder_digest(student)
    cases = {
        "is not a model folder (it has no config.json)": (empty, "--output", output),
        "is no image classifier that transformers loads": (text_model, "--output", output),
        "--int8 'int4' is not one of none, dynamic, static": (student, "--output", output, "--int8", "int4"),
        "--int8 static calibrates on images of the student's data: pass --calibration CACHE": (
            *(student, "--output", output, "--int8", "static"),
        ),
        "is inside the student's folder": (student, "--output", student / "onnx"),
        "--check-split 'nope' is not a split of cache": (
            *(student, "--output", output, "--check-cache", view_cache, "--check-split", "nope"),
        ),
        "--check-split 'train' of cache": (
            student,
            "--output",
            output,
            "--check-cache",
            view_cache,
            "--check-split",
            "train",
        ),
    }
    for expected, arguments in cases.items():
        assert expected in refused(cli(*arguments))
        assert not left_behind(output) and not left_behind(student / "onnx"), expected
    assert folder_digest(student) == before


def test_a_cache_of_other_labels_is_refused(tmp_path, recorded_student, tiny_cache):
    from transformers import AutoConfig

    other = recorded_student("other")
    config = AutoConfig.from_pretrained(str(other))
    config.id2label, config.label2id = {0: "cat", 1: "dog", 2: "bird"}, {"cat": 0, "dog": 1, "bird": 2}
    config.save_pretrained(str(other))
    output = tmp_path / "out"
    line = refused(cli(other, "--output", output, "--int8", "static", "--calibration", tiny_cache))
    assert "has labels angular_leaf_spot, bean_rust, healthy and student" in line and "cat, dog, bird" in line
    assert not left_behind(output)


def test_an_existing_output_is_kept_unless_overwrite(tmp_path, exported, student, tiny_cache):
    import shutil

    output = tmp_path / "out"
    shutil.copytree(exported, output)
    before = folder_digest(output)
    assert "exists; pass --overwrite" in refused(cli(student, "--output", output, "--check-cache", tiny_cache))
    assert folder_digest(output) == before and not left_behind(output)[1:]
    result = cli(student, "--output", output, "--check-cache", tiny_cache, "--int8", "dynamic", "--overwrite")
    assert result.exit_code == 0, result.output
    assert (output / INT8_MODEL).exists()


def test_a_student_the_exporter_cannot_write_is_refused(tmp_path, monkeypatch, student, tiny_cache):
    def unsupported(*args, **kwargs):
        raise torch.onnx.errors.UnsupportedOperatorError("aten::made_up_op", 18, 19)

    monkeypatch.setattr(torch.onnx, "export", unsupported)
    before = folder_digest(student)
    line = refused(cli(student, "--output", tmp_path / "out", "--check-cache", tiny_cache))
    assert "cannot be exported to ONNX by torch.onnx.export (dynamo=True): UnsupportedOperatorError" in line
    assert not left_behind(tmp_path / "out") and folder_digest(student) == before


def test_an_onnx_model_that_computes_otherwise_is_refused(tmp_path, monkeypatch, student, tiny_cache):
    from kdcache.export import run
    from kdcache.onnx_runtime import OnnxClassifier

    class Off(OnnxClassifier):
        def logits(self, pixel_values):
            return super().logits(pixel_values) + 10 * ATOL

    monkeypatch.setattr(run, "OnnxClassifier", Off)
    line = refused(cli(student, "--output", tmp_path / "out", "--check-cache", tiny_cache))
    assert "does not compute what the student does" in line and "nothing was written" in line
    assert not left_behind(tmp_path / "out")


def test_without_the_extra_the_command_says_how_to_install_it(tmp_path, monkeypatch, student):
    monkeypatch.setitem(sys.modules, "onnxscript", None)  # `import onnxscript` now raises ImportError
    line = refused(cli(student, "--output", tmp_path / "out"))
    assert line == (
        "kdcache: error: kdcache export needs onnx, onnxruntime and onnxscript (missing: onnxscript), an optional "
        "extra; install it with pip install 'kdcache[export]' (in a checkout: pip install -e '.[export]')"
    )
