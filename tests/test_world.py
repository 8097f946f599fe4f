"""The embedded world: the addition task, its splits, the character tokenizer, the cached warm-up build, the report,
and the shipped copy with its checks."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import random
import shutil
import threading
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from p2o_lightning.policy import resolve_model_path
from p2o_lightning.tasks import addition, shipped_world, world, world_command
from p2o_lightning.tasks.addition import (
    INSTRUCTION_VOCABULARY,
    TAUGHT_TEMPLATES,
    AdditionTask,
    make_problem,
    scratchpad_response,
    world_splits,
)
from p2o_lightning.tasks.base import Problem, Task, apply_template
from p2o_lightning.tasks.world import (
    DEFAULT_RECIPE,
    MAX_NEW_TOKENS,
    TEST_RECIPE,
    WorldRecipe,
    build_tokenizer,
    build_world,
    measure,
    world_fingerprint,
)


@pytest.fixture(scope="module")
def test_world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_world(TEST_RECIPE, cache_dir=tmp_path_factory.mktemp("cache"), log=lambda _: None)


# ------------------------------------------------------------------------------------------------------ task
def test_scratchpad_by_hand() -> None:
    # 56+78: 6+8 = 14 (write 4, carry 1), 5+7+1 = 13 (write 3, carry 1), answer 134
    assert scratchpad_response(56, 78) == "6814 5713\n134"
    # 4821+77: the short operand's missing digits are zeros
    assert scratchpad_response(4821, 77) == "1708 2709 8008 4004\n4898"
    assert scratchpad_response(0, 0) == "0000\n0"


def test_scratchpad_answers_every_sum() -> None:
    rng, task = random.Random(0), AdditionTask()
    for _ in range(500):
        a, b = addition.sample_operands(rng, (1, 7))
        assert task.score(scratchpad_response(a, b), str(a + b)).reward == 1.0


def test_longest_response_fits_max_new_tokens() -> None:
    assert len(scratchpad_response(999_999, 999_999)) + 1 == MAX_NEW_TOKENS  # + <eos>


def test_extract_and_score() -> None:
    task = AdditionTask()
    assert isinstance(task, Task) and task.name == "addition"
    assert task.extract_answer("4898") == "4898"
    assert task.extract_answer("1708 2709 8008 4004\n4898") == "4898"
    assert task.extract_answer("1708 2709 8008 4004\n") is None  # a scratchpad cut short has no final answer line
    assert task.extract_answer("") is None
    right = task.score("1708 2709 8008 4004\n4898", "4898")
    assert right.reward == 1.0 and "is correct" in right.feedback
    wrong = task.score("4897", "4898")
    assert wrong.reward == 0.0 and "'4897' is incorrect" in wrong.feedback and "'4898'" in wrong.feedback
    missing = task.score("17 08", "4898")
    assert missing.reward == 0.0 and missing.feedback.startswith("No final answer")


def test_task_module_is_pure_python() -> None:
    source = Path(addition.__file__).read_text()
    assert "import torch" not in source and "transformers" not in source


def test_splits_are_fixed_disjoint_and_sized() -> None:
    splits = world_splits()
    assert splits == world_splits(0) and splits != world_splits(1)
    sizes = {name: len(problems) for name, problems in splits.items()}
    assert sizes == {"train": 384, "easy": 64, "hard": 64, "ood": 64}
    pairs = [addition.operands(p) for problems in splits.values() for p in problems]
    assert len(pairs) == len(set(pairs))  # disjoint, even across surface forms

    def size(problem: Problem) -> int:
        return max(len(str(n)) for n in addition.operands(problem))

    assert {size(p) for p in splits["easy"]} == {1, 2, 3, 4}
    assert {size(p) for p in splits["hard"]} == {5, 6}
    assert {size(p) > 4 for p in splits["train"]} == {True, False}
    for p in splits["ood"]:  # "04821+00077=": both operands zero-padded to one digit more than the longer one
        a, b = p.prompt.rstrip("=").split("+")
        assert a[0] == b[0] == "0" and len(a) == len(b) == size(p) + 1 <= 6
    for p in (p for problems in splits.values() for p in problems):
        assert sum(addition.operands(p)) == int(p.answer)


def test_vocabulary_hides_the_taught_words() -> None:
    taught = {w.strip(".").lower() for t in TAUGHT_TEMPLATES for w in t.split()}
    assert taught <= set(INSTRUCTION_VOCABULARY)
    assert len(INSTRUCTION_VOCABULARY) >= 3 * len(taught)
    assert all(w == w.lower() and w.isalpha() for w in INSTRUCTION_VOCABULARY)


# ------------------------------------------------------------------------------------------------- tokenizer
def test_tokenizer_round_trip(tmp_path: Path) -> None:
    build_tokenizer().save_pretrained(tmp_path)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path)
    assert tokenizer.chat_template is None and tokenizer.padding_side == "left"
    texts = [world.CHARACTERS, apply_template(TAUGHT_TEMPLATES[0], "4821+77=") + scratchpad_response(4821, 77)]
    for text in texts:
        ids = tokenizer(text)["input_ids"]
        assert ids[0] == tokenizer.bos_token_id and len(ids) == len(text) + 1  # one id per character
        assert tokenizer.decode(ids, skip_special_tokens=True) == text
        assert tokenizer(text, add_special_tokens=False)["input_ids"] == ids[1:]
    batch = tokenizer(["1+1=", "12+1="], padding=True)
    assert batch["input_ids"][0][0] == tokenizer.pad_token_id and batch["attention_mask"][0][0] == 0
    assert tokenizer("é", add_special_tokens=False)["input_ids"] == [tokenizer.unk_token_id]


# ---------------------------------------------------------------------------------------------------- warm-up
def test_packed_batches_match_separate_sequences() -> None:
    tokenizer = build_tokenizer()
    model = world._make_model(TEST_RECIPE, tokenizer).eval()
    input_ids, position_ids, labels = next(world._batches(TEST_RECIPE, tokenizer, random.Random(0), set()))
    assert input_ids.shape == (TEST_RECIPE.batch_tokens // TEST_RECIPE.row_tokens, TEST_RECIPE.row_tokens)
    starts = (position_ids[0] == 0).nonzero().flatten().tolist()
    with torch.no_grad():
        packed = model(input_ids=input_ids[:1], position_ids=position_ids[:1], use_cache=False).logits
        for begin, end in zip(starts[:-1], starts[1:]):
            alone = model(input_ids=input_ids[:1, begin:end]).logits
            torch.testing.assert_close(packed[:, begin:end], alone, atol=1e-5, rtol=1e-5)
    # the loss sees responses and <eos> only
    row = input_ids[0, starts[0] : starts[1]].tolist()
    response = [t for t in labels[0, starts[0] : starts[1]].tolist() if t != -100]
    text = tokenizer.decode(row, skip_special_tokens=True)
    assert tokenizer.decode(response, skip_special_tokens=True) == text.split("=", 1)[1]
    assert response[-1] == tokenizer.eos_token_id


def test_recipe_hash() -> None:
    assert WorldRecipe().hash() == WorldRecipe().hash() and len(WorldRecipe().hash()) == 12
    assert dataclasses.replace(WorldRecipe(), seed=1).hash() != WorldRecipe().hash()


def test_build_world_is_cached_and_loads_like_a_checkpoint(test_world: Path) -> None:
    assert test_world.name == f"{TEST_RECIPE.name}-{TEST_RECIPE.hash()}"
    assert json.loads((test_world / "recipe.json").read_text()) == json.loads(
        json.dumps(dataclasses.asdict(TEST_RECIPE))
    )
    logs: list[str] = []
    assert build_world(TEST_RECIPE, cache_dir=test_world.parents[1], log=logs.append) == test_world
    assert logs == []  # cached: nothing rebuilt
    model = AutoModelForCausalLM.from_pretrained(test_world)
    tokenizer = AutoTokenizer.from_pretrained(test_world)
    assert model.config.model_type == "qwen3" and model.config.vocab_size == len(tokenizer)
    # beside a model's config.json, AutoTokenizer must still load *our* tokenizer (for model_type "qwen2" transformers
    # 5 swaps in Qwen2Tokenizer's byte-level pipeline, which drops spaces and newlines)
    text = apply_template(TAUGHT_TEMPLATES[0], "4821+77=") + scratchpad_response(4821, 77)
    assert tokenizer(text)["input_ids"] == build_tokenizer()(text)["input_ids"]
    assert model.generation_config.eos_token_id == tokenizer.eos_token_id
    assert not [p for p in test_world.parent.iterdir() if p.name.startswith(".")]  # no temp folders left


def test_build_is_deterministic_and_force_rebuilds(tmp_path: Path, test_world: Path) -> None:
    again = build_world(TEST_RECIPE, cache_dir=tmp_path, log=lambda _: None)
    first = AutoModelForCausalLM.from_pretrained(test_world).state_dict()
    second = AutoModelForCausalLM.from_pretrained(again).state_dict()
    assert all(torch.equal(first[name], second[name]) for name in first)
    assert world_fingerprint(again) == world_fingerprint(test_world)  # the weights' hash names the world
    assert json.loads((again / "build.json").read_text())["cpu"]  # the machine that built it, recorded
    stamp = (again / "build.json").stat().st_mtime_ns
    assert build_world(TEST_RECIPE, cache_dir=tmp_path, force=True, log=lambda _: None) == again
    assert (again / "build.json").stat().st_mtime_ns != stamp


def test_concurrent_builders_build_once(tmp_path: Path) -> None:
    logs: list[str] = []
    paths: list[Path] = []
    threads = [
        threading.Thread(target=lambda: paths.append(build_world(TEST_RECIPE, cache_dir=tmp_path, log=logs.append)))
        for _ in range(3)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(set(paths)) == 1 and len(paths) == 3
    assert sum(line.startswith("building") for line in logs) == 1


# ----------------------------------------------------------------------------------------------------- report
def test_measure(test_world: Path) -> None:
    problems = [make_problem(12, 34), make_problem(5, 6), make_problem(100, 1)]
    result = measure(test_world, problems, TAUGHT_TEMPLATES[0], k=4, max_new_tokens=8)
    assert result["n"] == 3
    assert 0.0 <= result["success"] <= 1.0 and result["all_wrong"] + result["all_right"] <= 1.0
    assert measure(test_world, problems, k=4, max_new_tokens=8) == measure(test_world, problems, k=4, max_new_tokens=8)


def test_cli_rebuilds_ships_and_reports(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(world, "DEFAULT_RECIPE", TEST_RECIPE)
    monkeypatch.setattr(shipped_world, "SHIPPED_ROOT", tmp_path / "shipped")
    cache = str(tmp_path / "cache")
    world_command.main(["--rebuild", "--cache-dir", cache, "--report", "--k", "2", "--n", "2"])
    out = capsys.readouterr().out
    assert f"world: {tmp_path / 'cache'}" in out and "build time" in out
    assert "not compared with a shipped world: no shipped world" in out  # nothing shipped yet
    assert "| plain" in out and "taught" in out and out.count("\n| ") >= len(world.report_rows())

    world_command.main(["--rebuild", "--cache-dir", cache, "--ship", "--save-report", "--k", "2", "--n", "2"])
    out = capsys.readouterr().out
    shipped = tmp_path / "shipped" / f"{TEST_RECIPE.name}-{TEST_RECIPE.hash()}"
    assert f"shipped: {shipped}" in out and (shipped / "report.md").read_text().count("\n| ") >= 3

    world_command.main(["--rebuild", "--cache-dir", cache])  # the same machine builds the shipped world again
    assert "same weights as the shipped world" in capsys.readouterr().out
    world_command.main([])  # no build: the shipped world, checked
    out = capsys.readouterr().out
    assert f"world: {shipped}" in out and f"shipped, checked: recipe hash {TEST_RECIPE.hash()}" in out
    with pytest.raises(SystemExit):
        world_command.main(["--ship"])  # replacing the shipped world needs a build


# -------------------------------------------------------------------------------------------- the shipped world
def test_the_shipped_world_loads_and_passes_its_checks(monkeypatch: pytest.MonkeyPatch) -> None:
    path = shipped_world.shipped_world()
    manifest = shipped_world.read_manifest(path)
    assert path.parent == shipped_world.SHIPPED_ROOT and path.name == f"addition-{DEFAULT_RECIPE.hash()}"
    assert manifest["recipe_hash"] == DEFAULT_RECIPE.hash() == json.loads((path / "build.json").read_text())["hash"]
    assert manifest["weights_sha256"] == shipped_world.sha256_file(path / "model.safetensors")
    assert manifest["fingerprint"] == world_fingerprint(path) == manifest["weights_sha256"][:12]
    assert json.loads((path / "recipe.json").read_text()) == json.loads(json.dumps(dataclasses.asdict(DEFAULT_RECIPE)))
    report = (path / "report.md").read_text()
    assert report.startswith(f"# World report: {path.name}, weights {world_fingerprint(path)}")
    # `model: embedded` loads it and never builds
    monkeypatch.setattr(world, "build_world", lambda *a, **k: pytest.fail("model: embedded must not build"))
    assert resolve_model_path("embedded") == str(path)
    model = AutoModelForCausalLM.from_pretrained(path)
    assert model.config.model_type == "qwen3" and 360_000 < model.num_parameters() < 380_000
    text = apply_template(TAUGHT_TEMPLATES[0], "4821+77=")
    assert AutoTokenizer.from_pretrained(path)(text)["input_ids"] == build_tokenizer()(text)["input_ids"]


def _copy_of_the_shipped_world(tmp_path: Path) -> Path:
    shipped = shipped_world.shipped_world()
    return Path(shutil.copytree(shipped, tmp_path / "worlds" / shipped.name))


def test_a_corrupted_copy_is_refused_naming_both_hashes(tmp_path: Path) -> None:
    copy = _copy_of_the_shipped_world(tmp_path)
    expected = shipped_world.read_manifest(copy)["weights_sha256"]
    weights = bytearray((copy / "model.safetensors").read_bytes())
    weights[len(weights) // 2] ^= 0x01  # one bit of one parameter
    (copy / "model.safetensors").write_bytes(bytes(weights))
    found = hashlib.sha256(weights).hexdigest()
    with pytest.raises(shipped_world.ShippedWorldError) as error:
        shipped_world.shipped_world(root=copy.parent)
    message = str(error.value)
    assert f"model.safetensors has SHA-256 {found}, its manifest expects {expected}" in message
    assert str(copy) in message and "corrupted" in message
    # and how far the flipped bit moved the weights, as `world --rebuild` reports it
    diff = shipped_world.compare_weights(shipped_world.shipped_world(), copy)
    assert not diff["same_bits"] and diff["tensors_differing"] == 1 and 0 < diff["rel_l2"] < 1e-3


def test_a_changed_recipe_is_refused_not_rebuilt(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(world, "build_world", lambda *a, **k: pytest.fail("a changed recipe must not build"))
    changed = dataclasses.replace(DEFAULT_RECIPE, steps=DEFAULT_RECIPE.steps + 1)
    with pytest.raises(shipped_world.ShippedWorldError) as error:
        shipped_world.shipped_world(changed)
    message = str(error.value)
    assert "no longer matches the recipe" in message and "--rebuild" in message
    assert f"expected {changed.hash()}" in message and f"found {DEFAULT_RECIPE.hash()}" in message
    # a manifest naming another recipe hash, in a folder of the current name, is refused the same way
    copy = _copy_of_the_shipped_world(tmp_path)
    manifest = shipped_world.read_manifest(copy)
    (copy / "manifest.json").write_text(json.dumps({**manifest, "recipe_hash": "0" * 12}))
    with pytest.raises(shipped_world.ShippedWorldError, match=f"expected {DEFAULT_RECIPE.hash()}.*found 0{{12}}"):
        shipped_world.shipped_world(root=copy.parent)
    with pytest.raises(shipped_world.ShippedWorldError, match="no shipped world"):
        shipped_world.shipped_world(root=tmp_path / "empty")


def test_ship_world_replaces_the_older_recipe(tmp_path: Path, test_world: Path) -> None:
    root = tmp_path / "shipped"
    old = dataclasses.replace(TEST_RECIPE, seed=1)
    shutil.copytree(_copy_of_the_shipped_world(tmp_path), root / f"{old.name}-{old.hash()}")
    shipped_world.write_manifest(root / f"{old.name}-{old.hash()}", old)
    path = shipped_world.ship_world(test_world, TEST_RECIPE, root)
    assert sorted(p.name for p in root.iterdir()) == [path.name]  # the older recipe's world is gone
    assert shipped_world.shipped_world(TEST_RECIPE, root) == path
    assert shipped_world.compare_weights(test_world, path)["same_bits"]
