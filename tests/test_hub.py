"""Base models named by a Hugging Face Hub id, offline, against a hub cache laid out here by hand: resolved to their
snapshot, loaded, trained, and recorded in the adapter by id (a built-in by its upstream id or its name), so that the
adapter loads elsewhere; an id the cache lacks is a clear error. Online (the library's download stubbed), one process
downloads while the others wait on its lock and then read the cache; the Hub's refusals are clear errors."""

from __future__ import annotations

import fcntl
import hashlib
import json
import shutil
import subprocess
import sys
import threading
from pathlib import Path
from unittest import mock

import pytest
import torch

from dtune.adapters import load_trained, locate
from dtune.assets import declared_base, recorded_base, resolve_model
from dtune.checkpoint import save_adapter
from dtune.errors import ConfigError
from dtune.hub import hub_id, snapshot
from dtune.model import build_model, load_tokenizer, model_dir
from tests.helpers import ENV, SMOKE, compose_config, tiny_overrides

MAIN, TAGGED = "a" * 40, "b" * 40  # commit hashes
SMOLLM2 = "HuggingFaceTB/SmolLM2-135M-Instruct"


@pytest.fixture
def hub_cache(tmp_path: Path, monkeypatch) -> Path:
    """An empty hub cache that huggingface_hub uses from here on, offline. The library reads ``HF_HUB_CACHE`` once, at
    import: its constant is patched for this process, and the variable set for the processes a test launches."""
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache


def publish(cache: Path, repo_id: str, src: Path, commit: str = MAIN, ref: str = "main") -> Path:
    """Lay ``src``'s files out as a download of ``repo_id`` leaves them: content-addressed blobs, a snapshot folder of
    links to them per commit, a ref naming the commit. Returns the snapshot folder."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    folder = repo / "snapshots" / commit
    folder.mkdir(parents=True)
    (repo / "blobs").mkdir(exist_ok=True)
    (repo / "refs").mkdir(exist_ok=True)
    for file in sorted(p for p in src.iterdir() if p.is_file()):
        blob = repo / "blobs" / hashlib.sha256(file.read_bytes()).hexdigest()
        shutil.copyfile(file, blob)
        (folder / file.name).symlink_to(Path("..", "..", "blobs", blob.name))
    (repo / "refs" / ref).write_text(commit)
    return folder


def tiny() -> Path:
    return resolve_model("builtin:tiny-llama")


def test_what_reads_as_a_hub_id(tmp_path: Path, monkeypatch):
    assert hub_id(SMOLLM2) == (SMOLLM2, None)
    assert hub_id("Owner/Name@v1.0") == ("Owner/Name", "v1.0")
    assert hub_id("Owner/Name@refs/pr/1") == ("Owner/Name", "refs/pr/1")
    paths = ["/models/llama", "./Owner/Name", "~/Owner/Name", "a/b/c", "Owner--x/Name", "Owner/..", "llama", "builtin:x"]
    for path in paths:
        assert hub_id(path) is None, path
    monkeypatch.chdir(tmp_path)
    (tmp_path / "Owner" / "Name").mkdir(parents=True)
    assert hub_id("Owner/Name") is None  # an existing folder of that name is a path


def test_what_an_adapter_records_as_its_base(tmp_path: Path):
    assert recorded_base("builtin:smollm2-135m-instruct") == (SMOLLM2, None)  # its upstream id
    assert recorded_base("builtin:tiny-llama") == ("builtin:tiny-llama", None)  # random: dtune builds it anywhere
    assert recorded_base("Owner/Name@v1") == ("Owner/Name", "v1")
    assert recorded_base(str(tmp_path)) is None  # a local directory: PEFT records its path


def test_a_cached_hub_model_loads_offline_and_its_adapter_records_the_id(hub_cache: Path, tmp_path: Path):
    folder = publish(hub_cache, "Owner/Name", tiny())
    cfg = compose_config(tiny_overrides(tmp_path / "run", "model.name_or_path=Owner/Name"))
    assert model_dir(cfg) == folder
    builtin = compose_config(["debug=smoke"])
    assert load_tokenizer(cfg)("hello world").input_ids == load_tokenizer(builtin)("hello world").input_ids
    model = build_model(cfg, torch.device("cpu"))
    save_adapter(model, tmp_path / "adapter")
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert saved["base_model_name_or_path"] == "Owner/Name" and saved["revision"] is None  # not the snapshot path

    # A bare adapter (no training config beside it) loads on the base it names.
    trained = locate(tmp_path / "adapter")
    assert trained.cfg.model.name_or_path == "Owner/Name"
    loaded = load_trained(trained, torch.device("cpu"))
    lora = {name for name, _ in model.named_parameters() if "lora_" in name}
    assert lora and {name for name, _ in loaded.named_parameters() if "lora_" in name} == lora


def test_a_revision_pins_its_snapshot(hub_cache: Path):
    main = publish(hub_cache, "Owner/Name", tiny())
    tagged = publish(hub_cache, "Owner/Name", tiny(), commit=TAGGED, ref="v1")
    assert resolve_model("Owner/Name") == main
    assert resolve_model("Owner/Name@v1") == tagged
    assert resolve_model(f"Owner/Name@{MAIN}") == main
    assert declared_base("Owner/Name", "v1") == "Owner/Name@v1"  # an adapter's pinned revision, back to a name
    with pytest.raises(ConfigError, match="Owner/Name at revision 'v2' is not in the local hub cache"):
        resolve_model("Owner/Name@v2")


def test_an_id_the_cache_lacks_offline_is_a_clear_error(hub_cache: Path, tmp_path: Path):
    cfg = compose_config(tiny_overrides(tmp_path, "model.name_or_path=Nobody/Missing"))
    with pytest.raises(ConfigError) as err:
        load_tokenizer(cfg)
    message = str(err.value)
    for part in ["model.name_or_path", "'Nobody/Missing'", "not in the local hub cache", str(hub_cache), "HF_HUB_OFFLINE"]:
        assert part in message, (part, message)
    with pytest.raises(ConfigError, match="'llama' is no local directory, nor a Hugging Face Hub id"):
        model_dir(compose_config(["model.name_or_path=llama"]))


def test_a_bare_adapter_naming_smollm2_loads_on_the_builtin_when_the_hub_cache_lacks_it(hub_cache: Path, tmp_path: Path):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": SMOLLM2, "revision": None}))
    (adapter / "adapter_model.safetensors").write_bytes(b"")  # locate looks for the file only
    assert locate(adapter).cfg.model.name_or_path == "builtin:smollm2-135m-instruct"
    publish(hub_cache, SMOLLM2, tiny())
    assert locate(adapter).cfg.model.name_or_path == SMOLLM2  # cached: the Hub model itself


def http_error(kind: type[Exception]) -> Exception:
    return kind("refused", response=mock.Mock(status_code=401, headers={}))


def test_online_one_process_downloads_while_the_others_wait_then_read_the_cache(hub_cache: Path, monkeypatch):
    import huggingface_hub
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    folder = publish(hub_cache, "Owner/Name", tiny())  # what the download leaves
    lock = hub_cache / ".locks" / "models--Owner--Name" / "dtune-main.lock"
    calls: list[dict] = []

    def download(repo_id: str, **kwargs):
        with open(lock) as other, pytest.raises(BlockingIOError):  # the library runs under the lock
            fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
        calls.append({"repo_id": repo_id, **kwargs})
        return str(folder)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", download)
    assert snapshot("Owner/Name", "Owner/Name") == folder
    (call,) = calls
    assert call["repo_id"] == "Owner/Name" and not call.get("local_files_only")
    assert "*.safetensors" in call["allow_patterns"] and "*.bin" not in call["allow_patterns"]
    assert "token" not in call  # the library reads HF_TOKEN itself

    # Another process holds the lock: this one waits, then reads the cache without a request to the Hub.
    calls.clear()
    got: dict[str, Path] = {}
    with open(lock) as holder:
        fcntl.flock(holder, fcntl.LOCK_EX)
        waiter = threading.Thread(target=lambda: got.update(path=snapshot("Owner/Name", "Owner/Name")))
        waiter.start()
        waiter.join(0.5)
        assert waiter.is_alive() and not calls  # waiting on the lock
        fcntl.flock(holder, fcntl.LOCK_UN)
    waiter.join(30)
    assert got["path"] == folder and [c.get("local_files_only") for c in calls] == [True]


@pytest.mark.parametrize(
    "error, says",
    [
        ("GatedRepoError", "is gated: accept its terms on https://huggingface.co/Owner/Name and set HF_TOKEN"),
        ("RepositoryNotFoundError", "does not exist, or is private (set HF_TOKEN"),
        ("LocalEntryNotFoundError", "is not in the local hub cache"),
    ],
)
def test_online_refusals_are_clear_errors(hub_cache: Path, monkeypatch, error: str, says: str):
    import huggingface_hub
    from huggingface_hub import constants, errors

    kind = getattr(errors, error)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)

    def download(repo_id: str, **kwargs):
        raise kind("no network") if error == "LocalEntryNotFoundError" else http_error(kind)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", download)
    with pytest.raises(ConfigError, match=r"model\.name_or_path: 'Owner/Name' is not a local directory") as err:
        resolve_model("Owner/Name")
    assert says in str(err.value)


@pytest.mark.integration
def test_dtune_trains_on_a_hub_id_from_the_cache_its_environment_names(hub_cache: Path, tmp_path: Path):
    publish(hub_cache, "Owner/Name", tiny())
    env = {**ENV, "HF_HUB_CACHE": str(hub_cache), "HF_HUB_OFFLINE": "1"}

    def train(name: str, out: Path) -> subprocess.CompletedProcess[str]:
        cmd = [sys.executable, "-m", "dtune", "train", *SMOKE, f"model.name_or_path={name}", f"hydra.run.dir={out}"]
        return subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)

    done = train("Owner/Name", tmp_path / "run")
    assert done.returncode == 0, done.stderr[-3000:]
    recorded = json.loads((tmp_path / "run" / "adapter" / "adapter_config.json").read_text())
    assert recorded["base_model_name_or_path"] == "Owner/Name"
    missing = train("Nobody/Missing", tmp_path / "missing")
    assert missing.returncode == 2 and "'Nobody/Missing'" in missing.stderr and "HF_HUB_OFFLINE" in missing.stderr
