"""The policy as the RL step sees it: a HF causal LM loaded from a path, scored token by token from its hidden states.

:class:`PolicyLogProb` wraps the LM in one ``nn.Module`` whose ``forward`` returns per-token log-probs (and entropy)
of response tokens straight from the decoder's last hidden states and the LM head weight (through the ops of
:mod:`p2o_lightning.ops`: never a tokens × vocab tensor). Given a second prompt for the same responses (P²O's
templated prompt) it runs the decoder on both and scores the two contexts with one ``linear_logprob_multi`` call, so
the LM head weight is streamed once for log π(y|x) and log π(y|t(x)); when log π(y|t(x)) carries a gradient (P²O's
skill anchor) it is scored by a call of its own, so that its graph, and its backward, are apart from log π(y|x)'s.
With ``pack`` the decoder runs on the rows' real tokens packed end to end (:mod:`p2o_lightning.packing`), not on the
padded rows. The forward on the templated prompt is P²O's extra cost over GRPO, measured as ``context_forward`` on the
:class:`~p2o_lightning.stopwatch.Stopwatch` it is given: the decoder, and the LM head where the context has a call
of its own (inside the stacked call the context's share of the head cannot be told apart).

FSDP2 (``fully_shard``, one unit per decoder layer and one for the rest) is applied by :func:`fully_shard_policy`;
:func:`gathered` holds the full parameters for ``generate``, which runs outside the wrapper's forward.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from p2o_lightning.checks import check_model_dir
from p2o_lightning.packing import PositionTally, pack_rows, packing_isolates
from p2o_lightning.stopwatch import Stopwatch, measured

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_model_path(path: str) -> str:
    """The checkpoint folder of ``model``, or an error naming it.

    ``"embedded"`` is the shipped embedded world, checked against its manifest (never built here); any other value
    must be a local HF model folder.
    """
    if path == "embedded":
        from p2o_lightning.tasks.shipped_world import shipped_world

        return str(shipped_world())
    folder = Path(path).expanduser()
    check_model_dir(folder)
    return str(folder)


def load_causal_lm(path: str, dtype: str = "float32", attn_implementation: str | None = None):
    """Load (model, tokenizer) from a local path, or the shipped embedded world for ``"embedded"``."""
    from transformers import AutoModelForCausalLM

    path = resolve_model_path(path)
    kwargs: dict[str, Any] = {"dtype": DTYPES[dtype]}
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    return model, load_tokenizer(path)


def load_tokenizer(path: str):
    """The tokenizer of the model at ``path`` (``"embedded"``: the shipped world), with a pad token (EOS if none)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(path))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def max_positions(path: str) -> int | None:
    """The model's positions (``max_position_embeddings`` of its text config), read from its config alone."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(resolve_model_path(path))
    return getattr(config.get_text_config(), "max_position_embeddings", None)


class PolicyLogProb(nn.Module):
    """Per-token log-prob (and entropy) of response tokens, from the decoder's hidden states and the LM head.

    One module whose ``forward`` does the whole computation, so that DDP and FSDP2 (which gather parameters in a
    module's forward hooks) see the LM head used inside a forward.
    """

    def __init__(self, lm: nn.Module) -> None:
        super().__init__()
        self.lm = lm
        head = lm.get_output_embeddings()
        if getattr(head, "bias", None) is not None:
            raise ValueError("the LM head has a bias; the fused log-prob assumes logits = hidden @ weight.T")
        self._packing: bool | None = None  # packed forwards keep sequences apart (checked on first use)
        self._pad_id = getattr(lm.config.get_text_config(), "pad_token_id", None) or 0  # a packed row's tail

    def _packs(self) -> bool:
        """Whether packed forwards keep their sequences apart here (checked once: :func:`packing_isolates`)."""
        if self._packing is None:
            lm = self.lm
            self._packing = packing_isolates(lm.get_decoder(), lm.config.get_text_config().vocab_size, lm.device)
        return self._packing

    def _response_hidden(
        self, input_ids: Tensor, attention_mask: Tensor, response_len: int, pack: bool, tally: PositionTally | None
    ) -> Tensor:
        """[M, R, H] the hidden states of the positions that predict the response tokens; with ``pack`` from a
        forward on the rows' real tokens packed end to end (:func:`~p2o_lightning.packing.pack_rows`).
        """
        decoder = self.lm.get_decoder()
        if pack and self._packs():
            packed = pack_rows(input_ids, attention_mask, self._pad_id)
            hidden = decoder(
                input_ids=packed.input_ids, position_ids=packed.position_ids, use_cache=False
            ).last_hidden_state  # [r, L, H]
            hidden = packed.unpack(hidden)  # [M, P + R, H], zeros at the padding
            positions, tokens = packed.positions, packed.tokens
        else:
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)  # as generate() numbers left-padded rows
            hidden = decoder(
                input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
            ).last_hidden_state  # [M, P + R, H]
            positions, tokens = input_ids.numel(), None
        if tally is not None:
            tally.add(positions, int(attention_mask.sum()) if tokens is None else tokens)
        return hidden[:, -response_len - 1 : -1]  # [M, R, H]: the positions that predict the response tokens

    def _context_hidden(
        self,
        context_ids: Tensor,
        context_mask: Tensor,
        response_len: int,
        hidden: Tensor,
        rows: Tensor | None,
        pack: bool,
        tally: PositionTally | None,
    ) -> Tensor:
        """[M, R, H] the response's hidden states behind ``context_ids``: a forward over ``rows`` only (those sampled
        under another prompt than they are trained under); every other row's context is its trained prompt, whose
        hidden states ``hidden`` already holds (copied, without gradient).
        """
        if rows is None:
            return self._response_hidden(context_ids, context_mask, response_len, pack, tally)
        out = hidden.detach().clone()
        if not rows.any():  # still one forward (of a row whose context is its own prompt): ranks run in lockstep
            rows = torch.zeros_like(rows)
            rows[0] = True
        out[rows] = self._response_hidden(context_ids[rows], context_mask[rows], response_len, pack, tally).to(
            out.dtype
        )
        return out

    def forward(
        self,
        input_ids: Tensor,  # [M, P + R] prompt (left-padded) then response (right-padded)
        attention_mask: Tensor,  # [M, P + R]
        targets: Tensor,  # [M, R] response ids, ignore_index where masked
        ops: Any,
        temperature: float = 1.0,
        return_entropy: bool = False,
        chunk_size: int = 1024,
        context_ids: Tensor | None = None,  # [M, Pc + R] the same responses behind another prompt (t(x))
        context_mask: Tensor | None = None,  # [M, Pc + R]
        context_rows: Tensor | None = None,  # [M] bool: the rows whose context differs (None: every row)
        context_grad: bool = False,
        head_loss: Any = None,  # p2o_lightning.fused_head.RatioOneLoss [M, R]: the fused head of a single update
        head_dtype: torch.dtype | None = None,  # the fused head's matmul operands (None: the op's default)
        stopwatch: Stopwatch | None = None,  # measures the forward on context_ids as ``context_forward``
        pack: bool = False,  # the decoder on the rows' real tokens packed end to end (p2o_lightning.packing)
        tally: PositionTally | None = None,  # adds up the decoder's positions and real tokens
    ) -> tuple[Tensor, Tensor | None, Tensor | None] | tuple[Tensor, Tensor | None, Tensor | None, Tensor]:
        """``(logp, entropy, context_logp)``, each [M, R] float32 or None; ``context_logp`` is log π of the same
        tokens behind ``context_ids`` (the decoder runs only on ``context_rows``; the other rows' context is the
        trained prompt), scored in the same ``linear_logprob_multi`` call as ``logp``; it carries a
        gradient only with ``context_grad`` (P²O's skill anchor trains the row there too), and is then scored by
        its own ``linear_logprob`` call (its backward apart from ``logp``'s).

        With ``head_loss`` the fourth output is the loss of a single update at ratio 1, whose gradients the fused
        head computed in this pass (``ops.fused_linear_policy_loss``); the log-probs then carry none. The context,
        when given, is scored first (no gradient): the loss's context ratio mask reads it.
        """
        response_len = targets.shape[1]
        hidden = self._response_hidden(input_ids, attention_mask, response_len, pack, tally)  # [M, R, H]
        weight = self.lm.get_output_embeddings().weight  # [V, H]
        kwargs = dict(temperature=temperature, return_entropy=return_entropy, chunk_size=chunk_size)
        if head_loss is not None:
            if context_grad:
                raise ValueError(
                    "the fused head trains log π(y|x) alone: a context with a gradient needs the unfused path"
                )
            context_logp = None
            if context_ids is not None:
                with torch.no_grad(), measured(stopwatch, "context_forward"):
                    context_hidden = self._context_hidden(
                        context_ids, context_mask, response_len, hidden, context_rows, pack, tally
                    )
                    context_logp = ops.linear_logprob(
                        context_hidden, weight, targets, **dict(kwargs, return_entropy=False)
                    )[0]
                head_loss = head_loss.with_context(context_logp)
            loss, logp, entropy = ops.fused_linear_policy_loss(
                hidden, weight, targets, head_loss, head_dtype=head_dtype, **kwargs
            )
            return logp, entropy, context_logp, loss
        if context_ids is None:
            logp, entropy = ops.linear_logprob(hidden, weight, targets, **kwargs)
            return logp, entropy, None
        anchored = context_grad and torch.is_grad_enabled()  # else the context feeds the ratio mask only
        with torch.set_grad_enabled(anchored), measured(stopwatch, "context_forward"):
            context_hidden = self._context_hidden(
                context_ids, context_mask, response_len, hidden, context_rows, pack, tally
            )
            if anchored:  # a head call of its own: the anchor's graph stays apart from log π(y|x)'s
                context_logp = ops.linear_logprob(context_hidden, weight, targets, **dict(kwargs, return_entropy=False))
        if anchored:
            logp, entropy = ops.linear_logprob(hidden, weight, targets, **kwargs)
            return logp, entropy, context_logp[0]
        logp, entropy = ops.linear_logprob_multi(torch.stack([hidden, context_hidden]), weight, targets, **kwargs)
        return logp[0], (entropy[0] if entropy is not None else None), logp[1].detach()


def load_policy(
    path: str, dtype: str, attn_implementation: str | None, gradient_checkpointing: bool, device_mesh=None
) -> tuple[PolicyLogProb, Any]:
    """``(policy, tokenizer)``: the trained policy loaded from ``path`` (train mode; FSDP2-sharded when a device
    mesh is given). The frozen reference is :func:`load_reference`, loaded where it is needed.
    """
    lm, tokenizer = load_causal_lm(path, dtype, attn_implementation)
    if gradient_checkpointing:
        lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        lm.config.use_cache = False
    policy = PolicyLogProb(lm.train())  # from_pretrained returns eval mode
    if device_mesh is not None:  # ModelParallelStrategy: FSDP2, one unit per decoder layer + the rest
        fully_shard_policy(policy, device_mesh)
    return policy, tokenizer


def load_reference(path: str, dtype: str, attn_implementation: str | None) -> PolicyLogProb:
    """The frozen reference: the initial weights at ``path``, eval mode, no grad, outside any optimizer."""
    ref_lm, _ = load_causal_lm(path, dtype, attn_implementation)
    return PolicyLogProb(ref_lm).eval().requires_grad_(False)


def fully_shard_policy(policy: PolicyLogProb, device_mesh) -> None:
    """FSDP2: one ``fully_shard`` unit per decoder layer, and one for the rest (embeddings, norm, LM head), sharded
    over the mesh's ``data_parallel`` ranks. The policy applies no tensor parallelism: a mesh with a
    ``tensor_parallel`` size above 1 is refused, since its ranks would train separate, unsynchronised copies.
    """
    from torch.distributed.fsdp import fully_shard

    names = device_mesh.mesh_dim_names or ()
    tp = device_mesh["tensor_parallel"].size() if "tensor_parallel" in names else 1
    if tp > 1:
        raise ValueError(
            f"the device mesh has tensor_parallel_size={tp}, but the policy applies no tensor parallelism: its "
            f"{tp} ranks per data-parallel group would each train their own copy, never synchronised. Shard over "
            "all ranks: strategy p2o_lightning.sharded.FSDP2Strategy (its default), or ModelParallelStrategy with "
            "data_parallel_size = the number of ranks and tensor_parallel_size=1 (Lightning's 'auto' gives the "
            "devices of a node to tensor parallelism)"
        )
    mesh = device_mesh["data_parallel"] if "data_parallel" in names else None
    layers = getattr(policy.lm.get_decoder(), "layers", None)
    if layers is None:
        raise ValueError("FSDP2 sharding expects the decoder's blocks at `.layers` (Llama / Qwen layout)")
    for layer in layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(policy, mesh=mesh)


@contextmanager
def gathered(policy: PolicyLogProb) -> Iterator[None]:
    """Full parameters for code that runs outside the wrapper's forward (``generate``): FSDP2 all-gathers them here.

    Every FSDP2 unit (each decoder layer, and the root) is all-gathered once on entry and kept whole until the exit
    (``set_reshard_after_forward(False)``, as FSDP2 advises for evaluation): ranks may then run different numbers of
    forwards (a decode loop stops when its rows end; a search's shares differ in size) without a collective in
    between, which would otherwise pair one rank's all-gather with another's and hang or mix steps. On exit the
    units reshard and get back FSDP2's defaults (layers reshard after forward, the root does not).

    Re-entrant: a nested ``gathered`` (a search's evaluation around each ``sample``) gathers once. Without FSDP2,
    nothing happens. Every rank must enter and leave it together: the all-gathers are collectives.
    """
    if not hasattr(policy, "unshard"):
        yield
        return
    from torch.distributed.fsdp import FSDPModule

    depth = getattr(policy, "_p2o_gathered", 0)
    units = [m for m in policy.modules() if isinstance(m, FSDPModule)]
    if depth == 0:
        policy._get_fsdp_state()._lazy_init()  # the root initialises first, or a layer takes itself for the root
        policy.set_reshard_after_forward(False)  # every unit: its full parameters stay between forwards
        for unit in units:
            unit.unshard()
    policy._p2o_gathered = depth + 1
    try:
        yield
    finally:
        policy._p2o_gathered = depth
        if depth == 0:
            for unit in units:
                unit.reshard()
            policy.set_reshard_after_forward(True)  # FSDP2's defaults: the layers reshard after forward ...
            policy.set_reshard_after_forward(False, recurse=False)  # ... the root keeps its parameters for backward
