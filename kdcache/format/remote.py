"""Caches that travel: push a cache to a Hub dataset repository or an fsspec URL, pull one back, and give every
command that reads a cache a local copy of one named by address (`local_cache`: pulled once into the cache folder,
reused while the address holds the same cache).

The remote layout is the local one, file for file, plus a dataset card (README.md, kdcache.format.dataset_card). The
order of a push makes a half-pushed cache invisible: the old manifest goes first (--overwrite), a marker
(kdcache-push.json, the manifest being pushed) says whose files are arriving, then the files in batches (one commit
each on the Hub), then the card and the manifest together, last. A rerun finds the marker and uploads only what is
not there yet. A pull writes into its folder a marker of its own (kdcache-pull.json: the address and the manifest
being pulled), keeps every chunk already there whose sha256 is the manifest's, fetches the others to FILE.part,
hashes them and renames them in place (a damaged or missing object is fetched once more, then refused), and writes
the manifest last, with the address, revision or ETag it came from (`source`)."""

import hashlib
import json
import logging
import os
import time
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

from kdcache.errors import KdcacheError
from kdcache.format.manifest import CHUNK_CHECKSUMS_SINCE, MANIFEST, Manifest
from kdcache.format.stores import (
    HUB_FILES_PER_FOLDER,
    HUB_LARGEST_FILE,
    Address,
    Missing,
    RemoteFile,
    Unreachable,
    git_blob_id,
    open_store,
    parse_address,
)
from kdcache.options import PushOptions, RemoteOptions
from kdcache.options.config import CONFIG_FILE, names_local_path
from kdcache.outputs import LOCK_SUFFIX, human_bytes, output_lock
from kdcache.runtime import output_path

log = logging.getLogger("kdcache")

PUSH_MARKER = "kdcache-push.json"
PULL_MARKER = "kdcache-pull.json"
CARD = "README.md"
# never transferred: the markers, temporary files, a download in progress, git's own
_NOT_CACHE_FILES = (PUSH_MARKER, PULL_MARKER)
_NOT_CACHE_SUFFIXES = (".tmp", ".part", LOCK_SUFFIX)
# how long a process waits for another one (of the same launch, say) pulling the same address into the cache folder
PULL_WAIT_SECONDS = 6 * 3600


def default_cache_dir() -> Path:
    """Where caches given by address are pulled: $KDCACHE_CACHE_DIR, else kdcache/ in the user's cache folder
    ($XDG_CACHE_HOME, else ~/.cache), as the Hub's own cache is kept."""
    if os.environ.get("KDCACHE_CACHE_DIR"):
        return Path(os.environ["KDCACHE_CACHE_DIR"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() / "kdcache"


def _address(text, role: str) -> Address:
    address = parse_address(text, bare_repo_ids=True)
    if address is None:
        raise KdcacheError(
            f"{role} '{text}' is not an address; give a Hub dataset repository (OWNER/NAME or "
            "hf://datasets/OWNER/NAME) or an fsspec URL (s3://bucket/prefix, file:///path)"
        )
    return address


def _is_cache_file(name: str) -> bool:
    """Whether a file (a path relative to the cache folder) is part of the cache: not a marker, a temporary file, or
    anything in a hidden folder (a download in progress, git's own)."""
    parts = name.split("/")
    hidden = any(part.startswith(".") for part in parts)
    return not hidden and parts[-1] not in _NOT_CACHE_FILES and not parts[-1].endswith(_NOT_CACHE_SUFFIXES)


def _chunks(manifest: dict) -> dict[str, dict]:
    """'split/chunk-NNNNNN.arrow' -> its manifest entry (bytes, sha256), for every chunk of every split."""
    return {
        f"{split}/{chunk['file']}": chunk
        for split, entry in manifest["dataset"]["splits"].items()
        for chunk in entry["chunks"]
    }


def public_manifest(manifest: dict) -> dict:
    """The manifest as pushed: a local teacher, dataset or extra-images folder named by its folder name alone (its
    fingerprint and checksums say what it was), so that no path of this machine leaves it; hub ids stay as they are."""
    manifest = json.loads(json.dumps(manifest))
    named = [manifest["teacher"], manifest["dataset"], manifest["dataset"].get("extra_images") or {}]
    for entry in named:
        value = entry.get("name_or_path")
        if isinstance(value, str) and value and Path(value).expanduser().exists():
            entry["name_or_path"] = Path(value).expanduser().resolve().name
    return manifest


def _same_cache(one: dict, other: dict) -> bool:
    """The same cache: the same inputs (fingerprint) and the same bytes (every chunk's sha256)."""
    sums = lambda manifest: {name: chunk["sha256"] for name, chunk in _chunks(manifest).items()}
    return one.get("fingerprint") == other.get("fingerprint") and sums(one) == sums(other)


def _sha256(path: Path) -> str:
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


# pushing


def push_cache(cache, dest, options: PushOptions | None = None, *, progress: bool = True, **overrides) -> dict:
    """Push the cache folder `cache` to the address `dest` (a Hub dataset repository, OWNER/NAME or
    hf://datasets/OWNER/NAME[@BRANCH], or an fsspec URL). The cache is verified first (every chunk's sha256), a
    different cache at `dest` is refused unless `overwrite`, and a rerun of an interrupted push uploads only what is
    missing. Returns {address, uploaded_files, uploaded_bytes, kept_files, seconds}."""
    options = replace(options or PushOptions(), **overrides)
    started = time.monotonic()
    address = _address(dest, "DEST")
    folder = Path(cache)
    manifest = Manifest.read(folder)
    manifest.check_format(folder)
    if manifest["format_version"] < CHUNK_CHECKSUMS_SINCE:
        raise KdcacheError(
            f"cache '{folder}' has format version {manifest['format_version']}, without a checksum per chunk file "
            "to verify a pull by; recreate it with this kdcache's teacher-logits to push it"
        )
    manifest.verify_files(folder)  # never push a damaged cache
    local = {name: folder / name for name in _local_files(folder) if name not in (MANIFEST, CARD)}
    if CONFIG_FILE in local and names_local_path(folder):  # it reruns the cache here, and would publish our paths
        del local[CONFIG_FILE]  # said once the push is done (a refusal before it stays one line)
    chunks = _chunks(manifest)
    if address.on_hub:
        _check_hub_limits(folder, local)
    # the manifest as written (not as upgraded in memory), less where this copy was pulled from, which is ours
    as_written = json.loads((folder / MANIFEST).read_text())
    pushed = public_manifest({key: value for key, value in as_written.items() if key != "source"})
    store = open_store(address, options.storage_options)
    store.prepare_push(options.private)
    remote = store.files()
    existing = _read_json(store, MANIFEST) if MANIFEST in remote else None
    pending = _read_json(store, PUSH_MARKER) if PUSH_MARKER in remote else None
    same = existing is not None and _same_cache(existing, pushed)
    if same and set(local) <= set(remote):
        store.delete([PUSH_MARKER] if pending is not None else [])  # left by a push killed after its manifest
        return _push_report(address, 0, 0, len(local), started)
    resuming = pending is not None and _same_cache(pending, pushed)
    other = (
        existing if existing is not None and not same else pending if pending is not None and not resuming else None
    )
    if other is not None and not options.overwrite:
        what = "another cache" if other is existing else "part of another cache's push"
        raise KdcacheError(
            f"'{address}' holds {what} (fingerprint {other.get('fingerprint')}); pass --overwrite to replace it, "
            "or push to another address"
        )
    foreign = [name for name in remote if name not in local and _is_cache_file(name) and name != CARD]
    if existing is None and pending is None and foreign:  # never remove what is not a cache
        raise KdcacheError(
            f"'{address}' holds files that are not a kdcache cache (e.g. '{foreign[0]}'); push to an empty address "
            "(a new prefix or repository)"
        )
    # The cache there stops being complete (its manifest goes) before anything of this one arrives. Another cache's
    # files all go: one of the same name and size (a chunk of as many rows) is not this one's, and only the files
    # written after this push's marker may be trusted by their size when it resumes.
    if other is not None:
        store.delete(sorted((name for name in remote if _is_cache_file(name)), key=lambda name: name != MANIFEST))
        remote = {name: file for name, file in remote.items() if not _is_cache_file(name)}
    elif existing is not None:
        store.delete([MANIFEST])
    if not resuming:
        store.upload([(PUSH_MARKER, _json_bytes(pushed))], message="kdcache push: begin")
    todo = [
        name
        for name in local
        if not _already_there(local[name], remote.get(name), chunks.get(name), trust_sizes=resuming or same)
    ]
    uploaded = _upload(store, local, todo, progress, str(address))
    from kdcache.format.dataset_card import dataset_card

    card = dataset_card(pushed, address, source=as_written["dataset"]["name_or_path"]).content.encode()
    store.upload(
        [(CARD, card), (MANIFEST, _json_bytes(pushed))],
        deletes=[PUSH_MARKER],
        message=f"kdcache push: cache {manifest.fingerprint} complete",
    )
    if CONFIG_FILE not in local and (folder / CONFIG_FILE).exists():
        log.info("%s not pushed: it names this machine's inputs by their paths", CONFIG_FILE)
    return _push_report(address, len(todo), uploaded, len(local) - len(todo), started)


def _push_report(address: Address, files: int, sent: int, kept: int, started: float) -> dict:
    return {
        "address": str(address),
        "uploaded_files": files,
        "uploaded_bytes": sent,
        "kept_files": kept,
        "seconds": time.monotonic() - started,
    }


def _local_files(folder: Path) -> list[str]:
    return sorted(
        path.relative_to(folder).as_posix()
        for path in folder.rglob("*")
        if path.is_file() and _is_cache_file(path.relative_to(folder).as_posix())
    )


def _check_hub_limits(folder: Path, local: dict) -> None:
    per_folder: dict[str, int] = {}
    for name, path in local.items():
        parent = name.rpartition("/")[0]
        per_folder[parent] = per_folder.get(parent, 0) + 1
        if path.stat().st_size > HUB_LARGEST_FILE:
            raise KdcacheError(
                f"cache '{folder}' file '{name}' is {human_bytes(path.stat().st_size)}, over the Hub's "
                f"{human_bytes(HUB_LARGEST_FILE)} per file; recreate the cache with a smaller --chunk-size"
            )
    crowded = max(per_folder.items(), key=lambda item: item[1])
    if crowded[1] >= HUB_FILES_PER_FOLDER:
        raise KdcacheError(
            f"cache '{folder}' folder '{crowded[0]}' has {crowded[1]} files, over the Hub's {HUB_FILES_PER_FOLDER} "
            "per folder; recreate the cache with a larger --chunk-size, or push it to object storage (s3://...)"
        )


def _already_there(path: Path, remote: RemoteFile | None, chunk: dict | None, trust_sizes: bool) -> bool:
    """Whether the remote file is this one: by its sha256 or git id where the place tells them (the Hub), else, for
    a file written by the very push being resumed (or of this same cache), by its size (an object store writes an
    object whole or not at all, and a local file cut short has another size)."""
    if remote is None or remote.size != path.stat().st_size:
        return False
    if remote.sha256 is not None:
        return remote.sha256 == (chunk["sha256"] if chunk else _sha256(path))
    if remote.blob_id is not None:
        return remote.blob_id == git_blob_id(path)
    return trust_sizes


def _upload(store, local: dict, todo: list[str], progress: bool, address: str) -> int:
    """Upload `todo` in the store's batches (the Hub: one commit each); returns the bytes sent."""
    from tqdm.auto import tqdm

    total = sum(local[name].stat().st_size for name in todo)
    with tqdm(total=total, unit="B", unit_scale=True, desc=f"push to {address}", disable=not progress) as bar:
        for start in range(0, len(todo), store.files_per_batch):
            batch = todo[start : start + store.files_per_batch]
            store.upload(
                [(name, local[name]) for name in batch],
                message=f"kdcache push: files {start + 1}-{start + len(batch)} of {len(todo)}",
            )
            bar.update(sum(local[name].stat().st_size for name in batch))
    return total


def _json_bytes(content: dict) -> bytes:
    return (json.dumps(content, indent=2) + "\n").encode()


def _read_json(store, name: str) -> dict | None:
    data = store.read(name)
    if data is None:
        return None
    try:
        content = json.loads(data)
    except ValueError:
        return {}
    return content if isinstance(content, dict) else {}


# pulling


def pull_cache(src, output=None, options: RemoteOptions | None = None, *, progress: bool = True, **overrides) -> dict:
    """Pull the cache at the address `src` into the folder `output` (default: its folder in the cache folder),
    verifying every chunk's sha256 against the manifest before it is in place. A rerun of an interrupted pull fetches
    only what is missing; a copy already up to date is kept as it is. Returns {path, address, revision, fetched_files,
    fetched_bytes, kept_files, verify_seconds, seconds}."""
    options = replace(options or RemoteOptions(), **overrides)
    address = _address(src, "SRC")
    folder = output_path(output) if output is not None else _copy_folder(address, options)
    return _pull(address, folder, options.storage_options, progress, wait=0)


def _copy_folder(address: Address, options: RemoteOptions) -> Path:
    return Path(options.cache_dir or default_cache_dir()).expanduser() / address.folder_name


def local_cache(cache, options: RemoteOptions | None = None, *, progress: bool = True) -> Path:
    """The local folder of the cache `cache`: a path as it is, or, for an address (hf://datasets/OWNER/NAME[@REV],
    s3://..., any fsspec URL), its copy in the cache folder, pulled (verified) unless up to date. When the address
    cannot be reached and a complete copy is there, the copy is used, with a warning."""
    address = parse_address(cache)
    if address is None:
        return Path(cache)
    options = options or RemoteOptions()
    folder = _copy_folder(address, options)
    try:
        _pull(address, folder, options.storage_options, progress, wait=PULL_WAIT_SECONDS)
    except Unreachable as error:
        if not (folder / MANIFEST).exists():
            raise
        log.warning(f"kdcache: using the copy of '{address}' pulled earlier ({folder}): {error}")
    return folder


def local_caches(caches, options: RemoteOptions | None = None, *, progress: bool = True):
    """`local_cache` of one cache or of each of a list (an ensemble's), keeping the shape."""
    if isinstance(caches, (str, Path)):
        return local_cache(caches, options, progress=progress)
    return [local_cache(cache, options, progress=progress) for cache in caches]


def _pull(address: Address, folder: Path, storage_options, progress: bool, wait: float) -> dict:
    started = time.monotonic()
    store = open_store(address, storage_options)
    report = {"path": folder, "address": str(address), "fetched_files": 0, "fetched_bytes": 0, "kept_files": 0}
    with output_lock(folder, "--output", wait=wait):
        copy = _local_copy(folder, address)
        revision = store.revision()
        if copy is not None and revision is not None and copy["source"].get("revision") == revision:
            return {**report, "revision": revision, "verify_seconds": 0.0, "seconds": time.monotonic() - started}
        data = store.read(MANIFEST)
        if data is None:
            raise KdcacheError(
                f"'{address}' holds no kdcache cache (no {MANIFEST}, or a push that has not finished); push one "
                "with kdcache push-cache"
            )
        manifest = _remote_manifest(data, address)
        source = {
            "address": str(address),
            "revision": revision,
            "etag": store.etag(MANIFEST),
            "manifest_sha256": hashlib.sha256(data).hexdigest(),
            "pulled": datetime.now(UTC).isoformat(timespec="seconds"),
        }
        if copy is not None and copy["source"].get("manifest_sha256") == source["manifest_sha256"]:
            # the same cache at a new revision (a new card, say): only the record of where it came from changes
            Manifest({**json.loads((folder / MANIFEST).read_text()), "source": source}).write(folder)
            return {**report, "revision": revision, "verify_seconds": 0.0, "seconds": time.monotonic() - started}
        report.update(_fetch_all(store, folder, manifest, source, progress))
        manifest["source"] = source
        manifest.write(folder)  # last: the folder is a cache from here on
        (folder / PULL_MARKER).unlink()
    return {**report, "revision": revision, "seconds": time.monotonic() - started}


def _remote_manifest(data: bytes, address: Address) -> Manifest:
    try:
        raw = json.loads(data)
    except ValueError:
        raw = None
    if not isinstance(raw, dict) or raw.get("format") != "kdcache":
        raise KdcacheError(f"'{address}' holds a {MANIFEST} that is not a kdcache manifest; it holds no kdcache cache")
    manifest = Manifest(raw)
    manifest.check_format(address)
    if raw["format_version"] < CHUNK_CHECKSUMS_SINCE or "dataset" not in raw:
        raise KdcacheError(f"'{address}' holds a cache without chunk checksums, which a pull cannot verify")
    return manifest  # as written (not upgraded in memory): the copy's manifest is the pushed one, plus its source


def _local_copy(folder: Path, address: Address) -> dict | None:
    """The complete copy of `address` in `folder`, None for an empty folder or a pull of it to continue; any other
    content of the folder is refused."""
    if not folder.exists() or not any(folder.iterdir()):
        return None
    if (folder / MANIFEST).exists():
        manifest = Manifest.read(folder)
        came_from = (manifest.get("source") or {}).get("address")
        if came_from == str(address):
            return manifest
        origin = f"pulled from '{came_from}'" if came_from else "not pulled from an address"
        raise KdcacheError(
            f"--output '{folder}' holds another cache ({origin}); choose another --output, or remove it"
        )
    if (folder / PULL_MARKER).exists():
        try:
            being_pulled = json.loads((folder / PULL_MARKER).read_text()).get("address")
        except ValueError:
            being_pulled = None
        if being_pulled == str(address):
            return None
        raise KdcacheError(
            f"--output '{folder}' holds an unfinished pull of '{being_pulled}'; rerun that pull, or choose another "
            "--output"
        )
    raise KdcacheError(f"--output '{folder}' is not empty and holds no kdcache cache; choose a new or empty folder")


def _fetch_all(store, folder: Path, manifest: Manifest, source: dict, progress: bool) -> dict:
    """Every file of the remote cache in `folder`, each chunk verified; files of an older revision removed."""
    from tqdm.auto import tqdm

    marker = folder / PULL_MARKER
    folder.mkdir(parents=True, exist_ok=True)
    (folder / MANIFEST).unlink(missing_ok=True)  # an older revision's copy is no cache while it is updated
    try:
        previous = json.loads(marker.read_text()).get("manifest_sha256")
    except (OSError, ValueError):
        previous = None
    marker.write_text(json.dumps({"address": source["address"], "manifest_sha256": source["manifest_sha256"]}))
    chunks = _chunks(manifest)
    others = [name for name in store.files() if _is_cache_file(name) and name != MANIFEST and name not in chunks]
    fetched = kept = fetched_bytes = 0
    verify_seconds = 0.0
    with tqdm(
        total=sum(chunk["bytes"] for chunk in chunks.values()),
        unit="B",
        unit_scale=True,
        desc=f"pull {source['address']}",
        disable=not progress,
    ) as bar:
        for name, chunk in chunks.items():
            target = folder / name
            checking = time.monotonic()
            good = target.exists() and target.stat().st_size == chunk["bytes"] and _sha256(target) == chunk["sha256"]
            verify_seconds += time.monotonic() - checking
            if good:
                kept += 1
            else:
                verify_seconds += _fetch_verified(store, name, target, chunk, source["address"])
                fetched, fetched_bytes = fetched + 1, fetched_bytes + chunk["bytes"]
            bar.update(chunk["bytes"])
    same_pull = previous == source["manifest_sha256"]
    for name in others:  # the split's state.json, dataset_info.json, the image processor, the card: small
        target = folder / name
        if same_pull and target.exists():
            kept += 1
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        part = target.with_name(target.name + ".part")
        store.fetch(name, part)
        fetched, fetched_bytes = fetched + 1, fetched_bytes + part.stat().st_size
        part.replace(target)
    wanted = set(chunks) | set(others) | {PULL_MARKER}
    for name in _local_files(folder):
        if name not in wanted:  # a file of the revision pulled before
            (folder / name).unlink()
    return {
        "fetched_files": fetched,
        "fetched_bytes": fetched_bytes,
        "kept_files": kept,
        "verify_seconds": verify_seconds,
    }


def _fetch_verified(store, name: str, target: Path, chunk: dict, address: str) -> float:
    """Fetch one chunk to TARGET.part, check its size and sha256, and rename it in place; a damaged or missing object
    is fetched once more, then refused. Returns the seconds spent hashing."""
    target.parent.mkdir(parents=True, exist_ok=True)
    part = target.with_name(target.name + ".part")
    hashing = 0.0
    for attempt in (1, 2):
        try:
            store.fetch(name, part, again=attempt > 1)
        except Missing:
            if attempt == 2:
                part.unlink(missing_ok=True)
                raise KdcacheError(
                    f"object '{name}' is missing from '{address}' (asked twice); the remote cache is incomplete: "
                    "push it again from a complete copy"
                ) from None
            continue
        started = time.monotonic()
        good = part.stat().st_size == chunk["bytes"] and _sha256(part) == chunk["sha256"]
        hashing += time.monotonic() - started
        if good:
            part.replace(target)
            return hashing
        if attempt == 1:
            log.warning(
                f"kdcache: '{name}' of '{address}' does not match its sha256 in the manifest; fetching it again"
            )
    part.unlink(missing_ok=True)
    raise KdcacheError(
        f"object '{name}' of '{address}' does not match its sha256 in the manifest (fetched twice); the remote "
        "cache is damaged: push it again from a complete copy"
    )
