"""The whole pipeline: images per second of slide inference, armfast against the official-style
path, in one run on the same images.

For each protocol (the baseline's preset on VOC21, Pascal Context 60 and Cityscapes: short side,
crop, stride, text queries with the background words, ``prob_thd``/``area_thd``) and synthetic
images of the dataset's typical sizes, three variants segment every image, from uint8 pixels
to label maps:

- ``official``: `armfast.bench.official.OfficialStyle`, float32, one window at a time;
- ``armfast``: `armfast.Segmentor` with its defaults (windows of all images batched under the
  memory budget, bf16 autocast and CUDA graphs on a GPU, float32 on CPU, ``auto`` backend);
- ``armfast+arm``: the same with an ARM (random weights, residual outputs not zero, so that it
  computes what a trained one does).

CLIP is a randomly initialised ViT-B/16 (no weights are downloaded); text embeddings are random
unit vectors for the class names and CLIP's encoding of the background words. Before timing,
armfast in float32 is checked against the official-style path on the first image (relative
error of the averaged logits, share of equal labels). Rounds run the variants one after the
other, so that a busy machine slows all of them alike; the report gives medians over rounds,
the speed-up over the official-style path and the share of the pipeline's time ARM adds.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from .timer import synchronize

VARIANTS = ("official", "armfast", "armfast+arm")
BASELINE = "sclip"
# max |armfast - official| / max |official| of the float32 logits; on a GPU `auto` may pick
# TF32 tensor-core kernels for float32
CHECK_TOLERANCE = {"cpu": 2e-3, "cuda": 1e-2}


@dataclass(frozen=True)
class PipelineCase:
    """One protocol: a dataset preset and the (H, W) of its synthetic images."""

    name: str
    dataset: str
    sizes: tuple[tuple[int, int], ...]
    overrides: tuple[tuple[str, int], ...] = ()  # protocol fields (the tiny preset's small crops)


# typical sizes: VOC and Pascal Context (VOC2010 photos) are mostly 500 x 375 landscape or
# 375 x 500 portrait; Cityscapes frames are 2048 x 1024
CASES = (PipelineCase("voc", "voc21", ((375, 500), (500, 375))),
         PipelineCase("context", "context60", ((375, 500), (333, 500))),
         PipelineCase("cityscapes", "cityscapes", ((1024, 2048),)))
# tests: the VOC protocol (background words, area_thd, synonyms) on two small images
TINY = (PipelineCase("voc", "voc21", ((40, 56), (56, 40)),
                     (("short_side", 32), ("crop", 32), ("stride", 16))),)


def cases(preset: str = "full") -> tuple[PipelineCase, ...]:
    return TINY if preset == "tiny" else CASES


def synthetic_image(height: int, width: int, generator: torch.Generator) -> torch.Tensor:
    """uint8 ``[3, H, W]``: smooth colour blobs with noise, so that resizing and the windows
    see image-like content."""
    coarse = torch.rand(1, 3, max(2, height // 64), max(2, width // 64), generator=generator)
    image = torch.nn.functional.interpolate(coarse, size=(height, width), mode="bicubic",
                                            align_corners=False)[0]
    image = image + 0.1 * torch.randn(3, height, width, generator=generator)
    return (image.clamp(0, 1) * 255).to(torch.uint8)


@dataclass
class PipelineWorkload:
    case: PipelineCase
    device: torch.device
    images: list
    official: object  # OfficialStyle
    segmentors: dict  # variant -> Segmentor ("armfast", "armfast+arm")
    reference: object  # Segmentor in float32 without graphs, checked against official
    windows: int = 0  # windows per image, summed over the images

    def fn(self, variant: str) -> Callable[[], list]:
        if variant == "official":
            return lambda: [self.official.predict(image) for image in self.images]
        seg = self.segmentors[variant]
        return lambda: list(seg.predict_many(self.images))

    def check(self) -> tuple[float, float]:
        """(max relative error of armfast's float32 logits against the official-style path's,
        share of pixels with the same label) on the first image."""
        from ..inference.graphs import relative_difference

        image = self.images[0]
        expected = self.official.logits(image) * self.reference.logit_scale
        actual = self.reference.logits(image)
        labels = (self.reference.predict(image) == self.official.predict(image)).double().mean()
        return relative_difference(actual, expected), float(labels)


def build(case: PipelineCase, device: str | torch.device, *, baseline: str = BASELINE,
          seed: int = 0) -> PipelineWorkload:
    from ..clip.text import TextEmbeddings, flatten_classes
    from ..inference import Segmentor, SegmentorConfig
    from ..presets import get_preset
    from .official import OfficialStyle
    from .workloads import _clip_model, randomize_residual_outputs, seeded_arm

    device = torch.device(device)
    model = _clip_model(device)
    preset = get_preset(baseline, case.dataset, **dict(case.overrides))
    names, index = flatten_classes(preset.classes())
    g = torch.Generator().manual_seed(seed)
    embed_dim = int(model.visual.proj.shape[1])
    text = TextEmbeddings(torch.nn.functional.normalize(torch.randn(len(names), embed_dim,
                                                                    generator=g), dim=-1),
                          index, tuple(names))
    # background words (VOC, Context): encoded by the random CLIP with one template
    config = SegmentorConfig(baseline=baseline, protocol=preset.protocol,
                             background=preset.background, templates="simple")
    reference = Segmentor(model, text, config.replace(precision="fp32", cuda_graphs=False))
    arm = randomize_residual_outputs(seeded_arm(_arm_config(model), seed), g)
    segmentors = {"armfast": Segmentor(model, text, config),
                  "armfast+arm": Segmentor(model, text, config, arm=arm)}
    if device.type == "cpu":  # the default there is the reference configuration itself
        segmentors["armfast"] = reference
    images = [synthetic_image(h, w, g) for h, w in case.sizes]
    windows = sum(len(reference.windows().boxes(*reference.preparer(i).pixels.shape[-2:]))
                  for i in images)
    return PipelineWorkload(case, device, images, OfficialStyle(reference), segmentors,
                            reference, windows)


def _arm_config(model):
    from ..arm import ARMConfig
    from ..clip.model import default_shallow_layers, output_dim

    return ARMConfig(shallow_layers=default_shallow_layers(model),
                     width=model.visual.conv1.out_channels, embed_dim=output_dim(model))


@dataclass
class PipelineResult:
    case: PipelineCase
    variant: str
    images: int
    windows: int
    seconds: list[float] = field(default_factory=list)  # per round: all images once
    max_error: Optional[float] = None  # the check, on the "armfast" row
    label_agreement: Optional[float] = None
    crops_per_batch: Optional[int] = None
    precision: str = "float32"
    error: Optional[str] = None

    @property
    def median_s(self) -> Optional[float]:
        return statistics.median(self.seconds) if self.seconds else None

    @property
    def images_per_s(self) -> Optional[float]:
        return None if not self.seconds else self.images / self.median_s

    def to_dict(self) -> dict:
        return {"case": self.case.name, "dataset": self.case.dataset,
                "sizes": [list(s) for s in self.case.sizes], "variant": self.variant,
                "images": self.images, "windows": self.windows, "seconds": self.seconds,
                "median_s": self.median_s, "images_per_s": self.images_per_s,
                "max_error": self.max_error, "label_agreement": self.label_agreement,
                "crops_per_batch": self.crops_per_batch, "precision": self.precision,
                "error": self.error}


def run(device: str | torch.device, *, preset: str = "full", rounds: int = 3,
        baseline: str = BASELINE, progress: Optional[Callable[[str], None]] = None
        ) -> list[PipelineResult]:
    """Every case of `preset`: check, warm up, then `rounds` rounds of every variant."""
    from ..precision import describe

    device = torch.device(device)
    warmup = 2 if device.type == "cuda" else 1  # CUDA graphs are captured at the second call
    results = []
    for case in cases(preset):
        work = build(case, device, baseline=baseline)
        rows = {v: PipelineResult(case, v, len(work.images), work.windows) for v in VARIANTS}
        for v in VARIANTS[1:]:
            seg = work.segmentors[v]
            crop = seg.crop or (0, 0)
            rows[v].crops_per_batch = seg.crops_per_batch(crop)
            rows[v].precision = describe(seg.autocast_dtype)
        try:
            error, agreement = work.check()
        except Exception as exc:  # report it, do not time a path that fails
            rows["armfast"].error = f"{type(exc).__name__}: {exc}"
            results += rows.values()
            continue
        rows["armfast"].max_error, rows["armfast"].label_agreement = error, agreement
        tolerance = CHECK_TOLERANCE.get(device.type, CHECK_TOLERANCE["cuda"])
        if not error <= tolerance:
            rows["armfast"].error = (f"armfast's logits differ from the official-style path's by "
                                     f"{error:.3g} (relative), more than {tolerance:g}")
            results += rows.values()
            continue
        fns = {v: work.fn(v) for v in VARIANTS}
        for v, fn in fns.items():
            for _ in range(warmup):
                fn()
        for r in range(rounds):
            for v, fn in fns.items():
                synchronize(device)
                start = time.perf_counter()
                fn()
                synchronize(device)
                rows[v].seconds.append(time.perf_counter() - start)
                if progress is not None:
                    progress(f"pipeline {case.name} round {r + 1}/{rounds} {v}: "
                             f"{rows[v].seconds[-1]:.2f} s for {len(work.images)} images")
        results += rows.values()
        del work
    return results


def summary(records: list[dict]) -> dict[str, dict]:
    """Per case (records: `PipelineResult.to_dict`): images/s of each variant, speed-ups over
    the official-style path and the share of the pipeline's time ARM adds
    (``t(armfast+arm) / t(armfast) - 1``)."""
    out = {}
    for name in dict.fromkeys(r["case"] for r in records):
        rows = {r["variant"]: r for r in records if r["case"] == name}
        t = {v: rows[v]["median_s"] for v in VARIANTS if v in rows}
        if any(t.get(v) is None for v in VARIANTS):
            continue
        out[name] = {
            "images_per_s": {v: rows[v]["images_per_s"] for v in VARIANTS},
            "speedup": t["official"] / t["armfast"],
            "speedup_with_arm": t["official"] / t["armfast+arm"],
            "arm_overhead": t["armfast+arm"] / t["armfast"] - 1,
            "round_speedups": [o / a for o, a in zip(rows["official"]["seconds"],
                                                     rows["armfast"]["seconds"])],
        }
    return out


COLUMNS = ("protocol", "images", "windows", "variant", "precision", "batch", "s/image",
           "images/s", "vs official", "note")
LEFT = ("protocol", "variant", "precision", "note")


def table_rows(records: list[dict]) -> list[dict[str, str]]:
    """Formatted cells, keyed by COLUMNS, of `PipelineResult.to_dict` records."""
    from .report import format_time

    official = {r["case"]: r["median_s"] for r in records if r["variant"] == "official"}
    base = {r["case"]: r["median_s"] for r in records if r["variant"] == "armfast"}
    rows = []
    for r in records:
        median, name = r["median_s"], r["case"]
        note = f"FAILED: {r['error']}" if r["error"] else ""
        if r["max_error"] is not None and not r["error"]:
            note = (f"check vs official: max err {r['max_error']:.1e}, labels equal "
                    f"{100 * r['label_agreement']:.2f}%")
        if r["variant"] == "armfast+arm" and median and base.get(name):
            note = f"ARM adds {100 * (median / base[name] - 1):.1f}%"
        ratio = official[name] / median if median and official.get(name) else None
        sizes = "/".join(f"{w}x{h}" for h, w in r["sizes"])
        rows.append({
            "protocol": f"{r['dataset']} {sizes}", "images": str(r["images"]),
            "windows": str(r["windows"]), "variant": r["variant"], "precision": r["precision"],
            "batch": "1" if r["variant"] == "official" else str(r["crops_per_batch"] or "-"),
            "s/image": format_time(None if median is None else median / r["images"]),
            "images/s": "-" if r["images_per_s"] is None else f"{r['images_per_s']:.3g}",
            "vs official": "-" if ratio is None else f"{ratio:.2f}x", "note": note})
    return rows


def summary_lines(records: list[dict]) -> list[str]:
    lines = []
    for name, s in summary(records).items():
        rounds = ", ".join(f"{x:.2f}" for x in s["round_speedups"])
        lines.append(f"{name}: armfast {s['speedup']:.2f}x the official-style path (per round: "
                     f"{rounds}), with ARM {s['speedup_with_arm']:.2f}x; ARM adds "
                     f"{100 * s['arm_overhead']:.1f}% to the pipeline's time")
    return lines


def format_table(records: list[dict]) -> str:
    from .report import format_table as text_table

    return text_table(table_rows(records), COLUMNS, left=LEFT)


def markdown_section(data: dict, title: str) -> str:
    """A RESULTS.md section from the JSON of ``armfast bench --ops pipeline``: provenance, the
    table, per-protocol speed-ups and ARM's share, and the issue's targets."""
    from .report import _loads, format_markdown

    env, records = data["environment"], data["pipeline"]
    lines = [f"## {title}", "",
             f"- device: {env['device_name']} ({env['device']}; {env['cpu_count']} CPUs, "
             f"{env['torch_threads']} torch threads); date {env['date']}; torch {env['torch']}"
             + (f"; armfast commit {env['commit']}" if env.get("commit") else ""),
             f"- command: `{data['command']}`",
             f"- load average (1/5/15 min) at the start: {_loads(env.get('load_average'))}; at the "
             f"end: {_loads(env.get('load_average_end'))}",
             f"- {TARGETS.get(env['device'], '')}", "",
             format_markdown(table_rows(records), COLUMNS, left=LEFT), ""]
    lines += [f"- {line}" for line in summary_lines(records)]
    return "\n".join(lines) + "\n"


TARGETS = {
    "cpu": "target (issue 16): armfast at least 2x the official-style path on a 2-core CPU. On a "
           "shared CPU other processes slow the official-style path's thousands of small "
           "multi-threaded ops far more than armfast's few large batched ones: read the ratios "
           "with the load average and the per-round ratios",
    "cuda": "targets (issue 16): on an H100/H200, SCLIP + ARM at the VOC protocol at least 100 "
            "images/s and 10x the official-style path; ARM adds at most 5%",
}
