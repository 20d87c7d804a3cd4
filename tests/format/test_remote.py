"""kdcache.format.remote over fsspec: push and pull against a real S3 API (moto's server, on a free localhost port),
verified, resumable, and trained from by address; every bad input refused in one line."""

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import cache_files
from typer.testing import CliRunner

from kdcache import KdcacheError
from kdcache.format.manifest import MANIFEST
from kdcache.format.reader import describe
from kdcache.format.remote import PULL_MARKER, PUSH_MARKER, local_cache, public_manifest, pull_cache, push_cache
from kdcache.format.stores import FsspecStore, Unreachable

CACHE_FILES = 11  # the tiny cache: 3 chunks, 3 x (state.json, dataset_info.json), dataset_dict.json, the processor
CHUNKS = ("train/chunk-000000.arrow", "validation/chunk-000000.arrow", "test/chunk-000000.arrow")


@pytest.fixture(scope="session")
def s3_endpoint():
    """moto's S3 server in this process, on a free port of localhost: the real S3 API over HTTP. Without moto or
    s3fs the tests skip, saying why, except in CI (CI set), where they must run (make install brings both)."""
    try:
        import s3fs  # noqa: F401
        from moto import server as moto_server
    except ImportError as error:
        reason = f"{error.name} is not installed: pip install -e '.[test,remote]'"
        if os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no"):
            pytest.fail(f"{reason} (CI is set: the remote tests must run there, not skip)")
        pytest.skip(reason)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


@pytest.fixture
def bucket(s3_endpoint, monkeypatch, tmp_path, request):
    """A new bucket on the S3 server, credentials and endpoint in the environment (as AWS users keep them), and the
    cache folder in tmp_path; returns the bucket's s3:// URL."""
    import boto3

    for name, value in {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": s3_endpoint,
        "AWS_EC2_METADATA_DISABLED": "true",  # no instance metadata to ask for credentials: there is no network
        "KDCACHE_CACHE_DIR": str(tmp_path / "kdcache-cache"),
    }.items():
        monkeypatch.setenv(name, value)
    name = "kdcache-" + "".join(ch for ch in request.node.name.lower() if ch.isalnum())[:40]
    boto3.client("s3").create_bucket(Bucket=name)
    return f"s3://{name}"


def watch_transfers(monkeypatch, fail_after: int | None = None) -> list[str]:
    """The objects every FsspecStore moves (fetches and uploads of files, not the small JSON it writes from memory),
    by their name under the address, in order; with `fail_after` N, the network fails (a connection reset inside
    fsspec) once N have moved."""
    moved = []
    original = FsspecStore.__init__

    def init(self, *args, **kwargs):
        original(self, *args, **kwargs)
        for method in ("get_file", "put_file"):
            real = getattr(self.fs, method)

            def counted(source, target, *rest, _real=real, _remote=0 if method == "get_file" else 1, **options):
                if fail_after is not None and len(moved) >= fail_after:
                    raise ConnectionResetError("Connection reset by peer")
                moved.append(str((source, target)[_remote]).removeprefix(self.root + "/"))
                return _real(source, target, *rest, **options)

            setattr(self.fs, method, counted)

    monkeypatch.setattr(FsspecStore, "__init__", init)
    return moved


def test_push_then_pull_round_trips_bit_identical_and_records_its_source(tmp_path, tiny_cache, bucket):
    address = f"{bucket}/caches/tiny"
    report = push_cache(tiny_cache, address, progress=False)
    assert (report["uploaded_files"], report["kept_files"]) == (CACHE_FILES, 0)
    pulled = pull_cache(address, tmp_path / "pulled", progress=False)
    assert pulled["fetched_files"] == CACHE_FILES + 1  # and the dataset card
    copy = tmp_path / "pulled"
    assert cache_files(copy) == cache_files(tiny_cache)
    original, manifest = (json.loads((folder / MANIFEST).read_text()) for folder in (tiny_cache, copy))
    source = manifest.pop("source")
    assert manifest == public_manifest(original)  # the local teacher and dataset named by folder name alone
    assert manifest["teacher"]["name_or_path"] == Path(original["teacher"]["name_or_path"]).name
    assert source["address"] == address and source["etag"] and len(source["manifest_sha256"]) == 64
    assert f"pulled from     {address} (ETag {source['etag']})" in describe(copy)
    assert not (copy / PULL_MARKER).exists() and not list(copy.rglob("*.part"))
    # the same push and the same pull again: nothing moves
    assert push_cache(tiny_cache, address, progress=False)["uploaded_files"] == 0
    again = pull_cache(address, copy, progress=False)
    assert (again["fetched_files"], again["fetched_bytes"]) == (0, 0)


@pytest.mark.slow
def test_train_student_from_an_s3_address_pulls_once_and_reuses_the_copy(
    tmp_path, tiny_cache, bucket, s3_endpoint, monkeypatch
):
    from helpers import FAST

    from kdcache.cli import app
    from kdcache.student.train import train_student

    address = f"{bucket}/caches/tiny"
    push_cache(tiny_cache, address, progress=False)
    moved = watch_transfers(monkeypatch)
    summary = train_student(address, output=tmp_path / "student", max_steps=2, eval_split=None, **FAST)
    assert Path(summary["output"]) == tmp_path / "student" and (tmp_path / "student" / "model.safetensors").exists()
    assert moved[:3] == list(CHUNKS) and len(moved) == CACHE_FILES + 1
    copy = Path(os.environ["KDCACHE_CACHE_DIR"]) / f"s3--{bucket[5:]}--caches--tiny"
    assert json.loads((copy / MANIFEST).read_text())["source"]["address"] == address
    # the command line, the endpoint in --storage-options and another cache folder: pulled there once, then reused
    monkeypatch.delenv("AWS_ENDPOINT_URL")
    moved.clear()
    endpoint = json.dumps({"endpoint_url": s3_endpoint})
    command = ["train-student", address, "--epochs", "1", "--eval-split", "none", "--batch-size", "8"]
    command += ["--cache-dir", str(tmp_path / "elsewhere"), "--storage-options", endpoint]
    result = CliRunner().invoke(app, [*command, "--output", str(tmp_path / "cli")])
    assert result.exit_code == 0, result.output
    assert len(moved) == CACHE_FILES + 1 and (tmp_path / "elsewhere" / copy.name / MANIFEST).exists()
    moved.clear()
    result = CliRunner().invoke(app, [*command, "--output", str(tmp_path / "cli2")])
    assert result.exit_code == 0, result.output
    assert moved == []  # up to date: no second download


def test_evaluate_and_verify_take_an_address(tmp_path, tiny_cache, tiny_dataset, tiny_teacher, bucket, s3_endpoint):
    from kdcache.cli import app

    address = f"{bucket}/caches/tiny"
    push_cache(tiny_cache, address, progress=False)
    remote = ["--cache-dir", str(tmp_path / "copies"), "--storage-options", json.dumps({"endpoint_url": s3_endpoint})]
    evaluate = ["evaluate", str(tiny_teacher), "--dataset", str(tiny_dataset), "--cache", address, "--batch-size", "8"]
    result = CliRunner().invoke(app, [*evaluate, "--output", str(tmp_path / "eval"), *remote])
    assert result.exit_code == 0, result.output
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    copy = tmp_path / "copies" / f"s3--{bucket[5:]}--caches--tiny"
    assert metrics["teacher_agreement"]["cache"] == str(copy)
    assert (
        metrics["teacher_agreement"]["cache_fingerprint"]
        == json.loads((tiny_cache / MANIFEST).read_text())["fingerprint"]
    )
    result = CliRunner().invoke(app, ["verify", address, "--sample", "4", "--teacher", str(tiny_teacher), *remote])
    assert result.exit_code == 0 and "passed" in result.output, result.output


def test_a_new_revision_is_pulled_again_and_an_unreachable_address_uses_the_copy(
    tiny_cache, compact_cache, bucket, monkeypatch, caplog
):
    address = f"{bucket}/caches/shared"
    push_cache(tiny_cache, address, progress=False)
    copy = local_cache(address, progress=False)
    assert (
        json.loads((copy / MANIFEST).read_text())["fingerprint"]
        == json.loads((tiny_cache / MANIFEST).read_text())["fingerprint"]
    )
    push_cache(compact_cache, address, overwrite=True, progress=False)
    moved = watch_transfers(monkeypatch)
    assert local_cache(address, progress=False) == copy
    manifest = json.loads((copy / MANIFEST).read_text())
    assert manifest["fingerprint"] == json.loads((compact_cache / MANIFEST).read_text())["fingerprint"]
    assert len(moved) == CACHE_FILES + 1 and cache_files(copy) == cache_files(compact_cache)

    def unreachable(self, name):
        raise Unreachable(f"could not read '{name}' of '{self.address}' (ConnectTimeout)")

    monkeypatch.setattr(FsspecStore, "read", unreachable)
    assert local_cache(address, progress=False) == copy
    assert "using the copy of" in caplog.text
    with pytest.raises(Unreachable, match="ConnectTimeout"):
        local_cache(f"{bucket}/caches/never-pulled", progress=False)


def test_a_corrupted_object_is_fetched_again_once_then_refused_naming_it(tmp_path, tiny_cache, bucket, monkeypatch):
    import s3fs

    address = f"{bucket}/caches/tiny"
    push_cache(tiny_cache, address, progress=False)
    fs = s3fs.S3FileSystem()
    damaged = bytearray(fs.cat_file(f"{address}/train/chunk-000000.arrow"))
    damaged[1000] ^= 1
    # damaged in transit once: the second fetch is good, and the pull completes
    original = FsspecStore.fetch
    fetched = []

    def flaky(self, name, target, again=False):
        original(self, name, target, again)
        fetched.append(name)
        if fetched.count(name) == 1 and name == "train/chunk-000000.arrow":
            target.write_bytes(bytes(damaged))

    monkeypatch.setattr(FsspecStore, "fetch", flaky)
    pull_cache(address, tmp_path / "once", progress=False)
    assert fetched.count("train/chunk-000000.arrow") == 2
    assert cache_files(tmp_path / "once") == cache_files(tiny_cache)
    # damaged where it is kept: fetched twice, then refused in one line naming it; nothing is left as a cache
    monkeypatch.setattr(FsspecStore, "fetch", original)
    fs.pipe_file(f"{address}/train/chunk-000000.arrow", bytes(damaged))
    moved = watch_transfers(monkeypatch)
    with pytest.raises(KdcacheError) as refused:
        pull_cache(address, tmp_path / "twice", progress=False)
    message = str(refused.value)
    assert "object 'train/chunk-000000.arrow'" in message and "does not match its sha256" in message
    assert "\n" not in message
    assert moved.count("train/chunk-000000.arrow") == 2
    assert not (tmp_path / "twice" / MANIFEST).exists() and not list((tmp_path / "twice").rglob("*.part"))
    # missing: asked for twice, then refused naming it
    fs.pipe_file(f"{address}/train/chunk-000000.arrow", (tiny_cache / "train" / "chunk-000000.arrow").read_bytes())
    fs.rm_file(f"{address}/validation/chunk-000000.arrow")
    with pytest.raises(KdcacheError, match="object 'validation/chunk-000000.arrow' is missing"):
        pull_cache(address, tmp_path / "missing", progress=False)


def test_an_interrupted_pull_resumes_fetching_only_what_is_missing(tmp_path, tiny_cache, bucket, monkeypatch):
    address = f"{bucket}/caches/tiny"
    push_cache(tiny_cache, address, progress=False)
    with monkeypatch.context() as patch:
        moved = watch_transfers(patch, fail_after=2)
        with pytest.raises(Unreachable, match="ConnectionResetError") as failed:
            pull_cache(address, tmp_path / "copy", progress=False)
    assert "\n" not in str(failed.value) and "what was transferred is kept" in str(failed.value)
    assert moved == list(CHUNKS[:2])
    assert (tmp_path / "copy" / PULL_MARKER).exists() and not (tmp_path / "copy" / MANIFEST).exists()
    moved = watch_transfers(monkeypatch)
    report = pull_cache(address, tmp_path / "copy", progress=False)
    assert CHUNKS[0] not in moved and CHUNKS[1] not in moved and CHUNKS[2] in moved
    assert (report["fetched_files"], report["kept_files"]) == (CACHE_FILES - 1, 2)
    total = sum(len(data) for data in cache_files(tiny_cache).values())
    assert report["fetched_bytes"] < total
    assert cache_files(tmp_path / "copy") == cache_files(tiny_cache)


def test_an_interrupted_push_is_invisible_then_resumes_uploading_only_what_is_missing(
    tmp_path, tiny_cache, bucket, monkeypatch
):
    address = f"{bucket}/caches/tiny"
    with monkeypatch.context() as patch:
        moved = watch_transfers(patch, fail_after=4)
        with pytest.raises(Unreachable, match="ConnectionResetError"):
            push_cache(tiny_cache, address, progress=False)
    first = moved
    assert len(first) == 4
    with pytest.raises(KdcacheError, match="holds no kdcache cache"):  # never visible as complete before it is
        pull_cache(address, tmp_path / "early", progress=False)
    import s3fs

    assert s3fs.S3FileSystem().exists(f"{address}/{PUSH_MARKER}")
    moved = watch_transfers(monkeypatch)
    report = push_cache(tiny_cache, address, progress=False)
    assert (report["uploaded_files"], report["kept_files"]) == (CACHE_FILES - 4, 4)
    assert not set(moved) & set(first)
    pull_cache(address, tmp_path / "copy", progress=False)
    assert cache_files(tmp_path / "copy") == cache_files(tiny_cache)


@pytest.mark.slow
def test_a_push_and_a_pull_killed_with_sigkill_resume(tmp_path, tiny_cache, bucket, monkeypatch):
    """A real kill -9 in the middle: the process dies after N objects, with no chance to clean up."""
    address = f"{bucket}/caches/tiny"
    script = """
import os, sys
from kdcache.format import stores
from kdcache.format.remote import pull_cache, push_cache
count = 0
def killing(method):
    def wrapped(self, *args, **kwargs):
        global count
        if method == "fetch" or not isinstance(args[0][0][1], bytes):
            count += 1
            if count > 2:
                os.kill(os.getpid(), 9)
        return getattr(stores.FsspecStore, "_" + method)(self, *args, **kwargs)
    return wrapped
for method in ("fetch", "upload"):
    setattr(stores.FsspecStore, "_" + method, getattr(stores.FsspecStore, method))
    setattr(stores.FsspecStore, method, killing(method))
if sys.argv[1] == "push":
    push_cache(sys.argv[2], sys.argv[3], progress=False)
else:
    pull_cache(sys.argv[2], sys.argv[3], progress=False)
"""
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[2]), *sys.path])}
    run = lambda *arguments: subprocess.run([sys.executable, "-c", script, *arguments], env=environment, timeout=300)
    assert run("push", str(tiny_cache), address).returncode == -9
    moved = watch_transfers(monkeypatch)
    report = push_cache(tiny_cache, address, progress=False)
    assert (report["uploaded_files"], report["kept_files"]) == (CACHE_FILES - 2, 2)
    assert run("pull", address, str(tmp_path / "copy")).returncode == -9
    assert sorted(path.name for path in (tmp_path / "copy").rglob("*.arrow")) == ["chunk-000000.arrow"] * 2
    moved.clear()
    report = pull_cache(address, tmp_path / "copy", progress=False)
    assert moved[0] == CHUNKS[2] and report["kept_files"] == 2
    assert cache_files(tmp_path / "copy") == cache_files(tiny_cache)


def test_a_push_over_another_cache_is_refused_without_overwrite(tmp_path, tiny_cache, compact_cache, bucket):
    address = f"{bucket}/caches/shared"
    push_cache(tiny_cache, address, progress=False)
    with pytest.raises(KdcacheError, match="holds another cache .*; pass --overwrite to replace it"):
        push_cache(compact_cache, address, progress=False)
    pull_cache(address, tmp_path / "still", progress=False)  # untouched
    assert cache_files(tmp_path / "still") == cache_files(tiny_cache)
    push_cache(compact_cache, address, overwrite=True, progress=False)
    pull_cache(address, tmp_path / "replaced", progress=False)
    assert cache_files(tmp_path / "replaced") == cache_files(compact_cache)


def test_a_pull_into_a_folder_of_something_else_is_refused_and_leaves_it_alone(tmp_path, tiny_cache, bucket):
    address = f"{bucket}/caches/tiny"
    push_cache(tiny_cache, address, progress=False)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    with pytest.raises(KdcacheError, match="is not empty and holds no kdcache cache; choose a new or empty folder"):
        pull_cache(address, mine, progress=False)
    assert [path.name for path in mine.iterdir()] == ["notes.txt"]
    shutil.copytree(tiny_cache, tmp_path / "made-here")
    with pytest.raises(KdcacheError, match="holds another cache \\(not pulled from an address\\)"):
        pull_cache(address, tmp_path / "made-here", progress=False)
    assert cache_files(tmp_path / "made-here") == cache_files(tiny_cache)


def test_bad_addresses_are_refused_in_one_line_each(tmp_path, tiny_cache, bucket, monkeypatch):
    from kdcache.cli import app

    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "photo.jpg").write_bytes(b"jpeg")
    cases = {
        ("pull-cache", "s3://kdcache-no-such-bucket/cache"): "'s3://kdcache-no-such-bucket/cache' does not exist",
        ("push-cache", str(tiny_cache), "s3://kdcache-no-such-bucket/cache"): "does not exist",
        ("pull-cache", f"{bucket}/nothing-here"): "holds no kdcache cache",
        ("push-cache", str(tiny_cache), f"file://{tmp_path / 'other'}"): "holds files that are not a kdcache cache",
        ("pull-cache", str(tmp_path / "not-an-address")): "is not an address",
        ("pull-cache", "hf://models/someone/model"): "is not a Hub dataset address",
        ("pull-cache", f"{bucket}/x", "--storage-options", "[1]"): "--storage-options '[1]' is not a JSON object",
    }
    for arguments, expected in cases.items():
        result = CliRunner().invoke(app, list(arguments))
        assert result.exit_code == 1, (arguments, result.output)
        assert result.output.count("\n") == 1 and expected in result.output, (arguments, result.output)
    assert [path.name for path in (tmp_path / "other").iterdir()] == ["photo.jpg"]
    # no credentials anywhere (environment, profile files)
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    for arguments in (["pull-cache", f"{bucket}/x"], ["push-cache", str(tiny_cache), f"{bucket}/x"]):
        result = CliRunner().invoke(app, arguments)
        assert result.exit_code == 1 and result.output.count("\n") == 1, result.output
        assert "no credentials or no permission" in result.output


def test_push_and_pull_commands_report_what_moved(tmp_path, tiny_cache, bucket):
    from kdcache.cli import app

    address = f"{bucket}/caches/tiny"
    result = CliRunner().invoke(app, ["push-cache", str(tiny_cache), address])
    assert result.exit_code == 0 and f"to {address}: {CACHE_FILES} files uploaded" in result.output
    result = CliRunner().invoke(app, ["pull-cache", address, "--output", str(tmp_path / "copy")])
    assert result.exit_code == 0 and f"{CACHE_FILES + 1} files fetched" in result.output
    result = CliRunner().invoke(app, ["info", str(tmp_path / "copy")])
    assert f"pulled from     {address}" in result.output
    result = CliRunner().invoke(app, ["info", address, "--cache-dir", str(tmp_path / "c")])
    assert result.exit_code == 0 and f"pulled from     {address}" in result.output
