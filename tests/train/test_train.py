"""ARM training on a tiny random CLIP: the loss falls, resume is exact, checkpoints are safe,
and torchrun (gloo, 2 CPU processes) trains."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from armfast.train import TrainConfig, load_checkpoint, save_checkpoint, train
from armfast.train.checkpoint import atomic_write_bytes, list_checkpoints
from armfast.train.data import ResumableBatchSampler, baseline_for_step
from armfast.train.schedule import build_scheduler, load_scheduler_state, scheduler_state, warmup_cosine
from armfast.inference.queries import TextQueries
from armfast.train.trainer import segmentation_loss
from helpers.synthetic_datasets import (TINY_ARM, TINY_SHALLOW, tiny_clip, write_dataset,
                                        write_learnable_coco, write_tiny_clip_dir)

COCO_CLASSES = 171


@pytest.fixture(scope="module")
def coco_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("coco")
    write_learnable_coco(root, n_train=8, n_val=2)
    return root


def random_text(seed=0, n=COCO_CLASSES, dim=32):
    g = torch.Generator().manual_seed(seed)
    return torch.nn.functional.normalize(torch.randn(n, dim, generator=g), dim=-1)


def config(root, out, **kw):
    base = dict(data_root=str(root), out=str(out), steps=6, batch_size=2, lr=3e-3, warmup=2,
                crop=32, base_short=40, shallow_layers=TINY_SHALLOW, workers=0, val_every=0,
                log_every=2, ckpt_every=3, progress=False)
    base.update(kw)
    return TrainConfig(**base)


def run(cfg, seed=0):
    return train(cfg, model=tiny_clip(seed), arm_config=TINY_ARM, text_embeddings=random_text())


def test_loss_decreases(coco_root, tmp_path):
    cfg = config(coco_root, tmp_path / "run", steps=24, batch_size=4, warmup=3, ckpt_every=100)
    result = run(cfg)
    first, last = np.mean(result.losses[:4]), np.mean(result.losses[-4:])
    assert last < 0.5 * first, result.losses
    # the run ends with a checkpoint and a save_pretrained ARM that loads back
    from armfast import ARM

    arm = ARM.from_pretrained(str(result.arm_dir))
    for k, v in result.arm.state_dict().items():
        assert torch.equal(arm.state_dict()[k], v.cpu()), k
    assert [s for s, _ in list_checkpoints(tmp_path / "run" / "checkpoints")] == [24]
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert log[-1]["step"] == 24 and log[-1]["images_per_s"] > 0


def test_resume_reaches_the_same_weights(coco_root, tmp_path):
    kw = dict(steps=6, accum=2, ckpt_every=2)
    whole = run(config(coco_root, tmp_path / "whole", **kw))
    # "killed" after step 3 (between checkpoints at 2 and 4: the checkpoint at 3 is the stop's)
    first = run(config(coco_root, tmp_path / "split", stop_at=3, **kw))
    assert first.step == 3 and first.arm_dir is None
    resumed = run(config(coco_root, tmp_path / "split", resume="latest", workers=2, **kw))
    assert resumed.step == 6
    assert first.losses + resumed.losses == whole.losses
    a, b = whole.arm.state_dict(), resumed.arm.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    ca = load_checkpoint(tmp_path / "whole" / "checkpoints" / "step_00000006.safetensors")
    cb = load_checkpoint(tmp_path / "split" / "checkpoints" / "step_00000006.safetensors")
    for k, v in ca["optimizer"]["state"].items():
        for name, t in v.items():
            assert torch.equal(t, cb["optimizer"]["state"][k][name]), (k, name)
    assert ca["scheduler"] == cb["scheduler"]


def test_resume_refuses_changed_run(coco_root, tmp_path):
    run(config(coco_root, tmp_path / "r", steps=2, ckpt_every=2))
    with pytest.raises(ValueError, match="--batch-size 2 -> 4"):
        run(config(coco_root, tmp_path / "r", steps=4, batch_size=4, resume="latest"))


def test_corrupt_checkpoint_is_refused(coco_root, tmp_path):
    run(config(coco_root, tmp_path / "r", steps=2, ckpt_every=2))
    path = tmp_path / "r" / "checkpoints" / "step_00000002.safetensors"
    data = path.read_bytes()
    # one flipped byte in the tensor data: structurally valid, caught by the checksum
    flipped = bytearray(data)
    flipped[-5] ^= 0xFF
    path.write_bytes(bytes(flipped))
    with pytest.raises(ValueError, match=f"{path.name}.*corrupt.*SHA-256"):
        run(config(coco_root, tmp_path / "r", steps=4, resume="latest"))
    path.write_bytes(data[: len(data) // 2])  # truncated
    with pytest.raises(ValueError, match=f"{path.name} is corrupt or truncated"):
        load_checkpoint(path)
    path.write_bytes(b"")
    with pytest.raises(ValueError, match=path.name):
        load_checkpoint(path)
    from safetensors.torch import save_file

    other = tmp_path / "other.safetensors"
    save_file({"w": torch.zeros(2)}, str(other))
    with pytest.raises(ValueError, match="not an armfast training checkpoint"):
        load_checkpoint(other)
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        load_checkpoint(tmp_path / "missing.safetensors")


def test_checkpoint_round_trip_and_atomic_write(tmp_path):
    p = torch.nn.Parameter(torch.randn(3, 2))
    opt = torch.optim.AdamW([p], lr=0.1)
    sched = build_scheduler(opt, total=10, warmup=2)
    for _ in range(3):
        p.grad = torch.randn_like(p)
        opt.step(), sched.step()
    torch.manual_seed(123)
    expected_next = torch.rand(4)
    torch.manual_seed(123)
    path = save_checkpoint(tmp_path / "c.safetensors", step=3, arm={"w": p.data},
                           optimizer=opt.state_dict(), scheduler=scheduler_state(sched),
                           extra={"note": "x"})
    torch.rand(10)  # move the generator on; loading restores it
    ck = load_checkpoint(path)
    from armfast.train.checkpoint import restore_rng_state

    restore_rng_state(*ck["rng"])
    assert torch.equal(torch.rand(4), expected_next)
    p2 = torch.nn.Parameter(torch.zeros(3, 2))
    opt2 = torch.optim.AdamW([p2], lr=0.1)
    sched2 = build_scheduler(opt2, total=10, warmup=2)
    p2.data.copy_(ck["arm"]["w"])
    opt2.load_state_dict(ck["optimizer"])
    load_scheduler_state(sched2, ck["scheduler"])
    assert sched2.last_epoch == 3 and sched2.get_last_lr() == sched.get_last_lr()
    g = torch.randn_like(p)
    p.grad, p2.grad = g.clone(), g.clone()
    opt.step(), opt2.step()
    assert torch.equal(p, p2)
    assert ck["extra"] == {"note": "x"} and ck["step"] == 3
    assert not [f for f in os.listdir(tmp_path) if ".tmp" in f]  # no temporary left behind
    atomic_write_bytes(tmp_path / "c.safetensors", b"new")
    assert (tmp_path / "c.safetensors").read_bytes() == b"new"


def test_schedule_and_data_order():
    lrs = [warmup_cosine(s, total=10, warmup=2) for s in range(10)]
    assert lrs[0] == 0.5 and lrs[1] == 1.0 and lrs[-1] < 0.05
    assert all(a >= b for a, b in zip(lrs[1:], lrs[2:]))
    data = list(range(9))
    full = ResumableBatchSampler(data, 3, seed=1)
    it = iter(full)
    batches = [next(it) for _ in range(7)]  # crosses an epoch (3 batches per epoch)
    resumed = iter(ResumableBatchSampler(data, 3, seed=1, start=4))
    assert [next(resumed) for _ in range(3)] == batches[4:]
    assert sorted(i for b in batches[:3] for i, _ in b) == sorted(i for b in batches[3:6] for i, _ in b)
    r0 = next(iter(ResumableBatchSampler(data, 2, seed=1, rank=0, world_size=2)))
    r1 = next(iter(ResumableBatchSampler(data, 2, seed=1, rank=1, world_size=2)))
    assert not {i for i, _ in r0} & {i for i, _ in r1}
    with pytest.raises(ValueError, match="fewer than batch_size x world_size"):
        ResumableBatchSampler(data, 5, seed=0, world_size=2)
    picks = {baseline_for_step(("a", "b", "c"), 0, s) for s in range(30)}
    assert picks == {"a", "b", "c"}


def test_loss_helpers():
    q = torch.randn(2, 4, 5, requires_grad=True)
    idx = torch.tensor([0, 1, 1, 2, 2])
    c = TextQueries(torch.zeros(5, 8), idx, 3, ["a", "b", "c"]).per_class_max(q, dim=-1)
    assert torch.equal(c[..., 1], q[..., 1:3].amax(-1)) and torch.equal(c[..., 0], q[..., 0])
    masks = torch.full((2, 8, 8), 255)
    loss = segmentation_loss(c, (2, 2), masks)  # nothing labelled: zero, not NaN
    assert loss.item() == 0.0
    masks[:, :4] = 1
    loss = segmentation_loss(c, (2, 2), masks)
    loss.backward()
    assert torch.isfinite(loss) and q.grad is not None


def test_training_runs_the_inference_crop_forward():
    """The trainer's step (frozen features, then the head DDP wraps, then each class's best
    synonym) computes what the Segmentor's crop forward does, with gradients to ARM only."""
    from armfast import ARM, ARMConfig
    from armfast.bench.workloads import randomize_residual_outputs
    from armfast.inference import CropModel, Segmentor

    clip = tiny_clip()
    torch.manual_seed(0)
    arm = randomize_residual_outputs(ARM(ARMConfig(shallow_layers=TINY_SHALLOW, width=64,
                                                   embed_dim=32, **TINY_ARM)),
                                     torch.Generator().manual_seed(1))
    text, index = torch.randn(5, 32), torch.tensor([0, 1, 1, 2, 2])
    seg = Segmentor(clip, text, class_index=index, baseline="naclip", arm=arm, short_side=0,
                    crop=0)
    crops = torch.randn(2, 3, 32, 32)
    model = CropModel(clip, baseline="sclip", arm=arm)
    with torch.no_grad():
        shallow, deep, grid = model.features(crops, "naclip")  # the step's baseline
    logits = model.head(shallow, deep, seg.text)  # ARM's tau: logit_scale=None
    torch.testing.assert_close(logits.transpose(1, 2).unflatten(-1, grid),
                               seg.crop_logits(crops, scaled=True))
    per_class = seg.queries.per_class_max(logits, dim=-1)
    assert per_class.shape == (2, grid[0] * grid[1], 3) and torch.equal(per_class[..., 1], logits[..., 1:3].amax(-1))
    per_class.sum().backward()
    assert arm.logit_scale.grad is not None and arm.cross_attn.q.weight.grad is not None
    assert all(p.grad is None for p in clip.parameters())


def test_config_errors(tmp_path):
    with pytest.raises(ValueError, match="--baselines: unknown nope"):
        TrainConfig(data_root="x", out="y", baselines="sclip,nope")
    with pytest.raises(ValueError, match="proxyclip needs a vision foundation model"):
        TrainConfig(data_root="x", out="y", baselines="proxyclip")
    with pytest.raises(ValueError, match="--batch-size must be a positive integer"):
        TrainConfig(data_root="x", out="y", batch_size=0)
    assert TrainConfig(data_root="x", out="y", baselines="SCLIP, naclip").baselines == ("sclip", "naclip")


@pytest.mark.gpu
def test_trains_on_cuda_with_bf16(coco_root, tmp_path):
    cfg = config(coco_root, tmp_path / "gpu", steps=4, device="cuda", precision="auto", ckpt_every=2)
    result = run(cfg)
    assert result.arm.logit_scale.device.type == "cuda"
    assert all(np.isfinite(result.losses)) and len(result.losses) == 4
    ck = load_checkpoint(tmp_path / "gpu" / "checkpoints" / "step_00000004.safetensors")
    assert any(k.startswith("rng.cuda.") for k in ck["rng"][0])


@pytest.fixture(scope="module")
def cityscapes_setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("torchrun")
    write_dataset("cityscapes", root / "cs", n=4, size=(40, 48))
    model = write_tiny_clip_dir(root / "clip")
    return root, model


TORCHRUN_ARGS = ["--dataset", "cityscapes", "--steps", "4", "--batch-size", "2", "--crop", "32",
                 "--base-short", "40", "--shallow-layers", "0,1,2", "--workers", "0",
                 "--val-every", "4", "--val-samples", "2", "--val-short-side", "40", "--val-crop", "32",
                 "--val-stride", "16", "--ckpt-every", "2", "--log-every", "2",
                 "--no-progress", "--lr", "1e-3", "--warmup", "1"]


def _train_cli(root, model, out, nproc=None):
    args = ["train", "--data-root", str(root / "cs"), "--out", str(out), "--model", model] + TORCHRUN_ARGS
    if nproc is None:
        cmd = [sys.executable, "-m", "armfast.cli"] + args
    else:
        torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or "torchrun"
        cmd = [torchrun, "--standalone", f"--nproc_per_node={nproc}", "-m", "armfast.cli"] + args
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


def test_torchrun_two_processes(cityscapes_setup):
    root, model = cityscapes_setup
    one = _train_cli(root, model, root / "one")
    two = _train_cli(root, model, root / "two", nproc=2)
    assert "2 process(es) on cpu" in two.stdout
    ck1 = load_checkpoint(root / "one" / "checkpoints" / "step_00000004.safetensors")
    ck2 = load_checkpoint(root / "two" / "checkpoints" / "step_00000004.safetensors")
    assert ck2["extra"]["config"]["world_size"] == 2
    assert {k: v.shape for k, v in ck1["arm"].items()} == {k: v.shape for k, v in ck2["arm"].items()}
    assert not torch.equal(ck1["arm"]["mlp.fc2.weight"], ck2["arm"]["mlp.fc2.weight"])  # trained
    log = [json.loads(line) for line in (root / "two" / "log.jsonl").read_text().splitlines()]
    assert any("val_miou" in r for r in log)  # validation ran sharded over both ranks
    assert (root / "two" / "arm" / "model.safetensors").is_file()
