"""--push-to-hub: upload the finished student folder, as it is on disk, to a hub repository.

The Trainer's own push uploads its work folder (checkpoints' parent, with the Trainer's model card and no image
processor) at every save; kdcache uploads once, the folder that `pipeline()` loads, after it is in place.
"""

import logging
from pathlib import Path

from kdcache.errors import KdcacheError, first_line
from kdcache.options.config import CONFIG_FILE, names_local_path

log = logging.getLogger("kdcache")


def push_folder(folder: Path, repo: str) -> str:
    """Create `repo` if needed and upload `folder` to its root; returns the repository's URL. A failure is one line
    that says where the student is and how to push it later: the local folder is complete either way. A
    kdcache_config.yaml that names an absolute path (an input outside the folder's tree) stays on this machine."""
    from huggingface_hub import HfApi

    kept = [CONFIG_FILE] if names_local_path(folder) else None
    if kept:
        log.info(f"{CONFIG_FILE} names a path outside this folder's tree, so it is not pushed")
    try:
        api = HfApi()
        url = api.create_repo(repo, exist_ok=True)
        repo_id = getattr(url, "repo_id", None) or repo  # NAME alone is created under the logged-in account
        api.upload_folder(
            repo_id=repo_id,
            folder_path=str(folder),
            commit_message="Upload student trained by kdcache",
            ignore_patterns=kept,
        )
    except Exception as error:  # no login, no network, no rights: huggingface_hub raises many kinds
        raise KdcacheError(
            f"could not push to hub repository '{repo}' ({type(error).__name__}: {first_line(error)}); the student is "
            f"saved at '{folder}': push it later with 'hf auth login' then 'hf upload {repo} {folder} .'"
        ) from None
    return str(url)
