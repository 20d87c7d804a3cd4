"""What a cache costs to travel: push and pull of a cache to a real S3 API (moto's server on localhost), and what a
resumed pull saves. Writes benchmarks/results/travel.json.

    python benchmarks/travel.py --cache data/budget/caches/k1

Steps: push the cache to a new bucket (MB/s); pull it into an empty folder (MB/s, and the share of the pull's time
spent checking every chunk's sha256); pull again into a new folder in a process of its own, killed with SIGKILL once
about half the bytes have arrived, then rerun the pull there: the bytes the rerun fetched against a whole pull.
Localhost has no network latency: the figures are kdcache's and moto's own costs, an upper bound on speed.
"""

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def folder_bytes(folder: Path) -> int:
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache", required=True, help="a complete kdcache cache folder")
    parser.add_argument("--root", default="data/travel", help="folder for the pulled copies")
    parser.add_argument("--json", default=str(RESULTS / "travel.json"), help="where the figures go")
    args = parser.parse_args()

    import boto3
    from moto import server as moto_server

    from kdcache.format.remote import pull_cache, push_cache

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    os.environ.update(
        AWS_ACCESS_KEY_ID="testing",
        AWS_SECRET_ACCESS_KEY="testing",
        AWS_DEFAULT_REGION="us-east-1",
        AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}",
        AWS_EC2_METADATA_DISABLED="true",
    )
    boto3.client("s3").create_bucket(Bucket="travel")
    address, root = "s3://travel/cache", Path(args.root)
    subprocess.run(["rm", "-rf", str(root)], check=True)
    root.mkdir(parents=True)
    size = folder_bytes(Path(args.cache))

    pushed = push_cache(args.cache, address, progress=False)
    pulled = pull_cache(address, root / "whole", progress=False)

    # a pull killed halfway, in a process of its own, then rerun where it stopped
    killed = root / "resumed"
    code = f"from kdcache.format.remote import pull_cache; pull_cache({address!r}, {str(killed)!r}, progress=False)"
    process = subprocess.Popen([sys.executable, "-c", code], env=dict(os.environ))
    while process.poll() is None and (not killed.exists() or folder_bytes(killed) < size / 2):
        time.sleep(0.05)
    arrived = folder_bytes(killed) if killed.exists() else 0
    process.send_signal(signal.SIGKILL)
    process.wait()
    resumed = pull_cache(address, killed, progress=False)
    server.stop()

    megabytes = size / 1e6
    figures = {
        "cache": Path(args.cache).name,
        "cache_megabytes": round(megabytes, 1),
        "files_pushed": pushed["uploaded_files"],
        "push_megabytes": round(pushed["uploaded_bytes"] / 1e6, 3),
        "push_seconds": round(pushed["seconds"], 2),
        "push_megabytes_per_second": round(pushed["uploaded_bytes"] / 1e6 / pushed["seconds"], 3),
        "pull_seconds": round(pulled["seconds"], 2),
        "pull_megabytes_per_second": round(pulled["fetched_bytes"] / 1e6 / pulled["seconds"], 3),
        "pull_verify_share": round(pulled["verify_seconds"] / pulled["seconds"], 3),
        "killed_pull_megabytes_on_disk": round(arrived / 1e6, 1),
        "killed_pull_finished_before_kill": process.returncode == 0,
        "resumed_pull_megabytes_fetched": round(resumed["fetched_bytes"] / 1e6, 1),
        "resumed_pull_share_of_whole": round(resumed["fetched_bytes"] / max(1, pulled["fetched_bytes"]), 3),
        "resumed_pull_kept_files": resumed["kept_files"],
        "machine": f"{os.cpu_count()} CPUs, localhost S3 (moto server)",
        "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(figures, indent=2) + "\n")
    print(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
