"""--push-to-hub uploads the finished student folder once, as pipeline() loads it; no network is used here."""

from pathlib import Path

import huggingface_hub
import pytest

from kdcache import KdcacheError
from kdcache.student.train import train_student

FAST = dict(batch_size=8, progress=False, logging_steps=1)


class FakeHub:
    """Stands in for huggingface_hub.HfApi, recording what would be created and uploaded."""

    calls = []

    def create_repo(self, repo_id, exist_ok=False, **kwargs):
        FakeHub.calls.append(("create_repo", repo_id, exist_ok))
        return huggingface_hub.RepoUrl(f"https://huggingface.co/{repo_id}")

    def upload_folder(self, *, repo_id, folder_path, path_in_repo=None, **kwargs):
        folder = Path(folder_path)
        files = sorted(str(path.relative_to(folder)) for path in folder.rglob("*") if path.is_file())
        partial = folder.with_name(folder.name + ".partial")
        FakeHub.calls.append(("upload_folder", repo_id, str(folder), path_in_repo, files, partial.exists()))


def test_push_uploads_the_finished_student_folder_once(tmp_path, tiny_cache, monkeypatch):
    FakeHub.calls = []
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeHub)
    output = tmp_path / "student"
    train_student(tiny_cache, output=output, epochs=1, push_to_hub="me/beans-student", **FAST)
    assert [call[0] for call in FakeHub.calls] == ["create_repo", "upload_folder"], "one upload, after training"
    assert FakeHub.calls[0] == ("create_repo", "me/beans-student", True)
    _, repo, folder, path_in_repo, files, partial_left = FakeHub.calls[1]
    assert (repo, folder, path_in_repo) == ("me/beans-student", str(output), None)
    assert not partial_left, "the folder uploaded is the final one, in place"
    for name in ("config.json", "model.safetensors", "preprocessor_config.json", "README.md", "kdcache_training.json"):
        assert name in files
    assert any(name.startswith("runs/") for name in files), "TensorBoard logs go along"
    assert not any("checkpoint-" in name for name in files)
    card = huggingface_hub.ModelCard.load(output / "README.md")
    assert 'pipeline("image-classification", model="me/beans-student")' in card.content
    assert card.data.model_name == "me/beans-student", "the model-index names the repository pushed to"


def test_a_failed_push_is_one_line_and_keeps_the_student(tmp_path, tiny_cache):
    """The real HfApi, offline (conftest sets HF_HUB_OFFLINE=1), as on a machine without network."""
    output = tmp_path / "student"
    with pytest.raises(KdcacheError) as failed:
        train_student(tiny_cache, output=output, max_steps=2, eval_split=None, push_to_hub="me/beans-student", **FAST)
    message = str(failed.value)
    assert "\n" not in message
    assert message.startswith("could not push to hub repository 'me/beans-student' (OfflineModeIsEnabled: ")
    assert message.endswith(
        f"the student is saved at '{output}': push it later with 'hf auth login' then "
        f"'hf upload me/beans-student {output} .'"
    )
    assert (output / "model.safetensors").exists() and (output / "preprocessor_config.json").exists()
    assert not (tmp_path / "student.partial").exists()


def test_a_push_uploads_no_local_path(tmp_path, tmp_path_factory, tiny_cache, monkeypatch):
    """Nothing private leaves the machine: no file uploaded names this machine's paths (the test's folders, the
    home folder, the working folder), in text or in binary files (TensorBoard's events, the weights' metadata)."""
    uploaded = []
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeHub)
    monkeypatch.setattr(FakeHub, "upload_folder", lambda self, *, folder_path, **kwargs: uploaded.append(folder_path))
    train_student(
        tiny_cache, output=tmp_path / "student", epochs=1, push_to_hub="me/beans-student", license="mit", **FAST
    )
    assert huggingface_hub.ModelCard.load(tmp_path / "student" / "README.md").data.license == "mit"
    assert "kdcache_config.yaml" in [file.name for file in Path(uploaded[0]).iterdir()], "it names no absolute path"
    # the session's temporary folder holds the test's, the cache's and the teacher's
    private = {str(tmp_path_factory.getbasetemp()), str(tmp_path), str(Path.home()), str(Path.cwd())}
    private = {path.encode() for path in private if path != "/"}
    leaks = [
        f"{file.relative_to(uploaded[0])}: {path.decode()}"
        for file in sorted(Path(uploaded[0]).rglob("*"))
        if file.is_file()
        for path in private
        if path in file.read_bytes()
    ]
    assert not leaks


def test_a_config_naming_a_path_outside_the_folders_tree_is_not_pushed(tmp_path, monkeypatch):
    from kdcache.hub import push_folder
    from kdcache.options.config import CONFIG_FILE, write_config

    ignored = []
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeHub)
    monkeypatch.setattr(FakeHub, "upload_folder", lambda self, **kwargs: ignored.append(kwargs["ignore_patterns"]))
    write_config(tmp_path, "train-student", {"cache": tmp_path / "caches" / "tiny", "output": tmp_path})
    push_folder(tmp_path, "me/student")
    write_config(tmp_path, "train-student", {"cache": Path("/"), "output": tmp_path})  # shares nothing but the root
    push_folder(tmp_path, "me/student")
    assert ignored == [None, [CONFIG_FILE]]
