"""Batched sliding windows: the same numbers as one window at a time, batches that cross images,
the memory cap, precision settings, the sync-free metric and the eval loop's data workers."""
from __future__ import annotations

import copy
import os

import pytest
import torch
import torch.nn.functional as F

from armfast import ARM, ARMConfig, precision
from armfast.inference import crop_budget
from armfast.bench.workloads import randomize_residual_outputs
from armfast.eval.metric import MeanIoU
from armfast.inference import Preparer, Segmentor, SegmentorConfig
from armfast.inference.windows import slide_boxes
from armfast.inference.windows import WindowStream
from helpers.clip_models import vit_b16
from helpers.synthetic_datasets import TINY_ARM, TINY_SHALLOW, tiny_clip

SIZES = [(40, 56), (24, 70), (32, 48), (48, 40)]  # (24, 70): windows of another shape (24 x 32)


def tiny_arm(dtype=torch.float32):
    g = torch.Generator().manual_seed(3)
    torch.manual_seed(3)
    arm = ARM(ARMConfig(shallow_layers=TINY_SHALLOW, width=64, embed_dim=32, **TINY_ARM))
    return randomize_residual_outputs(arm, g).to(dtype)  # not the identity: ARM must matter


def images(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.rand(3, h, w, generator=g) * 255).to(torch.uint8) for h, w in SIZES]


def segmentor(dtype=torch.float64, **kw):
    model = copy.deepcopy(tiny_clip()).to(dtype)
    g = torch.Generator().manual_seed(1)
    text = F.normalize(torch.randn(5, 32, generator=g), dim=-1)
    kw = dict(dict(baseline="sclip", short_side=0, crop=32, stride=16, logit_scale=40.0), **kw)
    kw.setdefault("arm", tiny_arm(dtype))
    return Segmentor(model, text, **kw)


def one_window_at_a_time(seg: Segmentor, image) -> torch.Tensor:
    """The official slide inference: each window alone, upsampled, summed, averaged, resized,
    scaled -- written out independently of armfast.inference.windows."""
    p = seg.prepare(image)
    x = p.pixels
    H, W = x.shape[-2:]
    total = count = None
    with torch.inference_mode():
        for y1, y2, x1, x2 in slide_boxes(H, W, seg.crop, seg.stride):
            crop = x[..., y1:y2, x1:x2]
            h, w = crop.shape[-2:]
            padded = F.pad(crop, (0, -w % seg.patch[1], 0, -h % seg.patch[0]))
            logits = seg.crop_logits(padded)
            logits = F.interpolate(logits, size=padded.shape[-2:], mode="bilinear",
                                   align_corners=False)[0, :, :h, :w]
            if total is None:
                total = logits.new_zeros(logits.shape[0], H, W)
                count = logits.new_zeros(1, H, W)
            total[:, y1:y2, x1:x2] += logits
            count[:, y1:y2, x1:x2] += 1
        logits = F.interpolate((total / count)[None], size=p.size, mode="bilinear",
                               align_corners=False)[0]
        return logits * seg.effective_logit_scale


def record_batches(seg: Segmentor) -> list:
    sizes, inner = [], seg._graphed

    def run(crops):
        sizes.append(tuple(crops.shape))
        return inner(crops)
    seg._graphed = run
    return sizes


@pytest.mark.parametrize("baseline", ["sclip", "naclip"])
def test_batched_windows_equal_one_window_at_a_time_float64(baseline):
    seg = segmentor(baseline=baseline, crop_batch_size=5)
    batches = record_batches(seg)
    imgs = images()
    streamed = [logits for _, logits in seg.stream(imgs, "logits")]
    # 6 + 4 + 2 + 4 windows, five per batch at most, one shape per batch: the second batch
    # takes the last of image 0 and those of images 2 and 3 while image 1's 24 x 32 wait
    assert batches == [(5, 3, 32, 32), (5, 3, 32, 32), (4, 3, 24, 32), (2, 3, 32, 32)]
    for image, logits in zip(imgs, streamed):
        expected = one_window_at_a_time(seg, image)
        assert logits.shape == expected.shape == (5, *image.shape[-2:])
        torch.testing.assert_close(logits, expected, rtol=1e-10, atol=1e-10)
    # and the single-image API is the same path
    torch.testing.assert_close(seg.logits(imgs[1]), streamed[1], rtol=1e-10, atol=1e-10)


def test_batched_windows_float32_vit_b16():
    text = F.normalize(torch.randn(4, 512, generator=torch.Generator().manual_seed(0)), dim=-1)
    seg = Segmentor(vit_b16(), text, baseline="sclip", short_side=0, crop=32, stride=16,
                    crop_batch_size=7)
    imgs = images(1)[:3]
    for image, logits in zip(imgs, (r for _, r in seg.stream(imgs, "logits"))):
        torch.testing.assert_close(logits, one_window_at_a_time(seg, image), rtol=1e-5, atol=1e-5)


def test_memory_cap_splits_batches_and_changes_nothing():
    big = segmentor(crop_batch_size=64)
    per_crop = big.crop_bytes((32, 32))
    capped = segmentor(max_memory=3 * per_crop + 1)
    assert capped.crops_per_batch((32, 32)) == 3 and big.crops_per_batch((32, 32)) == 64
    assert segmentor().max_memory == crop_budget.CPU_BUDGET
    sizes = record_batches(capped)
    imgs = images()
    a = [r for _, r in big.stream(imgs, "probs")]
    b = [r for _, r in capped.stream(imgs, "probs")]
    assert max(s[0] for s in sizes) == 3
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=1e-10, atol=1e-12)


def test_whole_image_mode_and_order_of_results():
    seg = segmentor(crop=0, crop_batch_size=4)
    imgs = images()
    out = list(seg.stream(imgs, "labels"))
    assert [p.size for p, _ in out] == [tuple(i.shape[-2:]) for i in imgs]
    for image, (_, labels) in zip(imgs, out):
        assert torch.equal(labels, seg.predict(image))


def test_prepared_items_carry_meta_and_pin():
    seg = segmentor()
    prep = Preparer(None, seg.image_mean, seg.image_std)
    items = [prep(img, meta=i) for i, img in enumerate(images())]
    assert [p.meta for p, _ in seg.stream(items, "labels")] == [0, 1, 2, 3]
    p = Preparer(20, seg.image_mean, seg.image_std)(images()[0])
    assert p.pixels.shape == (1, 3, 20, 28) and p.size == (40, 56)
    if torch.cuda.is_available():
        assert p.pin_memory().pixels.is_pinned()


def test_stream_leaves_grad_mode_alone():
    seg = segmentor()
    for _, labels in seg.stream(images(), "labels"):
        assert torch.is_grad_enabled() and not torch.is_inference_mode_enabled()
        assert labels.dtype == torch.int64
    with pytest.raises(ValueError, match="output must be"):
        next(seg.stream(images(), "masks"))


def test_window_stream_batches_by_shape_in_queue_order():
    stream = WindowStream((4, 4), (4, 4), (1, 1), max_crops=3)
    seen = []

    def logits(crops):
        seen.append(crops.shape[0])
        return crops[:, :1]  # the crop's first channel as its "logits"
    xs = [torch.randn(1, 3, 4, 8), torch.randn(1, 3, 2, 8), torch.randn(1, 3, 8, 4)]
    out = list(stream.run(xs, logits))
    # three 4x4 (both of image 0, the first of image 2), the 2x4 of image 1, the last 4x4
    assert seen == [3, 2, 1]
    for x, (item, result) in zip(xs, out):
        assert item is x
        torch.testing.assert_close(result, x[0, :1])  # non-overlapping windows: the input back


def test_crop_bytes_bounds_the_measured_peak():
    from armfast.bench.memory import peak_memory

    os.environ.setdefault("KINETO_LOG_LEVEL", "5")
    for baseline, arm in (("sclip", None), ("naclip", tiny_arm()), ("clearclip", tiny_arm())):
        seg = segmentor(torch.float32, baseline=baseline, arm=arm, crop=96)
        crops = torch.randn(4, 3, 96, 96)
        with torch.inference_mode():
            seg._batch_logits(crops)
            peak = peak_memory(lambda: seg._batch_logits(crops), "cpu")
        if peak is None:
            pytest.skip("the profiler gave no memory events")
        estimate = 4 * seg.crop_bytes((96, 96))
        assert peak <= estimate <= 4 * peak, (baseline, peak, estimate)


def test_parse_bytes_and_budget():
    assert crop_budget.parse_bytes("4GiB") == 4 << 30
    assert crop_budget.parse_bytes("512 MiB") == 512 << 20
    assert crop_budget.parse_bytes("2.5GB") == 2_500_000_000
    assert crop_budget.parse_bytes(4096) == 4096
    for bad in ("lots", "4 parsecs", "0", -3):
        with pytest.raises(ValueError, match="memory size"):
            crop_budget.parse_bytes(bad)
    with pytest.raises(TypeError, match="memory size"):
        crop_budget.parse_bytes(True)
    assert crop_budget.crops_per_batch(10, 100) == 1 and crop_budget.crops_per_batch(10**12, 1) == 64
    with pytest.raises(ValueError, match="memory size"):
        segmentor(max_memory="nope")
    with pytest.raises(ValueError, match="crop_batch_size"):
        segmentor(crop_batch_size=0)


def test_precision_settings():
    assert precision.autocast_dtype("auto", "cuda") is torch.bfloat16
    assert precision.autocast_dtype("auto", "cpu") is None
    assert precision.autocast_dtype("fp32", "cuda") is None
    assert precision.autocast_dtype("bf16", "cpu") is torch.bfloat16
    with pytest.raises(ValueError, match="fp16.*needs a GPU"):
        precision.autocast_dtype("fp16", "cpu")
    with pytest.raises(ValueError, match="precision must be one of"):
        precision.check_precision("fp8")
    seg = segmentor(torch.float32)
    assert seg.autocast_dtype is None and seg.config()["precision"] == "float32"
    assert not seg.config()["cuda_graphs"]  # a CPU model: the eager path, untouched
    assert segmentor(torch.float32, precision="FP32").precision == "fp32"
    with pytest.raises(TypeError, match="unknown SegmentorConfig field.*amp"):
        segmentor(torch.float32, amp=False)  # the one spelling is precision=


def test_bf16_on_cpu_is_close_and_logits_stay_float32():
    fp32 = segmentor(torch.float32)
    bf16 = segmentor(torch.float32, precision="bf16")
    image = images()[0]
    a, b = fp32.logits(image), bf16.logits(image)
    assert b.dtype == torch.float32
    assert (a - b).abs().max() < 0.05 * a.abs().max()


def test_mean_iou_add_equals_update():
    g = torch.Generator().manual_seed(0)
    pred = torch.randint(0, 5, (3, 17, 9), generator=g)
    target = torch.randint(0, 5, (3, 17, 9), generator=g)
    target[0, :4] = 255
    a, b = MeanIoU(5), MeanIoU(5)
    a.update(pred, target)
    b.add(pred, target)
    assert torch.equal(a.confusion, b.confusion) and a.confusion.sum() == target.ne(255).sum()


def test_evaluate_with_workers_matches_in_process(tmp_path):
    from armfast.data import build_dataset
    from armfast.eval import get_protocol
    from armfast.eval.runner import evaluate, throughput_line
    from helpers.synthetic_datasets import write_dataset

    write_dataset("cityscapes", tmp_path / "data", n=3, size=(40, 48), splits=("val",))
    data = build_dataset("cityscapes", tmp_path / "data", "val")
    protocol = get_protocol("sclip", "cityscapes", short_side=40, crop=32, stride=16)
    config = SegmentorConfig(baseline="sclip", protocol=protocol)
    runs = [evaluate(tiny_clip(), data, config, workers=w, progress=False, crop_batch_size=b)
            for w, b in ((0, 1), (2, 5))]
    assert runs[0]["per_class"] == pytest.approx(runs[1]["per_class"], nan_ok=True)
    assert runs[0]["pixels"] == runs[1]["pixels"] > 0
    assert runs[1]["images_per_s"] > 0 and runs[1]["peak_gpu_bytes"] is None
    assert "3 images" in throughput_line(runs[1]) and "images/s" in throughput_line(runs[1])


@pytest.mark.gpu
def test_evaluate_on_gpu_with_workers(tmp_path):
    from armfast.data import build_dataset
    from armfast.eval import get_protocol
    from armfast.eval.runner import evaluate, throughput_line
    from helpers.synthetic_datasets import write_dataset

    write_dataset("voc21", tmp_path / "data", n=4, size=(60, 80), splits=("val",))
    data = build_dataset("voc21", tmp_path / "data", "val")
    protocol = get_protocol("sclip", "voc21", short_side=48, crop=32, stride=16)
    model = copy.deepcopy(tiny_clip())
    cpu = evaluate(model, data, baseline="sclip", protocol=protocol, progress=False)
    gpu = evaluate(model.cuda(), data, baseline="sclip", protocol=protocol, progress=False,
                   workers=2, precision="fp32", crop_batch_size=5)
    assert gpu["config"]["cuda_graphs"] and gpu["peak_gpu_bytes"] > 0
    assert "GPU peak" in throughput_line(gpu)
    assert gpu["pixels"] == cpu["pixels"] and abs(gpu["aacc"] - cpu["aacc"]) < 1.0
    bf16 = evaluate(model, data, baseline="sclip", protocol=protocol, progress=False, workers=2)
    assert bf16["config"]["precision"] == "bfloat16 autocast" and 0 <= bf16["miou"] <= 100


@pytest.mark.gpu
def test_default_gpu_budget_is_half_the_free_memory():
    free, _ = torch.cuda.mem_get_info()
    budget = crop_budget.default_budget("cuda")
    assert 0.3 * free < budget <= 0.5 * free + 1


def test_cli_speed_flags(tmp_path, capsys, monkeypatch):
    import numpy as np
    from PIL import Image

    from armfast.cli import main
    from armfast.clip.text import TEXT_CACHE_ENV
    from helpers.synthetic_datasets import write_tiny_clip_dir

    monkeypatch.delenv(TEXT_CACHE_ENV, raising=False)
    path = tmp_path / "a.png"
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (36, 44, 3), dtype=np.uint8)).save(path)
    model = write_tiny_clip_dir(tmp_path / "clip")
    common = ["segment", str(path), "--classes", "cat,dog", "--clip-model", model, "--templates",
              "simple", "--short-side", "32", "--crop", "32", "--stride", "16", "--device", "cpu"]
    rc = main(common + ["--precision", "fp32", "--max-memory", "64MiB", "--crop-batch-size", "2",
                        "--no-cuda-graphs", "--text-cache", str(tmp_path / "text"),
                        "-o", str(tmp_path / "out")])
    out = capsys.readouterr().out
    assert rc == 0 and "precision float32" in out and "crop_batch_size 2" in out
    assert list((tmp_path / "text").glob("text-*.safetensors"))  # the class names, cached
    monkeypatch.delenv(TEXT_CACHE_ENV, raising=False)
    assert main(common + ["--crop-batch-size", "0", "-o", str(tmp_path / "x")]) == 2
    assert "--crop-batch-size must be a positive integer" in capsys.readouterr().err
    assert main(common + ["--max-memory", "lots", "-o", str(tmp_path / "x")]) == 2
    assert "memory size" in capsys.readouterr().err
