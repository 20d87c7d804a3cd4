"""The options of caches that travel: where a cache given by address is kept (every command that reads a cache, and
`kdcache pull-cache`), and how `kdcache push-cache` writes one. Each field declared once with its default and help."""

import json
from dataclasses import dataclass
from pathlib import Path

from kdcache.errors import KdcacheError
from kdcache.options.fields import option

STORAGE_OPTIONS_HELP = (
    "fsspec storage options for an s3://, gs://, az:// address, as a JSON object (e.g. "
    '\'{"endpoint_url": "http://localhost:9000"}\'); credentials are otherwise read where their ecosystem keeps them '
    "(the AWS environment or profile, the Hub token), and kdcache never writes them anywhere."
)


def parse_storage_options(text: str | None) -> dict | None:
    """--storage-options JSON: a JSON object, or nothing."""
    if text is None:
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        value = None
    if not isinstance(value, dict):
        raise KdcacheError(
            f"--storage-options '{text}' is not a JSON object; write e.g. '{{\"endpoint_url\": \"http://host:9000\"}}'"
        )
    return value


def storage_options_field():
    return option(None, STORAGE_OPTIONS_HELP, type=str, parse=parse_storage_options, metavar="JSON")


@dataclass
class RemoteOptions:
    """Where a cache given by address (hf://datasets/OWNER/NAME, s3://bucket/prefix, ...) is pulled to and how it is
    reached: the commands that read a cache, `kdcache pull-cache`, and `local_cache`/`pull_cache`."""

    cache_dir: Path | None = option(
        None,
        "Folder where a cache given by address (hf://datasets/OWNER/NAME, s3://...) is pulled once, verified, and "
        "reused while the address holds the same cache.",
        show_default="$KDCACHE_CACHE_DIR, else ~/.cache/kdcache",
    )
    storage_options: dict | None = storage_options_field()


@dataclass
class PushOptions:
    """How `kdcache push-cache` (and `push_cache`) writes a cache to an address."""

    overwrite: bool = option(False, "Replace another cache at the address (its files are removed).")
    private: bool = option(False, "Create the Hub repository private (a repository that exists keeps its setting).")
    storage_options: dict | None = storage_options_field()
