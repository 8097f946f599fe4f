"""Packed forwards: a micro-batch's sequences laid end to end in rows, so the decoder runs on tokens, not padding.

The log-prob and update forwards take rows laid out as a left-padded prompt then a right-padded response; a micro-batch
of rollouts whose lengths differ (the embedded world's run from 7 to over 50 tokens) is then mostly padding in its
short rows. :func:`pack_rows` takes the real tokens of each row (its attention mask's ones, in order) and packs whole
sequences into rows (first fit, longest first, at the row width from the longest sequence to twice it that leaves the
least padding), with position ids that restart at 0 with every sequence. Transformers reads position ids that
restart inside a row, given no attention mask, as packed sequences: each token attends only to the earlier tokens of
its own sequence (``masking_utils.find_packed_sequence_indices``, for the eager, SDPA, flex and flash attention
implementations alike; the padding-free path of its ``DataCollatorWithFlattening``). The unused tail of a packed row
is one more sequence (pad ids), which no real token sees. :meth:`PackedRows.unpack` puts the decoder's hidden states
back in the padded layout, zeros at the padding, so that everything after the decoder is unchanged: a position's
hidden state is what the padded forward gives it, since positions are numbered from the attention mask there too
(cumsum − 1) and padding is attended by no one. On the embedded world (``configs/toy.yaml``) the update's padding
falls from 43–132% of its real tokens to 2–7%.

:func:`packing_isolates` checks, once per model, that the installed transformers keeps packed sequences apart (two
copies of one short sequence packed in a row must give the same hidden states); a model where it does not falls back
to the padded forward, with a warning.

:class:`PositionTally` counts a stage's forward positions against its real tokens: ``padding_share`` is the
``train/padding_share`` metric of the update (padded positions over real ones).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class PackedRows:
    """A padded [M, S] micro-batch packed into [r, L] rows (:func:`pack_rows`)."""

    input_ids: Tensor  # [r, L] the sequences end to end, pad ids in each row's tail
    position_ids: Tensor  # [r, L] 0, 1, ... restarting with every sequence (and the tail)
    source: Tensor  # [T] each real token's flat index in the padded [M·S] layout, row by row
    target: Tensor  # [T] its flat index in the packed [r·L] layout
    shape: tuple[int, int]  # (M, S) of the padded layout

    @property
    def positions(self) -> int:
        """Positions the packed forward runs on (r·L)."""
        return self.input_ids.numel()

    @property
    def tokens(self) -> int:
        """Real tokens packed (T)."""
        return self.source.numel()

    def unpack(self, hidden: Tensor) -> Tensor:
        """[r, L, H] hidden states of the packed forward → [M, S, H] in the padded layout, zeros at the padding."""
        rows, width = self.shape
        flat = hidden.reshape(-1, hidden.shape[-1]).index_select(0, self.target)  # [T, H]
        out = hidden.new_zeros(rows * width, hidden.shape[-1]).index_copy(0, self.source, flat)
        return out.view(rows, width, hidden.shape[-1])


def first_fit(sizes: list[int], width: int) -> tuple[list[int], list[int]]:
    """Sequences of ``sizes`` tokens packed whole into rows of ``width``, first fit, longest first (ties in order):
    ``(starts, used)``, each sequence's first flat index in the packed layout and each row's tokens.
    """
    used: list[int] = []
    starts = [0] * len(sizes)
    for i in sorted(range(len(sizes)), key=lambda i: -sizes[i]):
        b = next((b for b, u in enumerate(used) if u + sizes[i] <= width), len(used))
        if b == len(used):
            used.append(0)
        starts[i] = b * width + used[b]
        used[b] += sizes[i]
    return starts, used


def packed_width(sizes: list[int]) -> int:
    """The row width that packs ``sizes`` into the fewest positions (:func:`first_fit`), from the longest sequence
    to twice it (the narrowest of equals; at most 33 widths tried): a packed row's attention costs at most that of
    two of the longest rows, and sequences of about one length (most of one batch's) still pair up without padding.
    """
    longest = max(max(sizes, default=0), 1)
    widths = range(longest, 2 * longest + 1, max(1, longest // 32))
    return min(widths, key=lambda w: len(first_fit(sizes, w)[1]) * w)


def pack_rows(input_ids: Tensor, attention_mask: Tensor, pad_id: int = 0) -> PackedRows:
    """Pack the real tokens (``attention_mask`` ones) of each row of ``input_ids`` [M, S] whole into rows of
    :func:`packed_width`, by :func:`first_fit`. One device-to-host copy.
    """
    mask = attention_mask.bool()
    lengths = mask.sum(1)  # [M]
    sizes = lengths.tolist()
    width = packed_width(sizes)
    starts, used = first_fit(sizes, width)
    device = input_ids.device
    source = mask.flatten().nonzero().squeeze(1)  # [T], row by row, in order
    row_of = torch.repeat_interleave(torch.arange(len(sizes), device=device), lengths)  # [T]
    within = torch.arange(source.numel(), device=device) - (lengths.cumsum(0) - lengths)[row_of]  # [T] 0, 1, ...
    target = torch.tensor(starts, device=device, dtype=torch.long)[row_of] + within  # [T]
    cols = torch.arange(width, device=device)
    tail = torch.tensor(used, device=device)[:, None]  # [r, 1]
    position_ids = torch.where(cols >= tail, cols - tail, 0).flatten()  # [r·L]: the tails count from 0
    position_ids[target] = within
    packed = torch.full((len(used) * width,), pad_id, dtype=input_ids.dtype, device=device)
    packed[target] = input_ids.flatten()[source]
    return PackedRows(
        input_ids=packed.view(len(used), width),
        position_ids=position_ids.view(len(used), width),
        source=source,
        target=target,
        shape=tuple(input_ids.shape),
    )


@torch.no_grad()
def packing_isolates(decoder, vocab_size: int, device: torch.device) -> bool:
    """Whether ``decoder`` (a transformers base model) keeps packed sequences apart: two copies of the sequence
    (0, 1, 2) in one row, positions (0, 1, 2, 0, 1, 2), no attention mask, must give the second copy the first's
    hidden states (a copy that saw the first would not). Dropout is off for the check.
    """
    ids = torch.arange(3, device=device) % vocab_size
    training = decoder.training
    decoder.eval()
    try:
        hidden = decoder(
            input_ids=ids.repeat(2)[None], position_ids=torch.arange(3, device=device).repeat(2)[None], use_cache=False
        ).last_hidden_state.float()  # [1, 6, H]
    finally:
        decoder.train(training)
    first, second = hidden[0, :3], hidden[0, 3:]
    scale = first.abs().max().clamp(min=1e-6)
    isolates = bool(((first - second).abs().max() / scale) < 1e-3)
    if not isolates:
        import transformers

        warnings.warn(
            f"transformers {transformers.__version__} does not keep packed sequences apart for this model "
            f"({type(decoder).__name__}, attn_implementation={getattr(decoder.config, '_attn_implementation', None)}): "
            "its log-prob and update forwards run on padded rows instead",
            stacklevel=2,
        )
    return isolates


class PositionTally:
    """Forward positions and real tokens of a stage's decoder forwards, added up."""

    def __init__(self) -> None:
        self.positions = 0
        self.tokens = 0

    def add(self, positions: int, tokens: int) -> None:
        self.positions += positions
        self.tokens += tokens

    @property
    def padding_share(self) -> float:
        """Padded positions over real tokens (0: no padding)."""
        return (self.positions - self.tokens) / max(self.tokens, 1)
