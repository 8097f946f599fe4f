"""Packed forwards (:mod:`p2o_lightning.packing`): the layout by hand, the hidden states of a packed forward equal to
the padded forward's on the embedded world's model (eager and SDPA attention), and the fallback to padded rows where
transformers would let packed sequences see each other. The update's loss and gradients, packed against padded, are
in ``test_trim.py``."""

import pytest
import torch
from torch import nn

from p2o_lightning.packing import PositionTally, first_fit, pack_rows, packed_width, packing_isolates
from p2o_lightning.policy import PolicyLogProb, load_causal_lm


def test_first_fit_and_width_by_hand():
    # longest first (ties in order): 5 -> row 0, 4 -> row 1, 3 -> row 1 (4 + 3 <= 7), 2 -> row 0
    assert first_fit([3, 5, 2, 4], 7) == ([11, 0, 5, 7], [7, 7])
    # rows of the longest (5) would hold one 4-token sequence each; 8 pairs them up
    assert packed_width([4, 4, 4, 4, 5]) == 8
    assert packed_width([3, 3, 3]) == 3 and packed_width([]) == 1


def test_pack_rows_by_hand():
    ids = torch.tensor([[0, 0, 11, 12, 13, 0], [0, 21, 22, 0, 0, 0], [0, 0, 0, 31, 32, 33]])  # 0: padding
    mask = (ids != 0).long()
    packed = pack_rows(ids, mask, pad_id=9)
    # width 3 (one sequence a row, three rows) or 6 (3 + 3 and 2, 12 positions): 9 positions at width 3 win;
    # longest first, ties in row order
    assert packed.input_ids.tolist() == [[11, 12, 13], [31, 32, 33], [21, 22, 9]]
    assert packed.position_ids.tolist() == [[0, 1, 2], [0, 1, 2], [0, 1, 0]]  # the tail counts from 0 too
    assert (packed.positions, packed.tokens) == (9, 8)
    hidden = packed.input_ids.float()[..., None].repeat(1, 1, 2)  # [r, L, 2]: each position's id
    assert packed.unpack(hidden)[..., 0].tolist() == ids.float().tolist()  # back in place, zeros at padding
    # two sequences in a row: positions restart; width 4 and 6 tie at 12 positions, the narrowest wins
    ids = torch.tensor([[0, 11, 12, 13, 14], [0, 0, 21, 22, 23], [0, 0, 31, 32, 33], [0, 0, 0, 0, 41]])
    packed = pack_rows(ids, (ids != 0).long(), pad_id=9)
    assert packed.input_ids.tolist() == [[11, 12, 13, 14], [21, 22, 23, 41], [31, 32, 33, 9]]
    assert packed.position_ids.tolist() == [[0, 1, 2, 3], [0, 1, 2, 0], [0, 1, 2, 0]]


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_packed_forward_equals_the_padded_one(attn):
    lm, _ = load_causal_lm("embedded", attn_implementation=attn)
    policy = PolicyLogProb(lm.eval())
    gen = torch.Generator().manual_seed(0)
    prompt_len, response_len = torch.tensor([3, 9, 5, 2, 7, 4]), torch.tensor([6, 1, 0, 8, 3, 5])
    p, r = 10, 9
    prompt_mask = (torch.arange(p) >= p - prompt_len[:, None]).long()
    response_mask = (torch.arange(r) < response_len[:, None]).long()
    ids = torch.randint(3, lm.config.vocab_size, (6, p + r), generator=gen)
    mask = torch.cat([prompt_mask, response_mask], 1)
    ids = ids.masked_fill(mask == 0, 0)
    padded, packed = PositionTally(), PositionTally()
    with torch.no_grad():
        want = policy._response_hidden(ids, mask, r, pack=False, tally=padded)
        got = policy._response_hidden(ids, mask, r, pack=True, tally=packed)
    assert policy._packing  # this transformers keeps packed sequences apart
    real = torch.cat([prompt_mask[:, -1:], response_mask[:, :-1]], 1).bool()  # positions that predict a response token
    torch.testing.assert_close(got[real], want[real], rtol=1e-5, atol=1e-5)
    assert not got[~real].any()  # padding: zeros
    assert padded.tokens == packed.tokens == int(mask.sum())
    assert padded.positions == 6 * (p + r) and packed.positions < 1.25 * packed.tokens
    assert packed.padding_share == pytest.approx((packed.positions - packed.tokens) / packed.tokens)


class _Leaky(nn.Module):
    """A stand-in decoder that ignores position ids: each token sees every earlier one in its row."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(8, 4)
        self.config = None

    def forward(self, input_ids, position_ids=None, use_cache=False):
        from types import SimpleNamespace

        return SimpleNamespace(last_hidden_state=self.embed(input_ids).cumsum(1))


def test_packing_that_leaks_is_found_and_not_used():
    with pytest.warns(UserWarning, match="does not keep packed sequences apart"):
        assert not packing_isolates(_Leaky(), 8, torch.device("cpu"))
    lm, _ = load_causal_lm("embedded")
    lm.train()  # as the policy trains
    assert packing_isolates(lm.get_decoder(), lm.config.vocab_size, torch.device("cpu"))
    assert lm.get_decoder().training  # the check left the mode as it found it
    policy = PolicyLogProb(lm)
    policy._packing = False  # as if the check had failed: the padded forward, every position counted
    tally = PositionTally()
    ids, mask = torch.ones(2, 5, dtype=torch.long), torch.tensor([[0, 0, 1, 1, 1], [0, 1, 1, 1, 1]])
    policy._response_hidden(ids, mask, 2, pack=True, tally=tally)
    assert (tally.positions, tally.tokens) == (10, 7)
