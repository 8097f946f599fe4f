"""A small Qwen3 from nothing: the one place the package assembles a ``Qwen3Config`` and initialises its weights.

The embedded world (:mod:`~p2o_lightning.tasks.world`), the real-shaped BPE checkpoint
(:mod:`~p2o_lightning.tasks.bpe_checkpoint`) and the benchmarks' large-vocabulary model are all this: a
``Qwen3ForCausalLM`` with tied embeddings (as Qwen3-4B) and as many key-value heads as query heads unless told,
its weights drawn by ``torch.manual_seed(seed)``, so the same arguments give the same weights on every machine.
"""

from __future__ import annotations

import torch
from transformers import Qwen3Config, Qwen3ForCausalLM


def random_qwen3(
    *,
    vocab_size: int,
    hidden_size: int,
    intermediate_size: int,
    num_layers: int,
    num_heads: int,
    head_dim: int,
    max_position_embeddings: int,
    eos_token_id: int | None,
    pad_token_id: int | None,
    bos_token_id: int | None = None,
    num_key_value_heads: int | None = None,
    seed: int = 0,
) -> Qwen3ForCausalLM:
    """A randomly initialised Qwen3 LM with tied embeddings (``num_key_value_heads`` defaults to ``num_heads``)."""
    config = Qwen3Config(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_key_value_heads or num_heads,
        head_dim=head_dim,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=True,
        bos_token_id=bos_token_id,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
    )
    torch.manual_seed(seed)
    return Qwen3ForCausalLM(config)
