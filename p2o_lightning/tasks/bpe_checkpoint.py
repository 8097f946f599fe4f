"""A small real-shaped checkpoint: a Qwen3-architecture LM with a BPE tokenizer trained here and a chat template.

The embedded world uses a character tokenizer and no chat template; real checkpoints (Qwen3, Qwen2.5-Math) have a
byte-level BPE vocabulary, ChatML special tokens and a ``generation_config.json`` with sampling defaults. This
builds one of those from nothing, so tests and benchmarks exercise the code path of a downloaded model:
``tokenizers`` trains a byte-level BPE on the given texts, ``<|im_start|>`` / ``<|im_end|>`` / ``<|endoftext|>``
are its special tokens with Qwen's ChatML template, and a randomly initialised ``Qwen3ForCausalLM`` (head_dim 32,
tied embeddings, like Qwen3-4B) is saved with ``save_pretrained`` next to it. ``generation_defaults`` go into
``generation_config.json`` (e.g. ``{"repetition_penalty": 1.3}``, the kind of default a trainer must not inherit).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

CHATML_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int = 512):
    """A byte-level BPE ``PreTrainedTokenizerFast`` trained on ``texts``, with ChatML special tokens and template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>"],
        chat_template=CHATML_TEMPLATE,
        padding_side="left",
    )


def build_bpe_checkpoint(
    path: str | os.PathLike,
    texts: Iterable[str],
    vocab_size: int = 512,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 2,
    generation_defaults: dict[str, Any] | None = None,
    seed: int = 0,
) -> Path:
    """Save tokenizer + randomly initialised Qwen3 LM (head_dim 32) to ``path`` (which must not hold a model)."""
    from transformers import GenerationConfig

    from p2o_lightning.tasks.qwen3 import random_qwen3

    path = Path(path)
    if (path / "config.json").exists():
        raise FileExistsError(f"{path} already holds a model; choose another folder")
    tokenizer = train_bpe_tokenizer(texts, vocab_size)
    eos, pad = tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.convert_tokens_to_ids("<|endoftext|>")
    model = random_qwen3(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_layers=num_layers,
        num_heads=num_heads,
        head_dim=32,
        max_position_embeddings=1024,
        eos_token_id=eos,
        pad_token_id=pad,
        seed=seed,
    )
    model.generation_config = GenerationConfig(eos_token_id=[eos, pad], pad_token_id=pad, **(generation_defaults or {}))
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
