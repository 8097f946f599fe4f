"""Faults a long run meets and survives: a failing teacher, a kill or a full disk while writing, NaN weights."""

import errno
import json
import os
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import lightning as L
import pytest
import torch
from helpers import REPO, small_data, small_module, trainer
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

import p2o_lightning.outputs as outputs
from p2o_lightning.callbacks import P2OCallback
from p2o_lightning.outputs import AtomicCheckpointIO, ExportPolicy
from p2o_lightning.prompt.reflection import TeacherReflection
from p2o_lightning.prompt.schedule import ScheduleSettings
from p2o_lightning.prompt.search import SearchSettings


class _FailingTeacher(BaseHTTPRequestHandler):
    """Answers the start-up check, then fails every reflection the way ``mode`` says."""

    mode = "garbage"
    reflections = 0

    def do_POST(self):  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if body["max_tokens"] != 4:  # not the check
            type(self).reflections += 1
            if self.mode == "500":
                self.send_response(500)
                self.end_headers()
                return
            if self.mode == "slow":
                time.sleep(0.5)
        ok = body["max_tokens"] == 4
        payload = json.dumps({"choices": [{"message": {"content": "ok"}}]}).encode() if ok else b"<html>busy</html>"
        try:
            self.send_response(200)
            self.end_headers()
            self.wfile.write(payload)
        except BrokenPipeError:  # the client gave up on a slow reply
            pass

    def log_message(self, *args):
        pass


@pytest.mark.parametrize("mode", ["garbage", "500", "slow"])
def test_search_survives_a_failing_teacher(tiny_world, tmp_path, mode):
    server = ThreadingHTTPServer(("127.0.0.1", 0), _FailingTeacher)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    _FailingTeacher.mode, _FailingTeacher.reflections = mode, 0
    try:
        teacher = TeacherReflection(f"http://127.0.0.1:{server.server_address[1]}/v1", "m", timeout=0.2, max_retries=0)
        callback = P2OCallback(
            reflection=teacher, schedule=ScheduleSettings(trigger="steps", every_n_steps=2, min_hard_samples=4),
            search=SearchSettings(dev_size=4, max_metric_calls=200, parents_per_iteration=1),
        )  # fmt: skip
        L.seed_everything(0)
        t = trainer(tmp_path, max_steps=2, callbacks=[callback], limit_val_batches=0)
        t.fit(small_module(tiny_world), datamodule=small_data(batch_size=4))  # no crash
    finally:
        server.shutdown()
        server.server_close()
    assert t.global_step == 2 and len(callback.schedule.searches) == 1
    search = callback.schedule.searches[0]
    assert search.error is None and search.templates == [""]  # the search ran, its proposals were skipped
    # every failed reflection is counted; three in a row end the search at the next iteration (gepa retries a failed
    # proposal once on its own, so 2 iterations x 2 calls), far below its 200-call budget
    assert teacher.failures == _FailingTeacher.reflections == 4
    assert search.metric_calls < 200


KILL_DURING_SAVE = """
import os, signal, sys, torch, lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint
sys.path.insert(0, {tests!r})
from helpers import small_data, small_module, trainer

real_save, calls = torch.save, []
def dying_save(obj, f, *args, **kwargs):  # the second checkpoint dies half written, as a kill -9 would leave it
    calls.append(1)
    if len(calls) == 2:
        f.write(b"half a checkpoint" * 1000)
        f.flush()
        os.kill(os.getpid(), signal.SIGKILL)
    return real_save(obj, f, *args, **kwargs)
torch.save = dying_save
ckpt = ModelCheckpoint(dirpath={ckpt!r}, save_last=True, every_n_train_steps=1, save_top_k=0)
t = trainer({root!r}, max_steps=3, callbacks=[ckpt], limit_val_batches=0)
t.fit(small_module({world!r}), datamodule=small_data())
"""


def test_kill_during_checkpoint_write_keeps_the_previous(tiny_world, tmp_path):
    ckpt = tmp_path / "ckpt"
    paths = {"tests": str(REPO / "tests"), "ckpt": str(ckpt), "root": str(tmp_path), "world": str(tiny_world)}
    script = KILL_DURING_SAVE.format(**paths)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert proc.returncode == -9, proc.stderr[-3000:]
    assert [p.name for p in ckpt.iterdir() if not p.name.startswith(".")] == ["last.ckpt"]
    saved = AtomicCheckpointIO().load_checkpoint(ckpt / "last.ckpt")
    assert saved["global_step"] == 1  # the first checkpoint, whole


class _DiskFullFrom(Callback):
    """From RL step ``n`` on, every file the checkpoint writer opens is /dev/full (writes fail with ENOSPC)."""

    def __init__(self, n, monkeypatch):
        self.n, self.monkeypatch = n, monkeypatch

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if pl_module.rollout_steps == self.n:
            self.monkeypatch.setattr(outputs, "open", lambda path, mode: open("/dev/full", mode), raising=False)


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
def test_full_disk_on_checkpoint_names_the_path_and_keeps_the_last_good(tiny_world, tmp_path, monkeypatch):
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, every_n_train_steps=1, save_top_k=0)
    t = trainer(tmp_path, max_steps=3, callbacks=[ckpt, _DiskFullFrom(1, monkeypatch)], limit_val_batches=0)
    with pytest.raises(OSError, match=r"writing checkpoint .*last.ckpt failed .*No space left on device.*untouched"):
        t.fit(small_module(tiny_world), datamodule=small_data())
    monkeypatch.undo()
    assert AtomicCheckpointIO().load_checkpoint(tmp_path / "ckpt" / "last.ckpt")["global_step"] == 1


def test_full_disk_on_export_names_the_path_and_keeps_the_checkpoint(tiny_world, tmp_path, monkeypatch):
    def no_space(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, every_n_train_steps=1, save_top_k=0)
    module = small_module(tiny_world)
    t = trainer(tmp_path, max_steps=2, callbacks=[ckpt, ExportPolicy()], limit_val_batches=0)
    monkeypatch.setattr("transformers.PreTrainedModel.save_pretrained", no_space)
    with pytest.raises(OSError, match=rf"exporting the policy to {tmp_path / 'run' / 'policy'} failed .*No space"):
        t.fit(module, datamodule=small_data())
    assert not (tmp_path / "run" / "policy").exists()
    assert [p.name for p in (tmp_path / "run").iterdir() if p.name.startswith(".policy")] == []  # no half export
    assert AtomicCheckpointIO().load_checkpoint(tmp_path / "ckpt" / "last.ckpt")["global_step"] == 2


class _PoisonWeightsAt(Callback):
    """Write a NaN into one policy weight just before RL step ``n`` (as a bad kernel or bit flip would)."""

    def __init__(self, n):
        self.n = n

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if pl_module.rollout_steps == self.n:
            with torch.no_grad():
                next(pl_module.policy.parameters()).view(-1)[0] = float("nan")


def test_nan_weights_stop_before_the_optimizer_step_naming_it(tiny_world, tmp_path):
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, every_n_train_steps=1, save_top_k=0)
    t = trainer(tmp_path, max_steps=5, callbacks=[ckpt, _PoisonWeightsAt(2)], limit_val_batches=0)
    with pytest.raises(FloatingPointError, match=r"at global step 2"):
        t.fit(small_module(tiny_world), datamodule=small_data())
    saved = AtomicCheckpointIO().load_checkpoint(tmp_path / "ckpt" / "last.ckpt")
    assert saved["global_step"] == 2
    assert all(torch.isfinite(v).all() for v in saved["state_dict"].values() if v.is_floating_point())
