"""Shared fixtures: a tiny embedded world (built once per session, in seconds) and quiet, one-thread torch."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # models come from local paths; never reach for a hub

import pytest
import torch

# one thread: the test models (a few K to 400 K parameters) have little to split, and where the cores are busy (CI,
# the ranks of a multi-process test, other jobs) OpenMP's waiting threads spin: on a shared 2-core machine the short
# P²O fit of test_p2o.py took 58 CPU-s on two threads, 7.5 on one
torch.set_num_threads(1)
if not torch.cuda.is_available():
    # Triton reads this when it is first imported (Lightning imports it): set it before any test module loads, so the
    # kernels run in the interpreter whichever module is collected first
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session")
def world_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("p2o-cache")


@pytest.fixture(scope="session")
def tiny_world(world_cache):
    """Path of the embedded world built from TEST_RECIPE: the real build code path, a model of a few K params."""
    from p2o_lightning.tasks.world import TEST_RECIPE, build_world

    return build_world(TEST_RECIPE, cache_dir=world_cache, log=lambda msg: None)


@pytest.fixture(scope="session")
def default_world():
    """The embedded world of the default run: the shipped one, like `fit` loads."""
    from p2o_lightning.tasks.shipped_world import shipped_world

    return shipped_world()


@pytest.fixture(scope="session")
def math_rows():
    """The repo's own math problems (prompt with the \\boxed{} instruction, exact answer, kind)."""
    from p2o_lightning.tasks.math_data import math_problems

    return math_problems(240, seed=0)


@pytest.fixture(scope="session")
def bpe_checkpoint(tmp_path_factory, math_rows):
    """A Qwen3 checkpoint with a BPE tokenizer trained here, ChatML template, and `repetition_penalty: 1.3` in its
    generation_config.json (a default that rollouts must not inherit)."""
    from p2o_lightning.tasks.bpe_checkpoint import build_bpe_checkpoint

    texts = [f"{r['prompt']} The answer is \\boxed{{{r['answer']}}}." for r in math_rows]
    path = tmp_path_factory.mktemp("bpe") / "qwen3-bpe"
    return build_bpe_checkpoint(path, texts, generation_defaults={"repetition_penalty": 1.3})
