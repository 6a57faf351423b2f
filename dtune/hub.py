"""Base models named by a Hugging Face Hub id: ``owner/name``, optionally ``owner/name@revision``.

A ``model.name_or_path`` that names no existing local path and reads as a Hub id is fetched into huggingface_hub's
own cache (``HF_HUB_CACHE``, else ``$HF_HOME/hub``, default ``~/.cache/huggingface/hub``) by ``snapshot_download``,
which keeps one snapshot per commit and never downloads a file twice. Only what dtune loads is fetched: config,
tokenizer and chat-template files and the safetensors weights (a repo's pickled ``*.bin`` weights only where it has
no safetensors; Meta's ``original/`` and Mistral's ``consolidated`` duplicates never). The library reads the token
(``HF_TOKEN`` or a ``hf auth login``) for gated and private repos. Offline (``HF_HUB_OFFLINE=1``) the cache alone
answers, and a model it lacks is a :class:`~dtune.errors.ConfigError` naming the id.

Once per node. Every rank of a job resolves the model itself, under an exclusive file lock per repo and revision in
the hub cache: the first rank there downloads; the others (and other jobs sharing the cache) wait on the lock, then
read the snapshot from the cache without asking the Hub. A file lock rather than "local main downloads, the rest wait
at a barrier": models are resolved where no process group exists (merge, generate, eval, plan) or where rank 0
works alone (the memory plan inside ``Engine.on_main``), where a barrier would hang; a multi-GB download would outlast
a collective's timeout, not a lock; a failed download raises its clear error on each rank instead of leaving the
others waiting; and concurrent jobs on one node (a sweep) are covered too. Offline nothing is written, so no lock is
taken and a read-only shared cache serves.
"""

from __future__ import annotations

import contextlib
import re
from pathlib import Path

from dtune.errors import ConfigError
from dtune.fsutil import file_lock

HUB_ID = re.compile(r"(?P<repo>[A-Za-z0-9][\w.-]*/[\w][\w.-]*)(?:@(?P<revision>[\w][\w./-]*))?")
MODEL_FILES = ["*.json", "*.safetensors", "*.model", "*.tiktoken", "*.txt", "*.jinja", "*.py"]
PICKLED_WEIGHTS = ["*.bin"]
SKIPPED = ["original/*", "consolidated*"]


def hub_id(name_or_path: str) -> tuple[str, str | None] | None:
    """``(repo_id, revision)`` when ``name_or_path`` is no existing local path and reads as ``owner/name[@revision]``;
    else None (a path: absolute, relative, ``~``-prefixed, or an existing folder of that name)."""
    if Path(name_or_path).exists():
        return None
    match = HUB_ID.fullmatch(name_or_path)
    if match is None or ".." in match["repo"] or "--" in match["repo"] or len(match["repo"]) > 96:
        return None
    return match["repo"], match["revision"]


def offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def is_cached(repo_id: str, revision: str | None = None) -> bool:
    """Whether the hub cache holds ``repo_id``'s config at ``revision`` (default: main); nothing is downloaded."""
    from huggingface_hub import try_to_load_from_cache

    return isinstance(try_to_load_from_cache(repo_id, "config.json", revision=revision), str)


def snapshot(name: str, repo_id: str, revision: str | None = None) -> Path:
    """The local snapshot folder of ``repo_id`` at ``revision`` (default: main), downloaded on first use, once per node
    (see the module docstring). ``name``: what the user wrote, for messages.

    Raises :class:`~dtune.errors.ConfigError` naming ``model.name_or_path`` and the id when the model cannot be had:
    offline and not cached, gated or private without a token that may read it, no such repo or revision, the Hub
    unreachable.
    """
    from huggingface_hub import constants
    from huggingface_hub.errors import HfHubHTTPError, HFValidationError, LocalEntryNotFoundError

    try:
        if offline():
            return _fetch(repo_id, revision, local_files_only=True)
        folder, ref = f"models--{repo_id.replace('/', '--')}", re.sub(r"[^\w.-]", "_", revision or "main")
        with file_lock(Path(constants.HF_HUB_CACHE) / ".locks" / folder / f"dtune-{ref}.lock") as waited:
            if waited:  # another process has just fetched it: the cache answers, without a request per rank
                with contextlib.suppress(LocalEntryNotFoundError):
                    return _fetch(repo_id, revision, local_files_only=True)
            return _fetch(repo_id, revision)
    except (HfHubHTTPError, LocalEntryNotFoundError, HFValidationError) as err:
        raise ConfigError(explain(err, name, repo_id, revision)) from err


def _fetch(repo_id: str, revision: str | None, **kwargs: bool) -> Path:
    from huggingface_hub import snapshot_download

    folder = Path(snapshot_download(repo_id, revision=revision, allow_patterns=MODEL_FILES, ignore_patterns=SKIPPED, **kwargs))
    if not any(folder.glob("*.safetensors")):  # an older repo with pickled weights only
        folder = Path(
            snapshot_download(repo_id, revision=revision, allow_patterns=PICKLED_WEIGHTS, ignore_patterns=SKIPPED, **kwargs)
        )
    return folder


def explain(err: Exception, name: str, repo_id: str, revision: str | None) -> str:
    """One line saying why the Hub model ``repo_id`` could not be had, and what to do."""
    from huggingface_hub import constants
    from huggingface_hub.errors import GatedRepoError, LocalEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError

    at = f" at revision '{revision}'" if revision else ""
    head = f"model.name_or_path: '{name}' is not a local directory, and the Hugging Face Hub model {repo_id}{at}"
    if isinstance(err, LocalEntryNotFoundError):
        state = "is incomplete in" if "Incomplete" in type(err).__name__ else "is not in"
        where = f"the local hub cache ({constants.HF_HUB_CACHE})"
        if offline():
            return (
                f"{head} {state} {where} and this machine is offline (HF_HUB_OFFLINE=1): download it where the Hub is "
                f"reachable (hf download {repo_id}) into this cache, point HF_HUB_CACHE at a cache that holds it, or "
                "name a local model directory"
            )
        return f"{head} {state} {where} and the Hub cannot be reached ({str(err).splitlines()[0]})"
    if isinstance(err, GatedRepoError):
        return (
            f"{head} is gated: accept its terms on https://huggingface.co/{repo_id} and set HF_TOKEN (or run hf auth "
            "login) with a token of that account"
        )
    if isinstance(err, RepositoryNotFoundError):
        return f"{head} does not exist, or is private (set HF_TOKEN to a token that may read it)"
    if isinstance(err, RevisionNotFoundError):
        return f"{head} does not exist: {repo_id} has no revision '{revision}'"
    return f"{head} cannot be downloaded ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})"
