"""kdcache evaluate of exported models (kdcache.onnx_runtime, kdcache.speed): a PyTorch student and its exports in
one table, the same report for each, their size and their speed measured the same way."""

import pytest
from typer.testing import CliRunner

from kdcache.cli import app
from kdcache.evaluation.evaluate import evaluate_models
from kdcache.onnx_runtime import FP32_MODEL, INT8_MODEL
from kdcache.speed import LATENCY_RUNS

pytest.importorskip("onnxruntime", reason="the export extra is not installed: pip install -e '.[export]'")


def test_a_student_and_its_exports_in_one_table(tmp_path, student, tiny_cache):
    from kdcache.export.run import export

    export(student, tmp_path / "int8", int8="static", calibration=tiny_cache, progress=False)
    models = [str(student), str(tmp_path / "int8"), str(tmp_path / "int8" / FP32_MODEL)]
    report = evaluate_models(
        models, cache=tiny_cache, split="test", speed=True, output=tmp_path / "eval", progress=False
    )
    pytorch, int8, fp32 = report["models"]
    assert [result["name"] for result in report["models"]] == ["student", "int8", "int8-model"]
    assert pytorch["model_class"] == "MobileNetV2ForImageClassification"
    assert int8["model_class"] == "ONNX int8 static" and fp32["model_class"] == "ONNX fp32"
    # the fp32 export gives the student's predictions on the rows evaluated (the export's check guarantees its top-1)
    for key in ("accuracy", "macro_f1", "confusion_matrix"):
        assert fp32[key] == pytorch[key]
    assert fp32["teacher_agreement"]["top1_agreement"] == pytorch["teacher_agreement"]["top1_agreement"]
    assert 0 <= int8["accuracy"] <= 1 and 0 <= int8["teacher_agreement"]["top1_agreement"] <= 1
    assert int8["weights_bytes"] == (tmp_path / "int8" / INT8_MODEL).stat().st_size < fp32["weights_bytes"]
    assert abs(fp32["parameters"] - pytorch["parameters"]) < 0.05 * pytorch["parameters"]
    for result in report["models"]:
        latency = result["latency"]
        assert (
            latency["threads"] == 1 and latency["throughput_batch"] == 32 and str(LATENCY_RUNS) in latency["measured"]
        )
        assert 0 < latency["batch_1_latency_ms_median"] <= latency["batch_1_latency_ms_p90"]
        assert latency["throughput_images_per_second"] > 0


def test_the_command_shows_speed_columns_only_with_speed(tmp_path, student, exported, tiny_cache):
    arguments = ["evaluate", str(student), str(exported), "--cache", str(tiny_cache), "--split", "test"]
    plain = CliRunner().invoke(app, [*arguments, "--output", str(tmp_path / "plain")])
    assert plain.exit_code == 0, plain.output
    assert "ms b1" not in plain.output and "latency" not in (tmp_path / "plain" / "metrics.json").read_text()
    timed = CliRunner().invoke(app, [*arguments, "--speed", "--speed-threads", "2", "--output", str(tmp_path / "t")])
    assert timed.exit_code == 0, timed.output
    assert "ms b1" in timed.output and "img/s b32" in timed.output and "on the CPU, 2 threads" in timed.output


def test_without_onnx_runtime_an_export_is_refused_in_one_line(tmp_path, monkeypatch, exported, tiny_cache):
    import sys

    from kdcache import KdcacheError

    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # `import onnxruntime` now raises ImportError
    with pytest.raises(KdcacheError, match=r"needs ONNX Runtime, an optional extra; install it with pip install "):
        evaluate_models([str(exported)], cache=tiny_cache, output=tmp_path / "eval", progress=False)
    assert not (tmp_path / "eval").exists()
