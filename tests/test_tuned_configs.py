"""The tuned file of a device (p2o_lightning.kernels.tuned_configs): written and read back, the nearest measured N
chosen, a broken file named with its field, and nothing picked for a shape the tuning never measured."""

import json

import pytest
import torch

from p2o_lightning.kernels import tuned_configs

CONFIG = dict(BLOCK_N=64, BLOCK_V=128, BLOCK_H=64, GROUP_N=16, num_warps=8, num_stages=3)
BIG = dict(CONFIG, BLOCK_N=256, BLOCK_H=32, GROUP_N=8)


def entry(n, config, entropy=False, v=151936):
    return dict(dtype="bf16", N=n, V=v, H=4096, entropy=entropy, config=config, ms=1.0, tried=8)


def test_written_file_reads_back_and_the_nearest_n_is_chosen(tmp_path):
    path = tuned_configs.write(
        tmp_path / "cuda-x.json", {"device": "X", "device_kind": "cuda-x"}, [entry(4096, CONFIG), entry(16384, BIG)],
        [entry(16384, BIG)], {"bf16": 2**27},
    )  # fmt: skip
    data = tuned_configs.load(path)
    assert data["format"] == tuned_configs.FORMAT and data["logits_budget"] == {"bf16": 2**27}

    def pick(n, **kw):
        return tuned_configs.select(data, "forward", "bf16", n=n, v=151936, h=4096, entropy=False, **kw)

    assert pick(4096) == CONFIG and pick(2000) == CONFIG  # below the smallest: the smallest
    assert pick(16384) == BIG and pick(9000) == BIG  # log2(9000) is nearer 14 than 12
    assert tuned_configs.select(data, "backward", "bf16", n=512, v=151936, h=4096, entropy=False) == BIG
    # no entry for another V, H, entropy flag or dtype: None (the launcher autotunes)
    assert tuned_configs.select(data, "forward", "bf16", n=4096, v=32768, h=4096, entropy=False) is None
    assert tuned_configs.select(data, "forward", "bf16", n=4096, v=151936, h=4096, entropy=True) is None
    assert tuned_configs.select(data, "forward", "fp16", n=4096, v=151936, h=4096, entropy=False) is None


def test_a_broken_file_is_an_error_naming_the_field(tmp_path):
    path = tmp_path / "cuda-y.json"
    bad = entry(4096, {k: v for k, v in CONFIG.items() if k != "num_stages"})
    path.write_text(json.dumps({"format": 1, "forward": [bad]}))
    with pytest.raises(ValueError, match=r"cuda-y.json: forward\[0\] lacks config.num_stages"):
        tuned_configs.load(path)
    path.write_text("{")
    with pytest.raises(ValueError, match="not valid JSON"):
        tuned_configs.load.__wrapped__(path)


def test_cpu_tensors_have_no_tuned_config():
    cpu = torch.device("cpu")
    assert tuned_configs.lookup("forward", cpu, torch.bfloat16, n=1, v=2, h=3, entropy=False) is None
    assert tuned_configs.logits_budget(cpu, torch.bfloat16) is None


def test_device_kind_is_the_benchmarks_name():
    assert tuned_configs.device_kind("NVIDIA H100 80GB HBM3") == "cuda-nvidia-h100-80gb-hbm3"
