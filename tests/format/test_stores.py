"""kdcache.format.stores and the Hub side of kdcache.format.remote: addresses, and push and pull against a Hub whose
HfApi calls are faked in memory (no network), as the Hub would take them: commits under its limits, the manifest in
the last, reads pinned to one commit, a resumed push committing only what is missing."""

import hashlib
import json
from pathlib import Path
from types import SimpleNamespace

import httpx2
import huggingface_hub
import pytest
from helpers import cache_files
from huggingface_hub import errors
from huggingface_hub.hf_api import RepoFile

from kdcache import KdcacheError
from kdcache.format.manifest import MANIFEST
from kdcache.format.remote import PUSH_MARKER, local_cache, pull_cache, push_cache
from kdcache.format.stores import HUB_FILES_PER_COMMIT, Address, HubStore, parse_address

CACHE_FILES = 11  # the tiny cache's files besides its manifest


def http_error(kind, status: int, message: str):
    return kind(message, response=httpx2.Response(status, request=httpx2.Request("GET", "https://huggingface.co")))


class FakeHub:
    """The Hub's repositories in memory, each a list of commits (sha, message, operations, files after it), behind
    the HfApi methods kdcache calls; a commit of 100 operations or more is refused, as the Hub refuses it."""

    def __init__(self):
        self.repos: dict[str, list[dict]] = {}
        self.downloads: list[str] = []
        self.fail_commit: int | None = None  # the number of the commit that fails (a dropped connection)

    def api(self, *args, **kwargs):
        return self  # HfApi(): every instance is this Hub

    def create_repo(self, repo_id, *, repo_type=None, exist_ok=False, private=None):
        assert repo_type == "dataset"
        if repo_id not in self.repos:
            attributes = {".gitattributes": b"*.arrow filter=lfs diff=lfs merge=lfs -text\n"}
            self.repos[repo_id] = [{"sha": "0" * 40, "message": "initial commit", "paths": [], "files": attributes}]
        return SimpleNamespace(repo_id=repo_id)

    def _commit(self, repo_id, revision):
        if repo_id not in self.repos:
            raise http_error(errors.RepositoryNotFoundError, 404, f"{repo_id} not found")
        for commit in reversed(self.repos[repo_id]):
            if revision in (None, "main", commit["sha"]):
                return commit
        raise http_error(errors.RevisionNotFoundError, 404, f"{revision} not found")

    def dataset_info(self, repo_id, *, revision=None, **unused):
        return SimpleNamespace(sha=self._commit(repo_id, revision)["sha"])

    def list_repo_tree(self, repo_id, *, repo_type=None, revision=None, recursive=False, **unused):
        assert repo_type == "dataset" and recursive
        for path, data in self._commit(repo_id, revision)["files"].items():
            lfs = {"size": len(data), "oid": hashlib.sha256(data).hexdigest(), "pointerSize": 130}
            blob_id = hashlib.sha1(f"blob {len(data)}\0".encode() + data).hexdigest()
            yield RepoFile(path=path, size=len(data), oid=blob_id, lfs=lfs if path.endswith(".arrow") else None)

    def hf_hub_download(self, repo_id, filename, *, repo_type=None, revision=None, local_dir=None, **unused):
        files = self._commit(repo_id, revision)["files"]
        if filename not in files:
            raise http_error(errors.RemoteEntryNotFoundError, 404, f"{filename} not found")
        self.downloads.append(filename)
        target = Path(local_dir) / filename
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(files[filename])
        return str(target)

    def create_commit(self, repo_id, operations, *, commit_message, repo_type=None, revision=None, **unused):
        assert repo_type == "dataset" and len(operations) < 100, "the Hub takes under 100 files per commit"
        parent = self._commit(repo_id, revision)
        if self.fail_commit is not None and len(self.repos[repo_id]) + 1 == self.fail_commit:
            raise ConnectionResetError("Connection reset by peer")
        files = dict(parent["files"])
        for operation in operations:
            if isinstance(operation, huggingface_hub.CommitOperationDelete):
                del files[operation.path_in_repo]  # the Hub refuses to delete a file that is not there
            else:
                source = operation.path_or_fileobj
                files[operation.path_in_repo] = source if isinstance(source, bytes) else Path(source).read_bytes()
        sha = hashlib.sha1(f"{parent['sha']}{commit_message}{len(self.repos[repo_id])}".encode()).hexdigest()
        paths = [operation.path_in_repo for operation in operations]
        self.repos[repo_id].append({"sha": sha, "message": commit_message, "paths": paths, "files": files})
        return SimpleNamespace(oid=sha)


@pytest.fixture
def hub(monkeypatch, tmp_path):
    fake = FakeHub()
    monkeypatch.setattr(huggingface_hub, "HfApi", fake.api)
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: "hf_fake_token")
    monkeypatch.setenv("KDCACHE_CACHE_DIR", str(tmp_path / "kdcache-cache"))
    return fake


def test_addresses():
    assert parse_address("hf://datasets/me/beans@v1") == Address(repo_id="me/beans", revision="v1")
    assert parse_address("me/beans", bare_repo_ids=True) == Address(repo_id="me/beans")
    assert parse_address("me/beans") is None  # where a cache has always been a path, a path it stays
    assert parse_address("s3://bucket/prefix/") == Address(url="s3://bucket/prefix")
    assert str(Address(repo_id="me/beans")) == "hf://datasets/me/beans"
    assert Address(repo_id="me/beans", revision="v1").folder_name == "hf--me--beans@v1"
    assert Address(url="s3://bucket/caches/beans").folder_name == "s3--bucket--caches--beans"
    with pytest.raises(KdcacheError, match="not a Hub dataset address"):
        parse_address("hf://me/beans")


def test_a_hub_push_commits_in_batches_under_the_limits_with_the_manifest_last(tiny_cache, hub, monkeypatch):
    assert HUB_FILES_PER_COMMIT < 100 and HubStore.files_per_batch == HUB_FILES_PER_COMMIT
    monkeypatch.setattr(HubStore, "files_per_batch", 4)
    report = push_cache(tiny_cache, "me/beans-logits", progress=False)
    assert report["uploaded_files"] == CACHE_FILES
    commits = hub.repos["me/beans-logits"][1:]
    assert [commit["paths"] for commit in commits[:1]] == [[PUSH_MARKER]]
    assert [len(commit["paths"]) for commit in commits[1:-1]] == [4, 4, 3]
    assert sorted(commits[-1]["paths"]) == sorted(["README.md", MANIFEST, PUSH_MARKER])  # added, added, deleted
    assert all(MANIFEST not in commit["files"] for commit in commits[:-1])  # never complete before it is
    final = commits[-1]["files"]
    assert {name: data for name, data in final.items() if name not in (MANIFEST, "README.md", ".gitattributes")} == (
        cache_files(tiny_cache)
    )
    pushed, local = json.loads(final[MANIFEST]), json.loads((tiny_cache / MANIFEST).read_text())
    assert pushed["fingerprint"] == local["fingerprint"] and pushed["dataset"]["splits"] == local["dataset"]["splits"]
    assert push_cache(tiny_cache, "hf://datasets/me/beans-logits", progress=False)["uploaded_files"] == 0


def test_a_pushed_cache_names_its_local_teacher_and_dataset_by_folder_name_and_holds_no_local_path(tiny_cache, hub):
    """No path of this machine leaves it (issue 33): the manifest and the card name local inputs by folder name."""
    local = json.loads((tiny_cache / MANIFEST).read_text())
    assert Path(local["teacher"]["name_or_path"]).is_absolute()  # the fixture's, as typed: what must not leave
    push_cache(tiny_cache, "me/beans-logits", progress=False)
    final = hub.repos["me/beans-logits"][-1]["files"]
    pushed = json.loads(final[MANIFEST])
    assert pushed["teacher"]["name_or_path"] == Path(local["teacher"]["name_or_path"]).name
    assert pushed["dataset"]["name_or_path"] == Path(local["dataset"]["name_or_path"]).name
    private = {str(Path(local["teacher"]["name_or_path"]).parent), str(Path.home()), str(Path.cwd())}
    private |= {str(Path(local["dataset"]["name_or_path"]).parent)}
    for name, data in final.items():
        for path in private:
            assert path.encode() not in data, f"{name} holds the local path {path}"


def test_a_hub_pull_is_pinned_to_a_commit_verified_and_reused_while_up_to_date(tmp_path, tiny_cache, hub):
    push_cache(tiny_cache, "me/beans-logits", progress=False)
    head = hub.repos["me/beans-logits"][-1]["sha"]
    copy = local_cache("hf://datasets/me/beans-logits", progress=False)
    assert cache_files(copy) == cache_files(tiny_cache)
    source = json.loads((copy / MANIFEST).read_text())["source"]
    assert (source["address"], source["revision"]) == ("hf://datasets/me/beans-logits", head)
    hub.downloads.clear()
    assert local_cache("hf://datasets/me/beans-logits", progress=False) == copy and hub.downloads == []
    # a new commit that leaves the cache as it was (the card edited): only the recorded revision moves
    hub.create_commit("me/beans-logits", [], commit_message="edit the card", repo_type="dataset")
    local_cache("hf://datasets/me/beans-logits", progress=False)
    assert hub.downloads == [MANIFEST]
    assert json.loads((copy / MANIFEST).read_text())["source"]["revision"] == hub.repos["me/beans-logits"][-1]["sha"]
    # an earlier revision, named: the push's first commit holds no complete cache
    begun = hub.repos["me/beans-logits"][1]["sha"]
    with pytest.raises(KdcacheError, match="holds no kdcache cache"):
        pull_cache(f"hf://datasets/me/beans-logits@{begun}", tmp_path / "early", progress=False)
    pinned = pull_cache(f"hf://datasets/me/beans-logits@{head}", tmp_path / "pinned", progress=False)
    assert pinned["revision"] == head and cache_files(tmp_path / "pinned") == cache_files(tiny_cache)


def test_an_interrupted_hub_push_resumes_committing_only_what_is_missing(tiny_cache, hub, monkeypatch):
    monkeypatch.setattr(HubStore, "files_per_batch", 4)
    hub.create_repo("me/beans-logits", repo_type="dataset")
    hub.fail_commit = 4  # the marker and the first batch go, the second batch's commit fails
    with pytest.raises(KdcacheError, match="ConnectionResetError.*run the same command again") as failed:
        push_cache(tiny_cache, "me/beans-logits", progress=False)
    assert "\n" not in str(failed.value)
    hub.fail_commit = None
    report = push_cache(tiny_cache, "me/beans-logits", progress=False)
    assert (report["uploaded_files"], report["kept_files"]) == (CACHE_FILES - 4, 4)
    assert MANIFEST in hub.repos["me/beans-logits"][-1]["files"]


def test_hub_refusals_are_one_line_each(tmp_path, tiny_cache, compact_cache, hub, monkeypatch):
    from typer.testing import CliRunner

    from kdcache.cli import app

    hub.create_repo("me/not-a-cache", repo_type="dataset")
    push_cache(tiny_cache, "me/beans-logits", progress=False)
    cases = {
        ("pull-cache", "me/nobody-made-this"): "Hub dataset repository 'me/nobody-made-this' does not exist",
        ("pull-cache", "me/not-a-cache"): "'hf://datasets/me/not-a-cache' holds no kdcache cache",
        ("pull-cache", "hf://datasets/me/beans-logits@v9"): "has no revision 'v9'",
        ("push-cache", str(compact_cache), "me/beans-logits"): "holds another cache",
    }
    for arguments, expected in cases.items():
        output = ["--output", str(tmp_path / "copy")] if arguments[0] == "pull-cache" else []
        result = CliRunner().invoke(app, [*arguments, *output])
        assert result.exit_code == 1 and result.output.count("\n") == 1, (arguments, result.output)
        assert expected in result.output, (arguments, result.output)
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    result = CliRunner().invoke(app, ["push-cache", str(tiny_cache), "me/beans-logits"])
    assert result.exit_code == 1 and "no Hub credentials to push" in result.output and "hf auth login" in result.output


def test_a_cache_past_the_hubs_limits_or_without_chunk_checksums_is_refused_before_any_upload(
    tmp_path, tiny_cache, hub, monkeypatch
):
    from helpers import old_format_copy

    import kdcache.format.remote as remote

    monkeypatch.setattr(remote, "HUB_FILES_PER_FOLDER", 3)
    with pytest.raises(
        KdcacheError, match="folder '(test|train|validation)' has 3 files, over the Hub's 3 per folder"
    ):
        push_cache(tiny_cache, "me/beans-logits", progress=False)
    monkeypatch.setattr(remote, "HUB_LARGEST_FILE", 1000)
    monkeypatch.setattr(remote, "HUB_FILES_PER_FOLDER", 10_000)
    with pytest.raises(KdcacheError, match="chunk-000000.arrow' is .* over the Hub's 1.0 KB per file"):
        push_cache(tiny_cache, "me/beans-logits", progress=False)
    old = old_format_copy(tiny_cache, tmp_path / "old", version=3)
    with pytest.raises(KdcacheError, match="has format version 3, without a checksum per chunk file"):
        push_cache(old, "me/beans-logits", progress=False)
    assert hub.repos == {}  # nothing was created, let alone uploaded
