"""Shared fixtures: a tiny embedded world (built once per session, in seconds) and quiet, 2-core torch."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # models come from local paths; never reach for a hub

import pytest
import torch

torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def world_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("p2o-cache")


@pytest.fixture(scope="session")
def tiny_world(world_cache):
    """Path of the embedded world built from TEST_RECIPE: the real build code path, a model of a few K params."""
    from p2o_lightning.tasks.world import TEST_RECIPE, build_world

    return build_world(TEST_RECIPE, cache_dir=world_cache, log=lambda msg: None)
