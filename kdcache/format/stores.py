"""Where a travelling cache lives: a Hub dataset repository, or any fsspec location (s3://, gs://, az://, file://),
behind the few operations a push and a pull need: list the files, read one, fetch one into a local file, upload a
batch, delete some. Each failure is one line naming the address. What is transferred, in which order and how it is
verified is kdcache.format.remote's; this module only moves bytes.

Credentials are read where each ecosystem keeps them (the Hub token of `hf auth login` or HF_TOKEN; the AWS
environment or profile; fsspec's storage options, given by the user for an endpoint): kdcache never writes one."""

import contextlib
import hashlib
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from kdcache.errors import KdcacheError, first_line

HUB_PREFIX = "hf://datasets/"
_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")
# The Hub's limits (huggingface.co/docs/hub/storage-limits): under 100 files per commit (kept well under: a commit of
# large files is slower to prepare and to retry the more it holds), under 10,000 files per folder, and files best
# under 20 GB (50 GB at most).
HUB_FILES_PER_COMMIT = 50
HUB_FILES_PER_FOLDER = 10_000
HUB_LARGEST_FILE = 20 * 1000**3
# fsspec packages that kdcache's `remote` extra installs, by protocol; the others are named in the error
REMOTE_EXTRA = "pip install 'kdcache[remote]'"


@dataclass(frozen=True)
class Address:
    """A remote place for a cache: a Hub dataset repository (`repo_id`, and `revision`, a branch, tag or commit), or
    an fsspec URL (`url`)."""

    repo_id: str | None = None
    revision: str | None = None
    url: str | None = None

    @property
    def on_hub(self) -> bool:
        return self.repo_id is not None

    def __str__(self) -> str:
        """The canonical spelling, as a pulled cache's manifest records it: hf://datasets/OWNER/NAME[@REVISION]."""
        if self.on_hub:
            return HUB_PREFIX + self.repo_id + (f"@{self.revision}" if self.revision else "")
        return self.url

    @property
    def folder_name(self) -> str:
        """The name of this address's copy in the cache folder: 'hf--OWNER--NAME', 's3--bucket--prefix'."""
        text = f"hf--{self.repo_id}" + (f"@{self.revision}" if self.revision else "") if self.on_hub else self.url
        return re.sub(r"[^A-Za-z0-9_.@-]+", "--", text.replace("://", "--")).strip("-.")


def parse_address(text, bare_repo_ids: bool = False) -> Address | None:
    """The Address of `text`, or None for a local path. `bare_repo_ids`: OWNER/NAME (no scheme, and no such local
    path) is a Hub dataset repository, as push-cache and pull-cache read their address; where a cache argument has
    always been a local path (train-student, evaluate, ...), a Hub cache is written hf://datasets/OWNER/NAME."""
    text = str(text)
    if text.startswith("hf://"):
        repo_id, _, revision = text[len(HUB_PREFIX) :].strip("/").partition("@")
        if not text.startswith(HUB_PREFIX) or not _REPO_ID.match(repo_id):
            raise KdcacheError(
                f"'{text}' is not a Hub dataset address; write hf://datasets/OWNER/NAME (or OWNER/NAME), with "
                "@REVISION for a branch, tag or commit"
            )
        return Address(repo_id=repo_id, revision=revision or None)
    if "://" in text:
        return Address(url=text.rstrip("/"))
    if bare_repo_ids and _REPO_ID.match(text) and not os.path.exists(text):
        return Address(repo_id=text)
    return None


@dataclass(frozen=True)
class RemoteFile:
    """A file found at an address: its size, and what identifies its content without reading it, when the place
    says (a Hub file: the sha256 of a large file, git's blob id of a small one)."""

    size: int
    sha256: str | None = None
    blob_id: str | None = None


class Unreachable(KdcacheError):
    """The address could not be reached (the network, the service): a copy pulled earlier may still be used."""


class Missing(KdcacheError):
    """An object the manifest lists is not at the address."""


def open_store(address: Address, storage_options: dict | None = None):
    return HubStore(address) if address.on_hub else FsspecStore(address, storage_options)


def git_blob_id(path: Path) -> str:
    """git's id of a file's content (what the Hub lists for a file it does not store as LFS)."""
    digest = hashlib.sha1(f"blob {path.stat().st_size}\0".encode())
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class FsspecStore:
    """A cache under an fsspec URL: one object per file, at the same relative path as in the local folder."""

    files_per_batch = 1  # each object is written whole by itself (an object store's put is atomic)

    def __init__(self, address: Address, storage_options: dict | None = None):
        import fsspec

        self.address = address
        try:
            # a filesystem of its own: another command's (other credentials, a stale listing) is never reused
            self.fs, root = fsspec.core.url_to_fs(address.url, skip_instance_cache=True, **(storage_options or {}))
        except ImportError as error:
            raise KdcacheError(
                f"'{address}' needs a filesystem package that is not installed ({first_line(error)}); install it "
                f"(s3fs for s3://: {REMOTE_EXTRA})"
            ) from None
        except (ValueError, TypeError) as error:
            raise KdcacheError(
                f"'{address}' cannot be opened with these storage options ({first_line(error)}); check the URL and "
                "--storage-options"
            ) from None
        self.root = root.rstrip("/")

    def _path(self, name: str) -> str:
        return f"{self.root}/{name}"

    def revision(self) -> str | None:
        return None  # an object store has no revisions: the manifest's ETag and sha256 say which cache it is

    def prepare_push(self, private: bool) -> None:
        pass  # a bucket or folder is the user's to create: a missing one is reported by the first write

    def files(self) -> dict[str, RemoteFile]:
        with self._errors("list"):
            try:
                found = self.fs.find(self.root, detail=True)
            except FileNotFoundError:
                found = {}
        prefix = self.root + "/"
        return {
            path[len(prefix) :]: RemoteFile(int(info.get("size") or 0))
            for path, info in found.items()
            if path.startswith(prefix) and info.get("type", "file") == "file"
        }

    def read(self, name: str) -> bytes | None:
        """The object's bytes, or None when there is none."""
        with self._errors(f"read '{name}' of"):
            try:
                return self.fs.cat_file(self._path(name))
            except FileNotFoundError:
                if not self._root_exists():
                    raise
                return None

    def etag(self, name: str) -> str | None:
        with self._errors(f"read '{name}' of"):
            info = self.fs.info(self._path(name))
        return (info.get("ETag") or info.get("etag") or "").strip('"') or None

    def fetch(self, name: str, target: Path, again: bool = False) -> None:
        with self._errors(f"fetch '{name}' of", missing=name):
            self.fs.get_file(self._path(name), str(target))

    def upload(self, adds: list[tuple[str, Path | bytes]], deletes=(), message: str = "") -> None:
        """Write each file in order, then delete `deletes`."""
        with self._errors("write to"):
            for name, source in adds:
                if self._local:  # a folder, unlike an object store's prefix, must exist to hold a file
                    self.fs.makedirs(self.fs._parent(self._path(name)), exist_ok=True)
                if isinstance(source, bytes):
                    self.fs.pipe_file(self._path(name), source)
                else:
                    self.fs.put_file(str(source), self._path(name))
            self.delete(deletes)

    def delete(self, names) -> None:
        with self._errors("delete from"):
            for name in names:
                with contextlib.suppress(FileNotFoundError):
                    self.fs.rm_file(self._path(name))

    @property
    def _local(self) -> bool:
        return "file" in (self.fs.protocol if isinstance(self.fs.protocol, tuple) else (self.fs.protocol,))

    def _root_exists(self) -> bool:
        # an s3:// address's bucket, a file:// address's parent folder: a missing one is an address that does not exist
        parent = os.path.dirname(self.root) if self._local else self.root.split("/")[0]
        try:
            return self.fs.exists(parent or self.root)
        except Exception:
            return True  # cannot tell: let the original error stand

    @contextlib.contextmanager
    def _errors(self, action: str, missing: str | None = None):
        """Any failure of the block as one line: the address missing, no credentials, or unreachable."""
        try:
            yield
        except KdcacheError:
            raise
        except FileNotFoundError as error:
            if missing is not None and self._root_exists():
                raise Missing(f"object '{missing}' is missing from '{self.address}'") from None
            raise KdcacheError(
                f"'{self.address}' does not exist ({first_line(error)}); check the address (an s3:// bucket must "
                "exist before a push)"
            ) from None
        except Exception as error:
            text = f"{type(error).__name__}: {first_line(error)}"
            if isinstance(error, PermissionError) or "credentials" in text.lower() or "AccessDenied" in text:
                raise KdcacheError(
                    f"could not {action} '{self.address}': no credentials or no permission ({text}); set them where "
                    "your storage keeps them (AWS_ACCESS_KEY_ID / AWS_PROFILE for s3://) or pass --storage-options"
                ) from None
            raise Unreachable(
                f"could not {action} '{self.address}' ({text}); check the address and the network, then run the "
                "same command again: what was transferred is kept"
            ) from None


class HubStore:
    """A cache in a Hub dataset repository, every read pinned to one commit; written in batched commits."""

    files_per_batch = HUB_FILES_PER_COMMIT

    def __init__(self, address: Address):
        from huggingface_hub import HfApi

        self.address, self.repo_id = address, address.repo_id
        self.api = HfApi()
        self.commit: str | None = None  # the commit every read is pinned to, once `revision()` has resolved it

    def revision(self) -> str:
        """The commit the address's revision (main unless given) points to now: what a pull reads."""
        with self._errors("read"):
            self.commit = self.api.dataset_info(self.repo_id, revision=self.address.revision).sha
        return self.commit

    def prepare_push(self, private: bool) -> None:
        from huggingface_hub import get_token

        if get_token() is None:
            raise KdcacheError(
                f"no Hub credentials to push to '{self.address}'; log in with 'hf auth login' or set HF_TOKEN"
            )
        with self._errors("create"):
            self.api.create_repo(self.repo_id, repo_type="dataset", exist_ok=True, private=private or None)
        self.commit = self.address.revision  # a push reads the branch it writes to, as it is now

    def files(self) -> dict[str, RemoteFile]:
        with self._errors("list"):
            entries = self.api.list_repo_tree(self.repo_id, repo_type="dataset", revision=self.commit, recursive=True)
            return {
                entry.path: RemoteFile(
                    int(entry.size), entry.lfs.sha256 if getattr(entry, "lfs", None) else None, entry.blob_id
                )
                for entry in entries
                if hasattr(entry, "size")  # a file, not a folder
            }

    def read(self, name: str) -> bytes | None:
        with tempfile.TemporaryDirectory() as staging:
            try:
                with self._errors(f"read '{name}' of", missing=name):
                    path = self.api.hf_hub_download(
                        self.repo_id, name, repo_type="dataset", revision=self.commit, local_dir=staging
                    )
            except Missing:
                return None
            return Path(path).read_bytes()

    def etag(self, name: str) -> str | None:
        return None  # the commit (revision) says which cache it is

    def fetch(self, name: str, target: Path, again: bool = False) -> None:
        staging = target.parent / ".kdcache-download"  # huggingface_hub's resumable download, beside the target
        with self._errors(f"fetch '{name}' of", missing=name):
            path = self.api.hf_hub_download(
                self.repo_id,
                name,
                repo_type="dataset",
                revision=self.commit,
                local_dir=staging,
                force_download=again,
            )
        os.replace(path, target)
        shutil.rmtree(staging, ignore_errors=True)

    def upload(self, adds: list[tuple[str, Path | bytes]], deletes=(), message: str = "") -> None:
        """One commit: every file of `adds` and every deletion, or none of them."""
        from huggingface_hub import CommitOperationAdd, CommitOperationDelete

        operations = [
            CommitOperationAdd(path_in_repo=name, path_or_fileobj=source if isinstance(source, bytes) else str(source))
            for name, source in adds
        ] + [CommitOperationDelete(path_in_repo=name) for name in deletes]
        if not operations:
            return
        with self._errors("write to"):
            self.api.create_commit(
                self.repo_id,
                operations,
                commit_message=message or "kdcache push",
                repo_type="dataset",
                revision=self.address.revision,
            )

    def delete(self, names) -> None:
        self.upload([], deletes=list(names), message="kdcache push: remove the files of the cache replaced")

    @contextlib.contextmanager
    def _errors(self, action: str, missing: str | None = None):
        from huggingface_hub import errors

        try:
            yield
        except KdcacheError:
            raise
        except errors.RepositoryNotFoundError:
            raise KdcacheError(
                f"Hub dataset repository '{self.repo_id}' does not exist, or is private and you are not logged in "
                "('hf auth login', or HF_TOKEN)"
            ) from None
        except errors.RevisionNotFoundError:
            raise KdcacheError(
                f"'{self.address}': repository '{self.repo_id}' has no revision '{self.address.revision}'; name a "
                "branch, tag or commit it has"
            ) from None
        except errors.GatedRepoError:
            raise KdcacheError(
                f"'{self.address}' is gated; accept its conditions on the Hub with the account you are logged in as"
            ) from None
        except errors.EntryNotFoundError:
            if missing is None:
                raise
            raise Missing(f"object '{missing}' is missing from '{self.address}'") from None
        except errors.OfflineModeIsEnabled:
            raise Unreachable(f"could not {action} '{self.address}': HF_HUB_OFFLINE is set") from None
        except Exception as error:
            text = f"{type(error).__name__}: {first_line(error)}"
            status = getattr(getattr(error, "response", None), "status_code", None)
            if status in (401, 403):
                raise KdcacheError(
                    f"could not {action} '{self.address}': no permission ({text}); log in with 'hf auth login' (a "
                    "token with write access to push) or set HF_TOKEN"
                ) from None
            raise Unreachable(
                f"could not {action} '{self.address}' ({text}); check the network, then run the same command "
                "again: what was transferred is kept"
            ) from None
