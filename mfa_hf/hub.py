"""Whether a hub id can be loaded at all, asked before transformers is imported.

Offline, transformers retries the hub for about a minute before it gives up with an OSError. One
short request answers the same question: when the hub cannot be reached, a model in the local cache
is read from there (`local_files_only`) and a model that is not gives a one-line error at once.
"""

from __future__ import annotations

PROBE_TIMEOUT_S = 5.0


def unreachable_reason(timeout: float = PROBE_TIMEOUT_S) -> str | None:
    """None when the hub answers; else why it cannot be used (offline mode, no connection)."""
    from huggingface_hub import constants
    from huggingface_hub.utils import get_session

    if constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE is set"
    try:
        get_session().head(constants.ENDPOINT, timeout=timeout)
    except Exception as error:  # noqa: BLE001 - any failure to get an answer means "unreachable"
        return f"{constants.ENDPOINT} could not be reached ({type(error).__name__}: {error})"
    return None


def is_cached(repo_id: str) -> bool:
    """Whether the local hub cache holds a snapshot of this model repository."""
    from pathlib import Path

    from huggingface_hub import constants

    folder = Path(constants.HF_HUB_CACHE) / ("models--" + repo_id.replace("/", "--")) / "snapshots"
    return folder.is_dir() and any(folder.iterdir())
