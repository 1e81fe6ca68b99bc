"""Where a checkpoint is: a local directory, or a hub repo id fetched into the local cache."""

from __future__ import annotations

import os
import re
from pathlib import Path

from zaya.errors import CheckpointError

DOWNLOAD_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "tokenizer*"]


def resolve(model: str | os.PathLike) -> Path:
    """A local directory, or a hub repo id fetched (with a progress bar) into the local cache."""
    path = Path(model).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise CheckpointError(f"{path} is a file; pass the directory that holds config.json and *.safetensors")
    name = str(model)
    if not re.fullmatch(r"[\w.\-]+/[\w.\-]+", name):
        raise CheckpointError(f"no model directory at {path} (and {name!r} is not a hub repo id like 'Zyphra/ZAYA1-8B')")
    return download(name)


def download(repo_id: str, revision: str | None = None) -> Path:
    # huggingface_hub is imported here, not at start-up: most runs load a local directory
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:  # a model pulled earlier needs no network
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=DOWNLOAD_PATTERNS,
                                      local_files_only=True))
    except (LocalEntryNotFoundError, OSError):
        pass
    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=DOWNLOAD_PATTERNS))
    except LocalEntryNotFoundError as exc:
        raise CheckpointError(f"cannot download {repo_id}: the hub is unreachable (offline?) and it is not in the "
                              f"local cache. Pass a local directory instead, or `zaya pull {repo_id}` when online."
                              ) from exc
    except HfHubHTTPError as exc:
        raise CheckpointError(f"cannot download {repo_id}: {exc}") from exc
    except OSError as exc:
        raise CheckpointError(f"cannot download {repo_id}: {exc}") from exc
