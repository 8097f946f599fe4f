"""Overlong prompts: each split's prompts counted in tokens when the data is set up, and those
that do not fit the model's positions refused (the file and every row named) or, when asked, dropped and counted.

Nothing else stops a prompt longer than the model's positions: transformers prints a "friendly reminder" inside the
progress bar, generates past the positions the model was trained on, and the step takes minutes. The convention is
verl's ``data.max_prompt_length`` and ``data.filter_overlong_prompts``:

- **the limit** of a split (:func:`prompt_limit`) is the model's positions (``max_position_embeddings``, or vLLM's
  ``max_model_len`` when smaller) minus the split's response budget (``max_new_tokens``; ``val_max_new_tokens`` for
  validation splits), or ``data.max_prompt_length`` when that is smaller;
- **a prompt is counted** as the rollout engine encodes it: rendered by the tokenizer's chat template when it has
  one, special tokens included;
- **too long** is an error naming the file, the rows (up to ten, then a count) and their lengths; with
  ``data.filter_overlong_prompts`` those rows are dropped, with a warning that counts them (:func:`fit_split`).

P²O's templates lengthen a prompt during training; those are not checked here (a template is a sentence or two).
"""

from __future__ import annotations

from lightning.pytorch.utilities import rank_zero_warn

MAX_LISTED = 10  # overlong rows listed in one message; the rest are counted


def prompt_limit(positions: int | None, response_tokens: int, max_prompt_length: int | None) -> tuple[int | None, str]:
    """``(limit, why)``: the most tokens a prompt may have, and where that number comes from (None: no limit known).

    ``positions`` is the model's number of positions (None: unknown), ``response_tokens`` the split's response budget.
    """
    room = positions - response_tokens if positions else None
    if room is not None and room < 1:
        raise ValueError(
            f"max_new_tokens={response_tokens} leaves no room for a prompt in the model's {positions} "
            "positions: lower it"
        )
    if max_prompt_length is not None and (room is None or max_prompt_length <= room):
        return max_prompt_length, f"data.max_prompt_length={max_prompt_length}"
    if room is not None:
        return room, f"the model's {positions} positions minus {response_tokens} response tokens"
    return None, ""


def _listed(rows: list[str], lengths: list[int], over: list[int]) -> str:
    listed = ", ".join(f"{rows[i]} ({lengths[i]} tokens)" for i in over[:MAX_LISTED])
    return listed + (f" and {len(over) - MAX_LISTED} more" if len(over) > MAX_LISTED else "")


def fit_split(source: str, rows: list[str], lengths: list[int], limit: int, why: str, drop: bool) -> list[int]:
    """Indices of the prompts of one split (read from ``source``, at ``rows``, ``lengths`` tokens long) to keep.

    All of them when none is longer than ``limit``. Otherwise an error naming the file, how many prompts are too
    long, the limit and ``why``, and the rows (up to ten, then a count); or, with ``drop``, the others, and a warning
    that counts and names the dropped rows.
    """
    over = [i for i, n in enumerate(lengths) if n > limit]
    if not over:
        return list(range(len(lengths)))
    if not drop:
        raise ValueError(
            f"{source}: {len(over)} of {len(rows)} prompts are longer than {limit} tokens ({why}): "
            f"{_listed(rows, lengths, over)}. Shorten or remove them, or set data.filter_overlong_prompts=true to "
            "drop such prompts (counted in a warning)"
        )
    if len(over) == len(lengths):
        raise ValueError(f"{source}: all {len(rows)} prompts are longer than {limit} tokens ({why})")
    rank_zero_warn(
        f"{source}: dropped {len(over)} of {len(rows)} prompts longer than {limit} tokens ({why}; "
        f"data.filter_overlong_prompts): {_listed(rows, lengths, over)}"
    )
    dropped = set(over)
    return [i for i in range(len(lengths)) if i not in dropped]
