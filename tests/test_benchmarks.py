"""benchmarks/gpu.py runs on GPU machines only; here, that it refuses cleanly without one."""

import os
import subprocess
import sys
from pathlib import Path

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
