"""Local inputs that the libraries would reject obscurely, checked up front: a model folder and a checkpoint file.

Nothing is downloaded here, so a model path that does not exist would otherwise reach the hub client and come back
as "Repo id must be in the form 'repo_name'…", and a truncated checkpoint as torch's unpickler asking to "file an
issue". These checks name the path and say what is missing, before any model is loaded or rollout sampled.

A checkpoint that does not load is never answered with torch's own message: for a file its safe (weights-only)
unpickler refuses, that message advises retrying with ``weights_only=False``, which runs whatever code the file
holds. :func:`unreadable_checkpoint` says why in one line of its own instead.

A distributed checkpoint (FSDP2: ``last.ckpt`` is a folder of shards) is checked as carefully as a file, without
reading a tensor: torch.distributed.checkpoint's ``.metadata`` lists every shard with the bytes it holds, so a missing
or truncated shard is named before anything loads, and Lightning's ``meta.pt`` (the training state) is checked as a
checkpoint file is (:func:`check_checkpoint_folder`).
"""

from __future__ import annotations

import os
import pickle
import re
import zipfile
from pathlib import Path
from typing import Any

WEIGHT_PATTERNS = ("*.safetensors", "pytorch_model*.bin", "*.safetensors.index.json", "pytorch_model.bin.index.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt")


def check_model_dir(path: str | os.PathLike) -> None:
    """A model folder written by ``save_pretrained``: it exists and holds a config, weights and a tokenizer."""
    folder = Path(path)
    what = "model must be a local folder written by save_pretrained, or 'embedded'; nothing is downloaded"
    if not folder.exists():
        raise FileNotFoundError(f"model path {folder} does not exist ({what})")
    if not folder.is_dir():
        raise ValueError(f"model path {folder} is a file, not a model folder ({what})")
    if not (folder / "config.json").is_file():
        raise ValueError(f"model path {folder} holds no model: no config.json ({what})")
    if not any(any(folder.glob(pattern)) for pattern in WEIGHT_PATTERNS):
        raise ValueError(f"model path {folder} has a config.json but no weights (*.safetensors or pytorch_model*.bin)")
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise ValueError(
            f"model path {folder} holds a model but no tokenizer (none of {', '.join(TOKENIZER_FILES)}); save one "
            f"there with tokenizer.save_pretrained({str(folder)!r})"
        )


def check_checkpoint(checkpoint: Any, path: str | os.PathLike) -> None:
    """A loaded checkpoint is this project's: a Lightning checkpoint of a ``P2OModule`` (``policy.*`` weights)."""
    state = checkpoint.get("state_dict") if isinstance(checkpoint, dict) else None
    if not isinstance(state, dict) or "loops" not in checkpoint:
        keys = sorted(checkpoint)[:8] if isinstance(checkpoint, dict) else type(checkpoint).__name__
        raise ValueError(
            f"{path} is not a checkpoint of p2o-lightning: not a Lightning training checkpoint (holds {keys}); "
            f"resume from a run folder's checkpoints/last.ckpt"
        )
    if not any(key.startswith("policy.") for key in state):
        raise ValueError(
            f"{path} is not a checkpoint of p2o-lightning: a Lightning checkpoint of another module (weights "
            f"{sorted(state)[:3]}…, none under 'policy.')"
        )


CKPT_PATH_KEYWORDS = ("last", "best", "hpc")  # --ckpt_path values Lightning resolves itself, not file names


def unreadable_checkpoint(path: str | os.PathLike, err: BaseException | str) -> ValueError:
    """The error of a checkpoint file that does not load: the file and the cause (``err``, or why torch's loader
    failed) in one line, without torch's advice to load it unsafely (raise it ``from None``: the chained message
    would carry that advice).
    """
    text = str(err).strip()
    refused = re.search(r"Unsupported global: GLOBAL ([\w.]+)", text)
    if refused:
        reason = f"it holds a Python object of type {refused.group(1)}, which no checkpoint of this project holds"
    elif isinstance(err, str):
        reason = err
    elif isinstance(err, pickle.UnpicklingError):
        reason = "it holds pickled data other than tensors and plain values"
    else:
        first = text.splitlines()[0].split(". ")[0][:200] if text else ""
        reason = f"{type(err).__name__}: {first}" if first else type(err).__name__
    return ValueError(
        f"{path} is not a checkpoint of p2o-lightning: it does not load (truncated, corrupt or not a torch file: "
        f"{reason}); resume from a run folder's checkpoints/last.ckpt"
    )


def check_checkpoint_file(path: str | os.PathLike) -> None:
    """``--ckpt_path``, checked before LightningCLI or the trainer reads it: a torch archive that torch's safe
    (weights-only) unpickler loads, holding this project's checkpoint (:func:`check_checkpoint`).

    Lightning's keywords (``last``, ``best``, ``hpc``, ``registry…``) and remote URLs are left to Lightning. The
    tensors are memory-mapped, not read, so a checkpoint of any size is checked in about the time of its unpickling.
    A folder is a distributed checkpoint (:func:`check_checkpoint_folder`).
    """
    text = str(path)
    if text in CKPT_PATH_KEYWORDS or text.startswith("registry") or "://" in text:
        return
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint not found: {path} (--ckpt_path; `--ckpt_path last` resumes a run folder)")
    if path.is_dir():
        check_checkpoint_folder(path)
        return
    check_checkpoint(_load_checked(path), path)


def _load_checked(path: Path) -> Any:
    """A torch file loaded by the safe (weights-only) unpickler, tensors memory-mapped; else a ValueError naming it."""
    import torch

    if not zipfile.is_zipfile(path):  # what torch.save writes; a truncated copy has lost the archive's directory
        raise unreadable_checkpoint(path, "not the zip archive that torch.save writes")
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:  # the unpickler raises many types for a file that is not a whole torch file
        raise unreadable_checkpoint(path, err) from None


DCP_METADATA = ".metadata"  # torch.distributed.checkpoint's index of a folder's shards (written last, by rank 0)
LIGHTNING_META = "meta.pt"  # Lightning's training state beside the shards (loops, callbacks, hyperparameters)


def check_checkpoint_folder(path: str | os.PathLike) -> None:
    """A distributed checkpoint folder, as Lightning's ``ModelParallelStrategy`` writes it: its ``.metadata`` loads,
    every shard it lists is there and holds at least the bytes listed, and ``meta.pt`` is a training checkpoint of
    this project whose weights (listed in ``.metadata``) are the policy's. Reads no tensor.
    """
    from torch.distributed.checkpoint import FileSystemReader

    path = Path(path)
    if not (path / DCP_METADATA).is_file():
        what = "a save that did not finish" if any(path.glob("*.distcp")) else "not a distributed checkpoint"
        raise ValueError(
            f"{path} is not a checkpoint of p2o-lightning: a folder without {DCP_METADATA} ({what}); resume from a "
            "run folder's checkpoints/last.ckpt"
        )
    try:
        metadata = FileSystemReader(path).read_metadata()
    except Exception as err:  # a truncated or foreign .metadata fails to unpickle in many ways
        reason = f"its index of shards does not load ({type(err).__name__}: {str(err)[:200]})"
        raise unreadable_checkpoint(path / DCP_METADATA, reason) from None
    needed: dict[str, int] = {}  # shard file -> bytes the metadata says it holds
    for info in (getattr(metadata, "storage_data", None) or {}).values():
        name, end = getattr(info, "relative_path", None), getattr(info, "offset", 0) + getattr(info, "length", 0)
        if name is not None:
            needed[name] = max(needed.get(name, 0), end)
    for name, size in sorted(needed.items()):
        shard = path / name
        if not shard.is_file():
            raise ValueError(f"{path} is an incomplete distributed checkpoint: its shard {name} is missing")
        if shard.stat().st_size < size:
            raise ValueError(
                f"{path} is an incomplete distributed checkpoint: its shard {name} holds {shard.stat().st_size} of "
                f"the {size} bytes its {DCP_METADATA} lists (truncated: a save or copy that did not finish)"
            )
    meta = path / LIGHTNING_META
    if not meta.is_file():
        raise ValueError(f"{path} is not a checkpoint of p2o-lightning: shards without Lightning's {LIGHTNING_META}")
    checkpoint = _load_checked(meta)
    weights = {key.split(".", 1)[1]: None for key in metadata.state_dict_metadata if key.startswith("state_dict.")}
    if isinstance(checkpoint, dict) and "state_dict" not in checkpoint:
        checkpoint = {**checkpoint, "state_dict": weights}  # the weights are in the shards
    check_checkpoint(checkpoint, path)
