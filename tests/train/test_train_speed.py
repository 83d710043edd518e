"""`armfast train`'s throughput report and precision setting."""
from __future__ import annotations

import json

import pytest
import torch

from armfast.train import TrainConfig, train
from helpers.synthetic_datasets import TINY_ARM, TINY_SHALLOW, tiny_clip, write_learnable_coco


def test_throughput_line_and_log(tmp_path, capsys):
    write_learnable_coco(tmp_path / "coco", n_train=4, n_val=0)
    g = torch.Generator().manual_seed(0)
    text = torch.nn.functional.normalize(torch.randn(171, 32, generator=g), dim=-1)
    cfg = TrainConfig(data_root=str(tmp_path / "coco"), out=str(tmp_path / "run"), steps=3,
                      batch_size=2, warmup=1, crop=32, base_short=40, shallow_layers=TINY_SHALLOW,
                      workers=0, val_every=0, log_every=2, ckpt_every=3, progress=False,
                      precision="fp32")
    train(cfg, model=tiny_clip(), arm_config=TINY_ARM, text_embeddings=text)
    out = capsys.readouterr().out
    line = next(l for l in out.splitlines() if "images/s" in l and "armfast train:" in l)
    assert line.startswith("armfast train: 6 images in ") and "waiting for data" in line
    assert "float32" in out  # the setup line names the precision
    log = [json.loads(l) for l in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [2, 3]
    assert all(r["images_per_s"] > 0 and 0 <= r["data_wait"] < 1 for r in log)
    with pytest.raises(ValueError, match="precision must be one of"):
        TrainConfig(data_root="x", out="y", precision="fp64")
