"""MeanIoU against an independent numpy computation; input checks; merging; protocol table."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from armfast.eval import MeanIoU, PROTOCOLS, Protocol, get_protocol
from helpers.iou import numpy_iou


@pytest.mark.parametrize("C", [1, 2, 7, 21])
def test_matches_numpy(C):
    rng = np.random.default_rng(C)
    m = MeanIoU(C)
    preds, targets = [], []
    for shape in [(5, 7), (2, 3, 4), (9,)]:
        t = rng.integers(0, C, shape)
        t[rng.random(shape) < 0.2] = 255
        p = np.where(rng.random(shape) < 0.6, t, rng.integers(0, C, shape))
        p[t == 255] = rng.integers(0, C, shape)[t == 255]
        preds.append(p), targets.append(t)
        m.update(torch.from_numpy(p), torch.from_numpy(t).to(torch.uint8) if C < 255 else t)
    ref = numpy_iou(preds, targets, C)
    out = m.compute()
    np.testing.assert_allclose(out["per_class"], ref, rtol=1e-12, equal_nan=True)
    assert out["miou"] == pytest.approx(np.nanmean(ref), rel=1e-12)


def test_absent_classes_are_nan_and_left_out():
    m = MeanIoU(4)
    m.update(torch.tensor([0, 0, 1, 1]), torch.tensor([0, 0, 1, 0]))
    out = m.compute()
    assert out["per_class"][0] == pytest.approx(200 / 3)
    assert out["per_class"][1] == pytest.approx(50.0)
    assert math.isnan(out["per_class"][2]) and math.isnan(out["per_class"][3])
    assert out["miou"] == pytest.approx((200 / 3 + 50) / 2)
    assert out["aacc"] == pytest.approx(75.0) and out["pixels"] == 4


def test_predictions_on_ignored_pixels_do_not_count():
    m = MeanIoU(2)
    m.update(torch.tensor([1, 1, 0]), torch.tensor([255, 255, 0]))
    assert m.compute()["per_class"][0] == 100.0
    assert math.isnan(m.compute()["per_class"][1])
    empty = MeanIoU(3)
    empty.update(torch.tensor([1]), torch.tensor([255]))
    assert math.isnan(empty.compute()["miou"])


def test_input_errors():
    m = MeanIoU(3)
    with pytest.raises(ValueError, match="same shape"):
        m.update(torch.zeros(2, 3, dtype=torch.long), torch.zeros(3, 2, dtype=torch.long))
    with pytest.raises(TypeError, match="pred must hold integer"):
        m.update(torch.zeros(4), torch.zeros(4, dtype=torch.long))
    with pytest.raises(TypeError, match="target must hold integer"):
        m.update(torch.zeros(4, dtype=torch.long), torch.zeros(4, dtype=torch.bool))
    with pytest.raises(TypeError, match="torch.Tensor or numpy"):
        m.update([0, 1], torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="target holds ids outside"):
        m.update(torch.zeros(2, dtype=torch.long), torch.tensor([0, 7]))
    with pytest.raises(ValueError, match="pred holds ids outside"):
        m.update(torch.tensor([0, 3]), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="num_classes"):
        MeanIoU(0)
    with pytest.raises(ValueError, match="ignore_index 2 is a valid class"):
        MeanIoU(3, ignore_index=2)
    assert m.confusion.sum() == 0  # failed updates leave no trace


def test_merge_equals_single_pass():
    rng = np.random.default_rng(0)
    t = torch.from_numpy(rng.integers(0, 5, (2, 50)))
    p = torch.from_numpy(rng.integers(0, 5, (2, 50)))
    whole, a, b = MeanIoU(5), MeanIoU(5), MeanIoU(5)
    whole.update(p, t), a.update(p[0], t[0]), b.update(p[1], t[1])
    assert torch.equal(a.merge(b).confusion, whole.confusion)
    with pytest.raises(ValueError):
        a.merge(MeanIoU(4))


def test_protocol_table():
    p = get_protocol("sclip", "voc21")
    assert (p.short_side, p.crop, p.stride, p.logit_scale, p.prob_thd) == (336, 224, 112, 65.0, 0.1)
    assert get_protocol("clearclip", "coco_object").prob_thd == 0.4
    assert get_protocol("naclip", "cityscapes").short_side == 560
    assert get_protocol("naclip", "ade20k").prob_thd == 0.0
    assert get_protocol("sclip", "voc", prob_thd=0.3).prob_thd == 0.3  # alias + override
    for (baseline, dataset), proto in PROTOCOLS.items():
        assert isinstance(proto, Protocol) and proto.source
        bg = dataset in ("voc21", "context60", "coco_object")
        assert (proto.prob_thd > 0) == bg, (baseline, dataset)
    with pytest.raises(ValueError, match="no protocol for baseline 'nope'"):
        get_protocol("nope", "voc21")
    with pytest.raises(ValueError, match="unknown dataset"):
        get_protocol("sclip", "nope")
    with pytest.raises(ValueError, match="crop"):
        Protocol(336, -1, 112, 40.0)  # 0 is valid: the whole image in one pass


def _sync_worker(rank, world, init_file, preds, targets, out):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        m = MeanIoU(5)
        for i in range(rank, len(preds), world):  # each process sees its shard only
            m.update(preds[i], targets[i])
        local = m.confusion.clone()
        result = m.compute()
        assert torch.equal(m.confusion, local)  # syncing does not change the local counts
        if rank == 0:
            with open(out, "w") as f:
                json.dump(result["per_class"], f)
    finally:
        dist.destroy_process_group()


def test_compute_sums_over_processes(tmp_path):
    import torch.multiprocessing as mp

    g = torch.Generator().manual_seed(0)
    targets = [torch.randint(0, 5, (6, 7), generator=g) for _ in range(5)]
    preds = [torch.where(torch.rand(6, 7, generator=g) < 0.5, t, torch.randint(0, 5, (6, 7), generator=g))
             for t in targets]
    out = tmp_path / "per_class.json"
    mp.spawn(_sync_worker, args=(2, str(tmp_path / "init"), preds, targets, str(out)), nprocs=2)
    whole = MeanIoU(5)
    for p, t in zip(preds, targets):
        whole.update(p, t)
    got = json.loads(out.read_text())
    np.testing.assert_allclose(got, whole.compute()["per_class"], equal_nan=True)
