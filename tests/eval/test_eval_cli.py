"""`armfast eval` end to end on tiny synthetic datasets with a tiny random CLIP."""
from __future__ import annotations

import json

import numpy as np
import pytest

from armfast.cli import main
from armfast.data import build_dataset, load_class_names
from armfast.eval import get_protocol
from helpers.cli import no_clip, one_error  # noqa: F401  (no_clip is a fixture)
from helpers.synthetic_datasets import write_eval_setup
from helpers.iou import numpy_iou

SMALL = ["--short-side", "40", "--crop", "32", "--stride", "16", "--workers", "0", "--no-progress"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    return root, write_eval_setup(root, n_cityscapes=3)


def test_results_table_across_datasets_and_baselines(setup, capsys):
    root, model = setup
    out = root / "results.json"
    rc = main(["eval", "--dataset", "cityscapes,voc21", "--root", str(root / "data"),
               "--baseline", "sclip,naclip", "--arm", str(root / "arm"), "--model", model,
               "--limit", "2", "--json", str(out)] + SMALL)
    assert rc == 0
    text = capsys.readouterr().out
    assert "armfast eval configuration" in text and "mIoU (%)" in text
    assert "prob_thd 0.1, area_thd 0.1" in text  # SCLIP's VOC21 protocol, printed
    payload = json.loads(out.read_text())
    assert payload["complete"] is True and "error" not in payload
    results = payload["results"]
    assert [(r["dataset"], r["method"]) for r in results] == [
        (d, m) for d in ("cityscapes", "voc21") for m in ("sclip", "sclip+arm", "naclip", "naclip+arm")]
    for r in results:
        assert r["images"] == 2 and len(r["per_class"]) == (19 if r["dataset"] == "cityscapes" else 21)
        assert r["protocol"]["short_side"] == 40 and r["protocol"]["crop"] == 32
        assert 0.0 <= r["miou"] <= 100.0
    by = {(r["dataset"], r["method"]): r for r in results}
    # an untrained ARM leaves the features unchanged; without prob_thd the argmax is the same
    assert by[("cityscapes", "sclip")]["miou"] == by[("cityscapes", "sclip+arm")]["miou"]
    assert by[("voc21", "sclip")]["protocol"]["prob_thd"] == 0.1
    for line in ("sclip+arm", "naclip+arm"):
        assert any(row.startswith(line) for row in text.splitlines())


def test_miou_matches_an_independent_computation(setup, capsys):
    root, model = setup
    out = root / "one.json"
    main(["eval", "--dataset", "cityscapes", "--root", f"cityscapes={root / 'data'}",
          "--baseline", "naclip", "--model", model, "--json", str(out)] + SMALL)
    text = capsys.readouterr().out
    assert "per-class IoU" in text and "road" in text  # one result: per-class table
    got = json.loads(out.read_text())["results"][0]

    from armfast.clip import load_clip
    from armfast.inference import Segmentor

    clip = load_clip(model)
    protocol = get_protocol("naclip", "cityscapes", short_side=40, crop=32, stride=16)
    seg = Segmentor(clip, load_class_names("cityscapes"), baseline="naclip", protocol=protocol)
    ds = build_dataset("cityscapes", root / "data")
    preds, targets = [], []
    for i in range(len(ds)):
        preds.append(seg.predict(ds[i]["image"]).numpy())
        targets.append(ds[i]["mask"].numpy())
    ref = numpy_iou(preds, targets, 19)
    np.testing.assert_allclose(got["per_class"], ref, rtol=1e-9, equal_nan=True)
    assert got["miou"] == pytest.approx(np.nanmean(ref))


def test_eval_errors(setup, capsys, no_clip):
    root, model = setup
    assert "--dataset: unknown dataset 'nope'" in one_error(
        capsys, ["eval", "--dataset", "nope", "--root", root])
    assert "--baseline: no protocol for baseline 'nope'" in one_error(
        capsys, ["eval", "--dataset", "voc21", "--root", root, "--baseline", "nope"])
    assert "--root: no root given for dataset 'voc21'" in one_error(
        capsys, ["eval", "--dataset", "cityscapes,voc21", "--root", f"cityscapes={root}"])
    assert "ade20k: cannot find the dataset" in one_error(
        capsys, ["eval", "--dataset", "ade20k", "--root", root / "data", "--model", model] + SMALL)
