"""The shipped world: the embedded world's built folder, part of the package, checked against its manifest.

A build of :data:`~p2o_lightning.tasks.world.DEFAULT_RECIPE` is deterministic on one machine but not across
machines: another CPU's BLAS kernels train other weights from the same recipe (docs/experiments.md).
So the world is built once and shipped, and ``model: embedded`` loads this copy on every machine instead of
building its own: the same weights everywhere, and no 3-minute build on a new machine.

The folder is ``p2o_lightning/worlds/<name>-<recipe hash12>/`` (package data): the ``save_pretrained`` model and
tokenizer, ``recipe.json``, ``build.json`` (where and how it was built), ``report.md`` (``python -m p2o_lightning
world --save-report``) and ``manifest.json``, which names the recipe hash and the SHA-256 of every file (the weights'
in full and as the 12-hex fingerprint that results quote). :func:`shipped_world` refuses a copy whose recipe hash is
not the current recipe's (the recipe changed: the shipped world no longer is its world) or whose files do not hash
to the manifest (a corrupted or edited copy), naming both hashes and the folder; it never builds instead.

``python -m p2o_lightning world --rebuild`` builds the recipe's world here (into the cache) and compares it with the
shipped one (:func:`compare_weights`); only ``--ship`` as well replaces the shipped copy (:func:`ship_world`).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file

from p2o_lightning.tasks.world import DEFAULT_RECIPE, WorldRecipe

SHIPPED_ROOT = Path(__file__).resolve().parents[1] / "worlds"
MANIFEST = "manifest.json"
REPORT = "report.md"
WEIGHTS = "model.safetensors"
UNHASHED = (MANIFEST, REPORT)  # written about the world, not part of it
REBUILD = "`python -m p2o_lightning world --rebuild` (then `--rebuild --ship` to replace the shipped copy)"


class ShippedWorldError(RuntimeError):
    """The shipped world is missing, no longer matches the recipe, or does not hash to its manifest."""


def sha256_file(path: str | os.PathLike) -> str:
    """The SHA-256 of a file, 64 hex digits."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _shipped_of(root: Path, name: str) -> list[Path]:
    """The shipped worlds under ``root`` whose manifest names ``name`` (of any recipe hash)."""
    return sorted(p.parent for p in root.glob(f"{name}-*/{MANIFEST}") if read_manifest(p.parent)["name"] == name)


def _world_files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.is_file() and p.name not in UNHASHED)


def write_manifest(folder: str | os.PathLike, recipe: WorldRecipe) -> dict[str, object]:
    """Write ``manifest.json`` for the world in ``folder``, built from ``recipe``; return it."""
    folder = Path(folder)
    files = {name: sha256_file(folder / name) for name in _world_files(folder)}
    manifest = {
        "name": recipe.name,
        "recipe_hash": recipe.hash(),
        "weights_sha256": files[WEIGHTS],
        "fingerprint": files[WEIGHTS][:12],  # what `python -m p2o_lightning world` prints and results quote
        "files": files,
    }
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def read_manifest(folder: str | os.PathLike) -> dict[str, object]:
    return json.loads((Path(folder) / MANIFEST).read_text())


def shipped_world(recipe: WorldRecipe | None = None, root: str | os.PathLike | None = None) -> Path:
    """The folder of the shipped world of ``recipe`` (default :data:`DEFAULT_RECIPE`), checked; or an error.

    Checks, in order: a shipped world of ``recipe.name`` exists under ``root`` (default :data:`SHIPPED_ROOT`); its
    manifest's recipe hash is ``recipe.hash()``; every file it lists (the weights first) has the SHA-256 it records.
    """
    recipe = recipe or DEFAULT_RECIPE
    root = Path(root or SHIPPED_ROOT)
    folder = root / f"{recipe.name}-{recipe.hash()}"
    if not (folder / MANIFEST).is_file():
        others = _shipped_of(root, recipe.name)
        if not others:
            raise ShippedWorldError(
                f"no shipped world {folder.name} in {root}: build the recipe's world with {REBUILD}"
            )
        shipped = read_manifest(others[0])["recipe_hash"]
        raise ShippedWorldError(
            f"the shipped world {others[0]} no longer matches the recipe: recipe hash expected {recipe.hash()} (the "
            f"recipe now), found {shipped} (the recipe it was built from). Restore the recipe, or build its world "
            f"with {REBUILD}"
        )
    manifest = read_manifest(folder)
    if manifest["recipe_hash"] != recipe.hash():
        raise ShippedWorldError(
            f"the shipped world {folder} no longer matches the recipe: recipe hash expected {recipe.hash()} (the "
            f"recipe now), found {manifest['recipe_hash']} (its manifest). Build the recipe's world with {REBUILD}"
        )
    files: dict[str, str] = manifest["files"]
    for name in sorted(files, key=lambda n: n != WEIGHTS):  # the weights first: the check that matters most
        found = sha256_file(folder / name) if (folder / name).is_file() else "missing"
        if found != files[name]:
            raise ShippedWorldError(
                f"the shipped world {folder} is corrupted or was changed: {name} has SHA-256 {found}, its manifest "
                f"expects {files[name]}. Restore the folder (`git checkout -- {folder.name}` in its parent, or "
                f"reinstall the package), or replace it with a world built here by {REBUILD}"
            )
    return folder


def compare_weights(a: str | os.PathLike, b: str | os.PathLike) -> dict[str, object]:
    """How far the weights of world folder ``b`` are from those of ``a``.

    ``same_bits``: the files' SHA-256 are equal. Otherwise, over all parameters (``a``'s as the reference):
    ``max_abs`` the largest absolute difference, ``rel_l2`` = ‖b − a‖₂ / ‖a‖₂, ``tensors_differing`` how many
    tensors differ at all; ``comparable`` is False when the two hold different tensors or shapes (other recipes).
    """
    a, b = Path(a) / WEIGHTS, Path(b) / WEIGHTS
    result: dict[str, object] = {"same_bits": sha256_file(a) == sha256_file(b)}
    left, right = load_file(a), load_file(b)
    shapes = {k: v.shape for k, v in left.items()}
    result["comparable"] = shapes == {k: v.shape for k, v in right.items()}
    if not result["comparable"]:
        return result
    diff_sq, ref_sq, max_abs, differing = 0.0, 0.0, 0.0, 0
    for key, x in left.items():
        x, y = x.double(), right[key].double()
        delta = y - x
        diff_sq += float(delta.square().sum())
        ref_sq += float(x.square().sum())
        max_abs = max(max_abs, float(delta.abs().max())) if delta.numel() else max_abs
        differing += int(not torch.equal(x, y))
    result.update(max_abs=max_abs, rel_l2=(diff_sq / ref_sq) ** 0.5 if ref_sq else 0.0, tensors_differing=differing)
    result["tensors"] = len(left)
    return result


def describe_comparison(result: dict[str, object], built: Path, shipped: Path) -> str:
    """One paragraph on how the world built here relates to the shipped one."""
    if result["same_bits"]:
        return f"same weights as the shipped world {shipped} (SHA-256 equal): this machine builds the shipped world"
    if not result["comparable"]:
        return f"the built world {built} and the shipped world {shipped} hold different tensors: other recipes"
    return (
        f"the built world differs from the shipped world {shipped}: {result['tensors_differing']} of "
        f"{result['tensors']} tensors differ, max |Δ| {result['max_abs']:.3g}, relative L2 {result['rel_l2']:.3g}. "
        "Another CPU (its BLAS kernels) trains another world from the same recipe; `model: embedded` keeps loading "
        "the shipped one, results measured on this build are another world's (quote its fingerprint)"
    )


def ship_world(built: str | os.PathLike, recipe: WorldRecipe, root: str | os.PathLike | None = None) -> Path:
    """Copy the built world ``built`` of ``recipe`` into ``root`` as the shipped world, with a new manifest.

    Any other shipped world of ``recipe.name`` is removed (a world of an older recipe). The new folder is written
    beside the old and renamed into place. Its ``report.md`` is not carried over: a report describes other weights.
    """
    built, root = Path(built), Path(root or SHIPPED_ROOT)
    root.mkdir(parents=True, exist_ok=True)
    target = root / f"{recipe.name}-{recipe.hash()}"
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".{target.name}.tmp-"))
    try:
        for name in _world_files(built):
            shutil.copyfile(built / name, tmp / name)
        write_manifest(tmp, recipe)
        tmp.chmod(0o755)
        for old in [*_shipped_of(root, recipe.name), target]:
            if old.is_dir():
                shutil.rmtree(old)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target
