"""The one error type kdcache raises for a user's mistake, and the helpers that word such errors."""

import os


class KdcacheError(ValueError):
    """A problem with the user's input, reported as one line (no traceback) by the CLI."""


class DataError(KdcacheError):
    """A flaw in the data itself (an unreadable image): the same command meets it again until the data changes, and
    changed data is a new input (its fingerprint changes), so a run refused for it leaves no work to resume."""


def first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0][:200] if text else type(error).__name__


def hub_error(what: str, name_or_path: str, flag: str, error: BaseException) -> KdcacheError:
    """One line for a failed from_pretrained: a folder without the files, custom code, or the hub unreachable."""
    text = str(error)
    if "trust_remote_code" in text:
        return KdcacheError(
            f"{what} '{name_or_path}' needs custom code from its repository; pass --trust-remote-code if you trust it"
        )
    if os.path.isdir(os.path.expanduser(name_or_path)):
        return KdcacheError(
            f"could not load the {what} from the folder '{name_or_path}' ({type(error).__name__}: {first_line(error)}); "
            f"pass a folder written by save_pretrained with {flag}"
        )
    return KdcacheError(
        f"could not load the {what} '{name_or_path}' from the hub (no network, or no such repository) and there is "
        f"no local folder of that name; pass a local folder with {flag}"
    )
