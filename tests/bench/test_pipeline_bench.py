"""The pipeline benchmark: the official-style path computes what armfast computes, and
`armfast bench --ops pipeline` reports images/s, speed-ups and ARM's share. No timing asserts."""
from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F

from armfast.bench import pipeline
from armfast.bench.official import OfficialStyle
from armfast.cli import main
from armfast.background import Background
from armfast.inference import Segmentor
from helpers.synthetic_datasets import tiny_clip


@pytest.mark.parametrize("baseline", ["sclip", "clearclip", "naclip"])
def test_official_style_equals_armfast_float64(baseline):
    model = copy.deepcopy(tiny_clip()).double()
    g = torch.Generator().manual_seed(0)
    text = F.normalize(torch.randn(7, 32, generator=g), dim=-1)
    # synonyms (7 queries, 4 classes: the one-hot maximum), SCLIP's area_thd and prob_thd
    seg = Segmentor(model, text, class_index=torch.tensor([0, 0, 1, 2, 2, 3, 0]),
                    baseline=baseline, short_side=40, crop=32, stride=16, logit_scale=50.0,
                    background=Background.threshold(0.3, index=0, name=None), area_thd=0.1)
    official = OfficialStyle(seg)
    for h, w in ((40, 56), (64, 48), (30, 90)):
        image = (torch.rand(3, h, w, generator=g) * 255).to(torch.uint8)
        expected = official.logits(image) * seg.logit_scale
        torch.testing.assert_close(seg.logits(image), expected, rtol=1e-9, atol=1e-9)
        assert torch.equal(seg.predict(image), official.predict(image))


def test_official_style_refuses_what_it_does_not_cover():
    text = F.normalize(torch.randn(3, 32), dim=-1)
    with pytest.raises(ValueError, match="covers sclip, clearclip, naclip"):
        OfficialStyle(Segmentor(tiny_clip(), text, baseline="maskclip", short_side=0, crop=32, stride=16))
    with pytest.raises(ValueError, match="give a crop"):
        OfficialStyle(Segmentor(tiny_clip(), text, baseline="sclip", short_side=0, crop=0))


def test_synthetic_images_and_cases():
    g = torch.Generator().manual_seed(0)
    image = pipeline.synthetic_image(37, 53, g)
    assert image.shape == (3, 37, 53) and image.dtype == torch.uint8 and image.float().std() > 5
    assert [c.dataset for c in pipeline.cases("full")] == ["voc21", "context60", "cityscapes"]
    assert pipeline.cases("full")[2].sizes == ((1024, 2048),)


def test_bench_pipeline_command(capsys, tmp_path):
    out = tmp_path / "pipeline.json"
    md = tmp_path / "pipeline.md"
    assert main(["bench", "--quick", "--shapes", "tiny", "--device", "cpu", "--ops", "pipeline",
                 "--rounds", "2", "--json", str(out), "--markdown", str(md)]) == 0
    text = capsys.readouterr().out
    assert "the official-style path" in text and "ARM adds" in text and "load average" in text
    data = json.loads(out.read_text())
    rows = data["pipeline"]
    assert [r["variant"] for r in rows] == list(pipeline.VARIANTS)
    for r in rows:
        assert r["error"] is None and len(r["seconds"]) == 2 and r["images_per_s"] > 0
        assert r["windows"] == 4 and r["images"] == 2  # two 32 x 45 (45 x 32) images, 2 windows each
    check = next(r for r in rows if r["variant"] == "armfast")
    assert check["max_error"] < 2e-3 and check["label_agreement"] > 0.99
    summary = data["pipeline_summary"]["voc"]
    assert summary["speedup"] > 0 and len(summary["round_speedups"]) == 2
    assert "--ops pipeline" in data["command"] and "--baseline sclip" in data["command"]
    assert "### Pipeline" in md.read_text() and "| voc21 " in md.read_text()


@pytest.mark.gpu
def test_bench_pipeline_on_gpu(capsys, tmp_path):
    out = tmp_path / "gpu.json"
    assert main(["bench", "--quick", "--shapes", "tiny", "--device", "cuda", "--ops", "pipeline",
                 "--rounds", "2", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["pipeline"]
    assert all(r["error"] is None and r["images_per_s"] > 0 for r in rows)
    armfast = next(r for r in rows if r["variant"] == "armfast")
    assert armfast["precision"] == "bfloat16 autocast" and armfast["label_agreement"] > 0.9
