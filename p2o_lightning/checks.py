"""Local inputs that the libraries would reject obscurely, checked up front: a model folder and a checkpoint file.

Nothing is downloaded here, so a model path that does not exist would otherwise reach the hub client and come back
as "Repo id must be in the form 'repo_name'…", and a truncated checkpoint as torch's unpickler asking to "file an
issue". These checks name the path and say what is missing, before any model is loaded or rollout sampled.
"""

from __future__ import annotations

import os
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
