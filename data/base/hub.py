"""Load models, tokenizers and datasets from a local path or the Hugging Face hub; save models.

Every loader accepts either a local path or a hub id. When neither works (no
such path, and the hub cannot be reached or does not have it), the user gets a
`UserError` that says to pass a local path, never a stack of network errors.
"""

from __future__ import annotations

import json

import os
from pathlib import Path

from twophase.data.base.errors import UserError


OFFLINE_HINT = ("pass a local path, or pre-download it where there is network (hf download NAME, then HF_HUB_OFFLINE=1 "
                "on the compute node; launch/README.md: 'Offline machines and compute nodes')")
_OFFLINE_VARIABLES = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE")


def hub_offline() -> bool:
    """Whether the hub is out of reach: an offline variable says so, or its host does not answer within 3 s.

    Asked once per process. Without this, transformers and datasets retry an unreachable hub for
    about a minute (22 retry lines) before failing; offline, they read only the local cache, at once.
    """
    global _offline
    if _offline is None:
        _offline = any(os.environ.get(v, "").lower() in ("1", "true", "yes", "on") for v in _OFFLINE_VARIABLES)
        if not _offline:
            _offline = not _answers(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
        if _offline:
            _go_offline()
    return _offline


_offline: bool | None = None


def _answers(endpoint: str) -> bool:
    import socket
    from urllib.parse import urlparse

    url = urlparse(endpoint)
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout=3).close()
    except (OSError, ValueError):
        return False
    return True


def _go_offline() -> None:
    """Tell the hub libraries to read their caches only (they read these flags at each call)."""
    os.environ["HF_HUB_OFFLINE"] = "1"  # for libraries imported from now on
    for module, attribute in (("huggingface_hub.constants", "HF_HUB_OFFLINE"), ("datasets.config", "HF_HUB_OFFLINE"),
                              ("datasets.config", "HF_DATASETS_OFFLINE"), ("transformers.utils.hub", "_is_offline_mode")):  # fmt: skip
        try:
            target = __import__(module, fromlist=[attribute])
        except ImportError:
            continue
        if hasattr(target, attribute) and isinstance(getattr(target, attribute), bool):
            setattr(target, attribute, True)


def _unreachable(kind: str, name: str, err: Exception) -> UserError:
    if looks_like_path(name):
        return _missing_path(kind, name)
    if _offline:
        download = f"--repo-type dataset {name}" if kind == "dataset" else name
        return UserError(f"cannot load {kind} '{name}': the hub is not reachable (offline) and it is not in the local "
                         f"cache; {OFFLINE_HINT.replace('NAME', download)}")  # fmt: skip
    reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return UserError(
        f"cannot load {kind} '{name}': it is not a local path and the hub did not provide it "
        f"({reason[:200]}). Pass a local path (a directory saved with save_pretrained / a data file), "
        f"or make the hub reachable."
    )


DATA_FILE_SUFFIXES = (".json", ".jsonl", ".jsonl.gz", ".gz", ".csv", ".yaml")


def looks_like_path(name: str) -> bool:
    """A hub id is `name` or `namespace/name`; anything else can only be meant as a path,
    so a typo in a path is reported as a missing file rather than sent to the hub."""
    text = str(name)
    return (
        text.startswith(("/", ".", "~"))
        or text.count("/") > 1
        or "\\" in text
        or text.endswith(DATA_FILE_SUFFIXES)
    )


def _missing_path(kind: str, name: str) -> UserError:
    return UserError(f"{kind} path '{name}' does not exist; pass an existing local directory or a hub id")


def check_path_exists(kind: str, name: str) -> None:
    """A name that can only be meant as a path must exist: said at once, before anything is loaded."""
    if looks_like_path(name) and not Path(name).expanduser().exists():
        raise _missing_path(kind, name)


def is_local(name: str | os.PathLike) -> bool:
    return Path(name).expanduser().exists()


def quiet_transformers_bars() -> None:
    """Hide transformers' own progress bars ("Loading weights", "Writing model shards"): a run loads and saves
    models many times (every eval stage, every merge) and the bars pile up between the lines that matter.
    Download bars of the hub stay: a 7B download takes minutes and should show its progress."""
    from huggingface_hub import utils as hub_utils
    from transformers.utils import logging as transformers_logging

    downloads_shown = not hub_utils.are_progress_bars_disabled()
    transformers_logging.disable_progress_bar()  # also turns the hub's bars off ...
    if downloads_shown:
        hub_utils.enable_progress_bars()  # ... so turn those back on


def load_tokenizer(name: str):
    from transformers import AutoTokenizer

    if not is_local(name):
        hub_offline()
    try:
        tokenizer = AutoTokenizer.from_pretrained(os.path.expanduser(name))
    except (OSError, ValueError) as err:
        raise _unreachable("tokenizer", name, err) from None
    if tokenizer.pad_token is None:
        # Llama-style tokenizers ship without a pad token; padding is always masked.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_causal_lm(name: str, dtype=None, device=None, attn_implementation: str | None = None):
    """Load a causal LM for training or inference; `dtype` is a torch dtype or None (as saved)."""
    from transformers import AutoModelForCausalLM

    quiet_transformers_bars()
    kwargs = {}
    if dtype is not None:
        kwargs["dtype"] = dtype
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    from safetensors import SafetensorError

    if not is_local(name):
        hub_offline()
    try:
        model = AutoModelForCausalLM.from_pretrained(os.path.expanduser(name), **kwargs)
    except SafetensorError as err:  # a weights file cut short (an interrupted copy or download) or overwritten
        raise UserError(f"model '{name}': a weights file is damaged ({err}); copy or download the model again") from None
    except (OSError, ValueError) as err:
        raise _unreachable("model", name, err) from None
    if device is not None:
        model.to(device)
    return model


def is_adapter_dir(name: str | os.PathLike) -> bool:
    """A LoRA adapter saved by peft (adapter_config.json), rather than a full model."""
    return (Path(name).expanduser() / "adapter_config.json").is_file()


def load_adapter_model(adapter_dir: str, base: str | None = None, dtype=None, device=None):
    """(peft model, tokenizer): the base model (default: the one the adapter records) with the adapter applied, unmerged.

    Unmerged, the model computes W x + (alpha / r) B A x exactly as in training,
    whatever the dtype of W: nothing of the update is lost to rounding W + ΔW.
    """
    import json

    from peft import PeftModel

    config = json.loads((Path(adapter_dir).expanduser() / "adapter_config.json").read_text(encoding="utf-8"))
    base = base or config.get("base_model_name_or_path")
    if not base:
        raise UserError(f"{adapter_dir}/adapter_config.json names no base model; pass the base model explicitly")
    model = load_causal_lm(base, dtype=dtype, device=device)
    has_tokenizer = (Path(adapter_dir).expanduser() / "tokenizer_config.json").exists()
    tokenizer = load_tokenizer(str(adapter_dir) if has_tokenizer else base)
    return PeftModel.from_pretrained(model, os.path.expanduser(adapter_dir)), tokenizer


def load_hub_dataset(dataset_id: str, split: str, **kwargs):
    """`datasets.load_dataset` with one clear error when the hub cannot be reached."""
    try:
        import datasets
    except ImportError as err:  # datasets is a dependency, but keep the message readable
        raise UserError(f"the 'datasets' package is needed to load '{dataset_id}': pip install datasets") from err
    hub_offline()
    try:
        return datasets.load_dataset(dataset_id, split=split, **kwargs)
    except Exception as err:  # datasets raises many types for "offline" and "no such dataset"
        raise _unreachable("dataset", dataset_id, err) from None


TRAINED_FILE = "twophase.json"  # in a model directory twophase wrote: how the model was trained


def save_model(model, tokenizer, target: str | os.PathLike, trained: dict | None = None) -> Path:
    """A model (full, merged, or a peft adapter) and its tokenizer as one `save_pretrained` directory,
    written atomically: a stop while saving leaves the earlier directory, or none, never half of one.

    `trained` ({"phase", "prompt_format", "base_model", "eval_prompt_format"}) is written beside the
    weights as twophase.json, so that `twophase eval` asks in the format the model was trained in.
    """
    from twophase.data.base.files import atomic_directory

    quiet_transformers_bars()
    with atomic_directory(target) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        if trained:
            (Path(tmp) / TRAINED_FILE).write_text(json.dumps(trained, indent=2) + "\n", encoding="utf-8")
    return Path(target)


def how_trained(model: str | os.PathLike) -> dict | None:
    """The twophase.json of a model directory twophase wrote (None for any other model, or an unreadable one)."""
    try:
        recorded = json.loads((Path(model) / TRAINED_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return recorded if isinstance(recorded, dict) else None
