"""Rollout tokens/s of the ``loop`` engine against HF ``generate``, and what one decode step's sampling costs.

    python benchmarks/bench_rollout.py [--model qwen3-151k] [--prompts 8] [--k 8] [--new-tokens 32] [--rounds 3]

Both engines sample the same prompts (the embedded world's first training prompts, K rollouts each, temperature 1)
from the same weights, rounds interleaved (loop, hf, loop, hf, ...) after one warm-up round each; the table gives
each engine's median seconds per ``generate`` and response tokens per second (tokens up to and including each row's
EOS, as the trainer counts them). ``qwen3-151k`` is Qwen's 151,936-token vocabulary on a 2-layer random Qwen3
(``bench_vs_trl.py`` builds it once): its rows rarely stop early, so every row decodes ``--new-tokens`` tokens.

The second table times one decode step's sampling alone on [M, V] float32 logits: ``torch.multinomial`` over
``exp(log_softmax)`` (what the loop did before issue 26) against :func:`~p2o_lightning.rollout.loop.sample_tokens`,
which draws the same tokens from the same random stream without multinomial's checks and copies.

Run it at one thread (``OMP_NUM_THREADS=1``) on a quiet machine; on a shared one the numbers move with the load.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
import torch  # noqa: E402
from common import environment  # noqa: E402


def load(model: str):
    """``(model, tokenizer)`` of ``embedded`` (the shipped world) or ``qwen3-151k`` (random weights), eval mode."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from p2o_lightning.tasks.shipped_world import shipped_world

    if model == "qwen3-151k":
        from bench_vs_trl import qwen3_151k_path

        path = qwen3_151k_path()
    else:
        path = shipped_world() if model == "embedded" else Path(model)
    tok = AutoTokenizer.from_pretrained(path)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval(), tok


def time_engines(args: argparse.Namespace) -> list[dict]:
    from p2o_lightning.rollout import HFRolloutEngine, LoopRolloutEngine, SamplingParams
    from p2o_lightning.tasks.addition import world_splits

    model, tok = load(args.model)
    prompts = [p.prompt for p in world_splits()["train"][: args.prompts]]
    sampling = SamplingParams(args.k, 1.0, 1.0, args.new_tokens)
    engines = {"loop": LoopRolloutEngine(model, tok), "hf generate": HFRolloutEngine(model, tok)}
    seconds: dict[str, list[float]] = {name: [] for name in engines}
    tokens: dict[str, list[int]] = {name: [] for name in engines}
    for round_ in range(args.rounds + 1):  # round 0 warms up (and runs the loop's first-batch check)
        for name, engine in engines.items():
            torch.manual_seed(round_)
            start = time.perf_counter()
            rollouts = engine.generate(prompts, sampling)
            elapsed = time.perf_counter() - start
            if round_:
                seconds[name].append(elapsed)
                tokens[name].append(int(rollouts.response_mask.sum()))
    rows = []
    for name in engines:
        s, n = statistics.median(seconds[name]), statistics.median(tokens[name])
        rows.append({"engine": name, "rows": len(prompts) * args.k, "tokens": n, "s": s, "tokens_per_s": n / s})
    return rows


def multinomial_reference(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The loop's sampler before issue 26: log-softmax, its ``exp`` and ``torch.multinomial``, then a gather."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    token = torch.multinomial(logp.exp(), num_samples=1)
    return token.squeeze(1), logp.gather(1, token).squeeze(1)


def time_sampling(rows: int, vocab: int, repeats: int) -> list[dict]:
    from p2o_lightning.rollout.loop import sample_tokens

    logits = torch.randn(rows, vocab, generator=torch.Generator().manual_seed(0)) * 4
    samplers = {
        "torch.multinomial (before)": multinomial_reference,
        "sample_tokens": lambda x: sample_tokens(x, 1.0, 1.0),
    }
    times: dict[str, list[float]] = {name: [] for name in samplers}
    draws = {}
    for rep in range(repeats + 1):
        for name, fn in samplers.items():
            torch.manual_seed(rep)
            x = logits.clone()  # sample_tokens may reuse its logits' memory, as the loop lets it
            start = time.perf_counter()
            draws[name] = fn(x)
            if rep:
                times[name].append(time.perf_counter() - start)
    (ref_tok, ref_logp), (tok, logp) = draws.values()
    same = bool(torch.equal(ref_tok, tok) and torch.equal(ref_logp, logp))
    return [
        {"sampler": name, "rows": rows, "vocab": vocab, "ms": 1e3 * statistics.median(t), "same_draws": same}
        for name, t in times.items()
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="qwen3-151k", help="qwen3-151k (random weights), embedded, or a path")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--k", type=int, default=8, help="rollouts per prompt")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds per engine, after one warm-up round")
    parser.add_argument("--sampling-repeats", type=int, default=20)
    args = parser.parse_args()
    env = environment(torch.device("cpu"))
    print(f"{env['device']}, torch {env['torch']}, commit {env['commit']}, {env['date']}")

    rows = time_engines(args)
    print(f"\nRollouts on {args.model}: {args.prompts} prompts x K={args.k}, up to {args.new_tokens} new tokens, T=1")
    print(f"{'engine':<14}{'rows':>6}{'tokens':>8}{'s / generate':>14}{'tokens/s':>10}")
    for r in rows:
        print(f"{r['engine']:<14}{r['rows']:>6}{r['tokens']:>8.0f}{r['s']:>14.3f}{r['tokens_per_s']:>10.0f}")
    loop, hf = rows
    print(f"loop / hf generate: {loop['tokens_per_s'] / hf['tokens_per_s']:.2f}x tokens/s")

    vocab = 151936
    print(f"\nOne decode step's sampling, [{args.prompts * args.k}, {vocab}] float32 logits, T=1")
    print(f"{'sampler':<28}{'ms':>8}  same draws")
    for r in time_sampling(args.prompts * args.k, vocab, args.sampling_repeats):
        print(f"{r['sampler']:<28}{r['ms']:>8.2f}  {r['same_draws']}")


if __name__ == "__main__":
    main()
