"""The embedded world: a character tokenizer and a small Qwen3 causal LM, warm-started on addition, built by recipe.

No model can be downloaded where this project's default run happens, so the project builds its own, and the run
loads it exactly like a real checkpoint (``AutoModelForCausalLM.from_pretrained`` / ``AutoTokenizer.from_pretrained``).
The warm-up is a plain supervised torch loop on :mod:`p2o_lightning.tasks.addition` examples, chosen so that the
world reproduces P²O's premise:

- the plain prompt is taught to answer **directly**, on easy sizes only: easy problems give mixed groups (GRPO has
  signal), hard ones collapse (every rollout wrong, zero advantage);
- a few instruction phrases (``TAUGHT_TEMPLATES``) are taught a column **scratchpad** on easy *and* hard sizes: a
  latent skill that a template search can elicit; fragments of them are taught too, so unseen phrases sharing
  their words score in between (a landscape a mutation search can climb);
- other instructions, and random phrases made of other words, are taught to answer directly: "any instruction"
  does not work.

The world every machine runs is not built but shipped (:mod:`p2o_lightning.tasks.shipped_world`): a build of this
recipe, weights ``a318d3d3a0d8``. Its report (``python -m p2o_lightning world --report``, K=8, T=1, 40 problems a
row; ``report.md`` beside it): plain prompt 50% on easy (20% of groups all-wrong), 0% on hard (100% all-wrong), 0%
on the zero-padded OOD form; a taught instruction 85–88% on hard, 65% on OOD, 0% on 7-digit operands; unseen
phrases sharing two or more taught words 65–83%, single taught words 2–17%; an instruction taught to answer
directly, or an unrelated one, 0%. A build took 1,056–1,929 s on 2 cores here (docs/experiments.md).

Speed is what shaped it (the first run had to build this and train for minutes within ten): 370 K parameters (3
layers, width 96), responses of at most :data:`MAX_NEW_TOKENS` tokens, examples packed whole into rows of 128
tokens (no padding; a batch mixes every kind of example — batches of one kind, e.g. length-sorted ones, stall
learning), AdamW at 1e-3 for 1,600 steps of 4,096 tokens. The architecture is Qwen3 rather than Qwen2 because, for
a checkpoint whose config says ``model_type: qwen2``, transformers 5's ``AutoTokenizer`` swaps in Qwen2Tokenizer's
byte-level pipeline, which silently drops spaces and newlines from a character vocabulary.

:func:`build_world` still builds the recipe's world (``python -m p2o_lightning world --rebuild``) into ``$P2O_CACHE``
(default ``~/.cache/p2o_lightning``) under ``worlds/<name>-<hash12 of the recipe>``; it is rebuilt only when the
recipe changes, written into a temporary folder beside it and renamed into place under a file lock, so concurrent
builders never see a half-written world. A build is deterministic given the recipe, the number of threads and the
machine: two builds on one machine gave the same weights to the bit, but another CPU (its BLAS kernels) trains
another world from the same recipe (seen here: in-distribution greedy accuracy 0.406 on one machine, world A, 0.336
on the next, world B) — which is why the world ships. ``build.json`` records threads, CPU and versions;
:func:`world_fingerprint` (the weights' hash, printed by ``python -m p2o_lightning world``) says whether two worlds
are the same one, so results name the world they were measured on.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import math
import os
import random
import shutil
import string
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import transformers
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
    Qwen3ForCausalLM,
)

from p2o_lightning.tasks.addition import (
    DIRECT_TEMPLATES,
    EASY_DIGITS,
    HARD_DIGITS,
    INSTRUCTION_VOCABULARY,
    TAUGHT_TEMPLATES,
    UNSEEN_TEMPLATES,
    AdditionTask,
    Problem,
    direct_response,
    make_problem,
    operands,
    sample_operands,
    scratchpad_response,
    world_splits,
)
from p2o_lightning.tasks.base import apply_template
from p2o_lightning.tasks.qwen3 import random_qwen3

__all__ = [
    "DEFAULT_RECIPE",
    "MAX_NEW_TOKENS",
    "TAUGHT_TEMPLATES",
    "TEST_RECIPE",
    "WorldRecipe",
    "build_tokenizer",
    "build_world",
    "default_cache_dir",
    "load_world",
    "measure",
    "report",
]

SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>", "<unk>")
CHARACTERS = string.printable[:95] + "\n"  # printable ASCII (space included) and the newline
# The longest scratchpad response (6-digit operands: 6 records of 5 characters, a 7-digit answer) plus <eos>.
MAX_NEW_TOKENS = 6 * 5 + 7 + 1


@dataclass(frozen=True)
class WorldRecipe:
    """Everything that determines a built world; its hash names the cache folder."""

    name: str = "addition"
    seed: int = 0
    # model (Qwen3 architecture)
    hidden_size: int = 96
    intermediate_size: int = 288
    num_layers: int = 3
    num_heads: int = 3  # head_dim 32: a size vLLM's CPU attention supports (it rejects 24)
    # warm-up (AdamW, linear warm-up then cosine decay to lr / 10)
    steps: int = 1600
    batch_tokens: int = 4096  # tokens per step, packed
    row_tokens: int = 128  # packed row length (longer than any example)
    lr: float = 1e-3
    warmup_steps: int = 50
    weight_decay: float = 0.01
    # data
    direct_digits: tuple[int, int] = EASY_DIGITS
    scratchpad_digits: tuple[int, int] = (EASY_DIGITS[0], HARD_DIGITS[1])
    plain_share: float = 0.5  # plain prompt -> direct answer
    taught_share: float = 0.3  # taught instruction (or a variant of one) -> scratchpad
    # the rest: another instruction (or a random phrase without the taught words) -> direct answer
    noise: float = 0.4  # share of instructions that are varied / random phrases instead of the fixed ones
    format_version: int = 1  # bump when code changes what a recipe builds (data, formats, model)

    def hash(self) -> str:
        """12 hex digits of the SHA-256 of the recipe's JSON."""
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:12]


DEFAULT_RECIPE = WorldRecipe()
TEST_RECIPE = WorldRecipe(
    name="addition-test", hidden_size=32, intermediate_size=64, num_layers=1, num_heads=1, steps=20, batch_tokens=512
)


# --------------------------------------------------------------------------------------------------- tokenizer
def build_tokenizer() -> PreTrainedTokenizerFast:
    """A character-level tokenizer: one id per printable ASCII character and newline, ``<bos>`` prepended."""
    vocab = {token: i for i, token in enumerate([*SPECIAL_TOKENS, *CHARACTERS])}
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tokenizer.decoder = decoders.Fuse()
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", vocab["<bos>"])]
    )
    tokenizer.add_special_tokens(list(SPECIAL_TOKENS))
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        pad_token="<pad>",
        bos_token="<bos>",
        eos_token="<eos>",
        unk_token="<unk>",
        padding_side="left",
        clean_up_tokenization_spaces=False,
    )


# ------------------------------------------------------------------------------------------------ warm-up data
_TAUGHT_WORDS = {word.strip(".?").lower() for phrase in TAUGHT_TEMPLATES for word in phrase.split()}
_OTHER_WORDS = [word for word in INSTRUCTION_VOCABULARY if word not in _TAUGHT_WORDS]


def _phrase(words: Sequence[str]) -> str:
    text = " ".join(words)
    return text[:1].upper() + text[1:] + "."


def _taught_instruction(rng: random.Random, noise: float) -> str:
    """A taught phrase, or (with probability ``noise``) a variant of one.

    A variant keeps each word with probability 0.6, but at least two, and maybe gains an unrelated word. Fragments
    of two or more taught words are taught to elicit the skill; single words never are, so how far an unseen phrase
    gets depends on how many taught words it shares: a landscape a word-level mutation search can climb.
    """
    phrase = rng.choice(TAUGHT_TEMPLATES)
    if rng.random() >= noise:
        return phrase
    words = phrase.rstrip(".?").lower().split()
    keep = [i for i in range(len(words)) if rng.random() < 0.6]
    if len(keep) < 2:
        keep = sorted(rng.sample(range(len(words)), 2))
    kept = [words[i] for i in keep]
    if rng.random() < 0.5:
        kept.insert(rng.randint(0, len(kept)), rng.choice(_OTHER_WORDS))
    return _phrase(kept)


def _direct_instruction(rng: random.Random, noise: float) -> str:
    """An instruction taught to answer directly, or a random phrase of words absent from the taught phrases."""
    if rng.random() >= noise:
        return rng.choice(DIRECT_TEMPLATES)
    return _phrase(rng.sample(_OTHER_WORDS, rng.randint(1, 5)))


def _example(rng: random.Random, recipe: WorldRecipe, held_out: set[tuple[int, int]]) -> tuple[str, str]:
    """One warm-up (prompt text, response) pair; operand pairs of the evaluation/RL splits are never used."""
    kind = rng.random()
    if kind < recipe.plain_share:
        template, scratchpad = "", False
    elif kind < recipe.plain_share + recipe.taught_share:
        template, scratchpad = _taught_instruction(rng, recipe.noise), True
    else:
        template, scratchpad = _direct_instruction(rng, recipe.noise), False
    while True:
        a, b = sample_operands(rng, recipe.scratchpad_digits if scratchpad else recipe.direct_digits)
        if (a, b) not in held_out:
            break
    response = scratchpad_response(a, b) if scratchpad else direct_response(a, b)
    return apply_template(template, make_problem(a, b).prompt), response


def _batches(
    recipe: WorldRecipe, tokenizer: PreTrainedTokenizerFast, rng: random.Random, held_out: set[tuple[int, int]]
) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Endless packed batches ``(input_ids, position_ids, labels)``, each ``[rows, row_tokens]``, loss on responses.

    Examples (``<bos> prompt response <eos>``) are packed whole into rows; position ids restart at 0 with every
    example, which transformers reads as packed sequences (each attends only to itself), so no compute goes to
    padding and a batch mixes every kind of example. The unused tail of a row is one more (ignored) sequence.
    """
    ids = tokenizer.get_vocab()
    bos, eos, pad = tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id
    rows, width = recipe.batch_tokens // recipe.row_tokens, recipe.row_tokens
    pending: list[tuple[list[int], int]] = []
    while True:
        input_ids = torch.full((rows, width), pad, dtype=torch.long)  # [R, T]
        position_ids = torch.zeros((rows, width), dtype=torch.long)  # [R, T]
        labels = torch.full((rows, width), -100, dtype=torch.long)  # [R, T], -100: no loss
        for row in range(rows):
            used = 0
            while True:
                if not pending:
                    prompt, response = _example(rng, recipe, held_out)
                    prompt_ids = [bos] + [ids[c] for c in prompt]
                    pending.append((prompt_ids + [ids[c] for c in response] + [eos], len(prompt_ids)))
                seq, n_prompt = pending[0]
                if len(seq) > width:
                    raise ValueError(f"an example of {len(seq)} tokens does not fit rows of {width}")
                if used + len(seq) > width:
                    break
                pending.pop(0)
                input_ids[row, used : used + len(seq)] = torch.tensor(seq)
                position_ids[row, used : used + len(seq)] = torch.arange(len(seq))
                labels[row, used + n_prompt : used + len(seq)] = input_ids[row, used + n_prompt : used + len(seq)]
                used += len(seq)
            position_ids[row, used:] = torch.arange(width - used)
        yield input_ids, position_ids, labels


# --------------------------------------------------------------------------------------------------- building
def default_cache_dir() -> Path:
    """``$P2O_CACHE``, or ``~/.cache/p2o_lightning``."""
    return Path(os.environ.get("P2O_CACHE") or Path.home() / ".cache" / "p2o_lightning")


def world_path(recipe: WorldRecipe = DEFAULT_RECIPE, cache_dir: str | os.PathLike | None = None) -> Path:
    """Where ``recipe``'s world is (or will be) saved."""
    return Path(cache_dir or default_cache_dir()) / "worlds" / f"{recipe.name}-{recipe.hash()}"


def _make_model(recipe: WorldRecipe, tokenizer: PreTrainedTokenizerFast) -> Qwen3ForCausalLM:
    model = random_qwen3(
        vocab_size=len(tokenizer),
        hidden_size=recipe.hidden_size,
        intermediate_size=recipe.intermediate_size,
        num_layers=recipe.num_layers,
        num_heads=recipe.num_heads,
        head_dim=recipe.hidden_size // recipe.num_heads,
        max_position_embeddings=256,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        seed=recipe.seed,
    )
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


def _lr_factor(step: int, recipe: WorldRecipe) -> float:
    if step < recipe.warmup_steps:
        return (step + 1) / recipe.warmup_steps
    progress = (step - recipe.warmup_steps) / max(1, recipe.steps - recipe.warmup_steps)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))


def warm_up(
    recipe: WorldRecipe, log: Callable[[str], None] = print
) -> tuple[Qwen3ForCausalLM, PreTrainedTokenizerFast]:
    """Build the tokenizer and model and train the model on ``recipe``'s warm-up data (in memory, no caching)."""
    tokenizer = build_tokenizer()
    model = _make_model(recipe, tokenizer)
    held_out = {operands(p) for split in world_splits(recipe.seed).values() for p in split}
    batches = _batches(recipe, tokenizer, random.Random(recipe.seed), held_out)
    optimizer = torch.optim.AdamW(model.parameters(), lr=recipe.lr, betas=(0.9, 0.98), weight_decay=recipe.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: _lr_factor(step, recipe))
    model.train()
    start, running = time.perf_counter(), None
    for step in range(recipe.steps):
        input_ids, position_ids, labels = next(batches)
        loss = model(input_ids=input_ids, position_ids=position_ids, labels=labels, use_cache=False).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        running = loss.item() if running is None else 0.95 * running + 0.05 * loss.item()
        if (step + 1) % 100 == 0 or step + 1 == recipe.steps:
            log(f"warm-up step {step + 1}/{recipe.steps}  loss {running:.4f}  {time.perf_counter() - start:.0f}s")
    model.eval()
    return model, tokenizer


def _cpu_name() -> str:
    """The CPU's model name (``/proc/cpuinfo``; the platform's processor string elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or "unknown"


def world_fingerprint(path: str | os.PathLike) -> str:
    """The first 12 hex digits of the SHA-256 of a saved world's weights: equal for the same world, to the bit."""
    digest = hashlib.sha256()
    with open(Path(path) / "model.safetensors", "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:12]


@contextlib.contextmanager
def _threads(n: int) -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def build_world(
    recipe: WorldRecipe | None = None,
    cache_dir: str | os.PathLike | None = None,
    force: bool = False,
    log: Callable[[str], None] = print,
    threads: int | None = None,
) -> Path:
    """The saved world of ``recipe`` (default :data:`DEFAULT_RECIPE`), built and cached if it is not there yet.

    ``threads``: torch threads of the build (default: every core).

    The folder holds the model and tokenizer (``save_pretrained``), ``recipe.json`` and ``build.json`` (build time,
    versions). Concurrent builders serialise on a lock file beside it; the folder appears atomically, complete.
    """
    recipe = recipe or DEFAULT_RECIPE
    path = world_path(recipe, cache_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    with _file_lock(path.with_name(path.name + ".lock")):
        if path.is_dir() and not force:
            return path
        log(f"building world {path.name} ({recipe})")
        start, cpu_start = time.perf_counter(), time.process_time()
        threads = threads or os.cpu_count() or 1
        with _threads(threads):
            model, tokenizer = warm_up(recipe, log)
        seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
        tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.tmp-"))
        try:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            (tmp / "recipe.json").write_text(json.dumps(asdict(recipe), indent=2) + "\n")
            build = {
                "hash": recipe.hash(),
                "build_seconds": round(seconds, 1),
                "cpu_seconds": round(cpu_seconds, 1),  # summed over threads: wall time on an idle machine x threads
                "parameters": sum(p.numel() for p in model.parameters()),
                "threads": threads,
                "cpu": _cpu_name(),
                "torch": torch.__version__,
                "transformers": transformers.__version__,
            }
            (tmp / "build.json").write_text(json.dumps(build, indent=2) + "\n")
            for item in (tmp, *tmp.iterdir()):  # mkdtemp and safetensors make them private; a cache is for all
                item.chmod(0o755 if item.is_dir() else 0o644)
            if path.exists():  # force: move the old world aside first, then swap the new one in
                old = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.old-"))
                os.replace(path, old / "world")
                shutil.rmtree(old)
            os.replace(tmp, path)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        log(f"built world {path} in {seconds:.0f}s ({cpu_seconds:.0f} CPU-seconds)")
    return path


def load_world(path: str | os.PathLike) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The saved model (eval mode) and tokenizer, loaded exactly like any checkpoint."""
    model = AutoModelForCausalLM.from_pretrained(path)
    model.eval()
    return model, AutoTokenizer.from_pretrained(path)


# ----------------------------------------------------------------------------------------------------- report
@torch.no_grad()
def measure(
    path: str | os.PathLike | tuple[PreTrainedModel, PreTrainedTokenizerBase],
    split_problems: Sequence[Problem],
    template: str = "",
    k: int = 8,
    temperature: float = 1.0,
    max_new_tokens: int = MAX_NEW_TOKENS,
    seed: int = 0,
    prompts_per_batch: int = 16,
) -> dict[str, float]:
    """Sample ``k`` responses per problem under ``template`` and grade them.

    ``path`` is a saved world's folder, or an already loaded ``(model, tokenizer)`` pair (see :func:`load_world`).

    Returns ``success`` (mean reward), ``all_wrong`` (share of problems with no correct rollout: advantage collapse),
    ``all_right`` (share with every rollout correct) and ``n`` (problems).
    """
    model, tokenizer = load_world(path) if isinstance(path, (str, os.PathLike)) else path
    task = AdditionTask()
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    rewards: list[list[float]] = []
    try:
        for i in range(0, len(split_problems), prompts_per_batch):
            problems = split_problems[i : i + prompts_per_batch]
            texts = [apply_template(template, p.prompt) for p in problems]
            batch = tokenizer(texts, return_tensors="pt", padding=True, padding_side="left")
            out = model.generate(
                **batch,
                do_sample=True,
                temperature=temperature,
                top_p=1.0,
                top_k=0,
                num_return_sequences=k,
                max_new_tokens=max_new_tokens,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
            )  # [len(problems) * k, T]
            responses = tokenizer.batch_decode(out[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)
            for j, problem in enumerate(problems):
                rewards.append([task.score(r, problem.answer).reward for r in responses[j * k : (j + 1) * k]])
    finally:
        torch.random.set_rng_state(generator_state)
    n = len(rewards)
    return {
        "success": sum(map(sum, rewards)) / (n * k),
        "all_wrong": sum(max(r) == 0 for r in rewards) / n,
        "all_right": sum(min(r) == 1 for r in rewards) / n,
        "n": n,
    }


def report_rows() -> list[tuple[str, str, str]]:
    """The report's rows: (label, template, split)."""
    return [
        ("plain", "", "easy"),
        ("plain", "", "hard"),
        ("plain", "", "ood"),
        *((f"taught: {t!r}", t, "hard") for t in TAUGHT_TEMPLATES),
        (f"taught: {TAUGHT_TEMPLATES[0]!r}", TAUGHT_TEMPLATES[0], "ood"),
        (f"taught: {TAUGHT_TEMPLATES[0]!r}", TAUGHT_TEMPLATES[0], "7-digit"),
        *((f"unseen, shares words: {t!r}", t, "hard") for t in UNSEEN_TEMPLATES),
        (f"taught direct: {DIRECT_TEMPLATES[0]!r}", DIRECT_TEMPLATES[0], "hard"),
        ("unrelated: 'Please help me.'", "Please help me.", "hard"),
    ]


def report(
    path: str | os.PathLike, k: int = 8, temperature: float = 1.0, n: int = 40, log: Callable[[str], None] = print
) -> list[dict[str, object]]:
    """Measure every :func:`report_rows` row on the first ``n`` problems of its split; print a table as it goes.

    Besides :func:`world_splits`, the rows use ``7-digit``: operands longer than any trained on.
    """
    world = load_world(path)
    seed = json.loads((Path(path) / "recipe.json").read_text())["seed"]
    rng = random.Random(f"addition-7-digit-{seed}")
    splits = {**world_splits(seed), "7-digit": [make_problem(*sample_operands(rng, (7, 7))) for _ in range(n)]}
    log(f"K={k}, T={temperature}, {n} problems per row")
    log(f"| {'prompt':<52} | split   | success | all-wrong | all-right |")
    log(f"|{'-' * 54}|---------|---------|-----------|-----------|")
    rows = []
    with _threads(os.cpu_count() or 1):
        for label, template, split in report_rows():
            result = measure(world, splits[split][:n], template, k=k, temperature=temperature)
            log(
                f"| {label:<52} | {split:<7} | {result['success']:>6.0%} "
                f"| {result['all_wrong']:>8.0%} | {result['all_right']:>8.0%} |"
            )
            rows.append({"prompt": label, "template": template, "split": split, **result})
    return rows
