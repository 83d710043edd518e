"""Inputs and timed callables of the benchmark cases.

`build(case, device)` makes a `Workload`: the inputs of the case, created once and shared by
every backend so all of them are timed on the same numbers. ``workload.fn(backend)`` is the
callable to time; ``workload.check(backend)`` runs it once and compares its outputs with the
reference backend's, so no benchmark can time wrong results.

Below float32 (GPU runs), the ARM and CLIP cases run under ``torch.autocast`` with float32
weights, as mixed-precision training and inference do; the ops get inputs in the case dtype.
"""
from __future__ import annotations

import contextlib
import copy
import functools
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import ops
from ..arm import ARM, ARMConfig
from .cases import BASELINE_OPS, CLIP_BASELINE, CLIP_EMBED, CLIP_MODEL, Case

# Largest accepted max|actual - expected| / max|expected|, per output; loose enough for
# TF32 matmuls and half-precision accumulation order, far below what a wrong kernel gives.
TOLERANCE = {torch.float64: 1e-7, torch.float32: 5e-3, torch.float16: 2e-2, torch.bfloat16: 5e-2}
LOGIT_SCALE = 40.0  # CLIP-style cosine-logit scale
SHALLOW_LAYERS = (4, 6, 8)


class Unavailable(RuntimeError):
    """The case cannot run here (e.g. armfast.clip is not importable); the message says why."""


class CheckFailed(AssertionError):
    """A backend's outputs differ from the reference beyond the tolerance."""


def relative_error(actual: Sequence[Tensor], expected: Sequence[Tensor]) -> float:
    """max over outputs of ``max|a - e| / max|e|`` (computed in float64)."""
    if len(actual) != len(expected):
        raise ValueError(f"actual has {len(actual)} outputs, expected {len(expected)}")
    worst = 0.0
    for a, e in zip(actual, expected):
        if a.shape != e.shape:
            raise CheckFailed(f"output shape {tuple(a.shape)} != reference {tuple(e.shape)}")
        a, e = a.detach().double(), e.detach().double()
        if not torch.isfinite(a).all():
            return float("inf")
        scale = e.abs().max().item()
        worst = max(worst, (a - e).abs().max().item() / max(scale, 1e-30))
    return worst


def autocast(device: torch.device, dtype: torch.dtype):
    """Mixed precision for module cases below float32; nothing at float32/float64."""
    if dtype in (torch.float16, torch.bfloat16):
        return torch.autocast(device.type, dtype=dtype)
    return contextlib.nullcontext()


class Workload:
    """The inputs of one case on one device and, per backend, the callable to time."""

    # check() runs the timed computation itself, so it also serves as the timer's warm-up
    check_warms_up = True

    def __init__(self, case: Case, device: torch.device, seed: int = 0):
        self.case, self.device = case, device
        self._generator = torch.Generator(device).manual_seed(seed)
        self._expected: tuple[Tensor, ...] | None = None

    def randn(self, *shape: int, dtype: torch.dtype | None = None) -> Tensor:
        return torch.randn(*shape, generator=self._generator, device=self.device,
                           dtype=dtype or self.case.dtype)

    def fn(self, backend: str) -> Callable[[], object]:
        """The callable that is timed for `backend`."""
        raise NotImplementedError

    def outputs(self, backend: str) -> tuple[Tensor, ...]:
        """One run's outputs, to compare with the reference's (defaults to one call of fn)."""
        out = self.fn(backend)()
        return tuple(out) if isinstance(out, (tuple, list)) else (out,)

    def check(self, backend: str) -> float:
        """Max relative error of `backend` against the reference; raises CheckFailed above
        the tolerance of the case dtype. The reference itself is the ground truth (0)."""
        if self._expected is None:
            self._expected = self.outputs("reference")
        if backend == "reference":
            return 0.0
        error = relative_error(self.outputs(backend), self._expected)
        tol = TOLERANCE[self.case.dtype]
        if not error <= tol:
            raise CheckFailed(f"{self.case.group} [{self.case.label}] backend '{backend}': max "
                              f"relative error {error:.3g} vs the reference exceeds {tol:g}")
        return error


def attention_call(backend: str) -> Callable:
    """``fn(q, k, v)`` of `backend`; the sdpa peer is torch's own call, with no armfast layer in
    between, so host-overhead comparisons are against what a user would otherwise write."""
    if backend == "sdpa":
        return F.scaled_dot_product_attention
    return functools.partial(ops.attention, backend=backend)


def logits_call(backend: str) -> Callable:
    """``fn(x, text, logit_scale)`` of `backend`; sdpa is the plain torch composition itself."""
    if backend == "sdpa":
        from ..ops._backends.sdpa import patch_text_logits

        return patch_text_logits
    return lambda x, text, scale: ops.patch_text_logits(x, text, logit_scale=scale, backend=backend)


class AttentionWorkload(Workload):
    def __init__(self, case, device, seed=0):
        super().__init__(case, device, seed)
        s, self.train = case.shape, case.mode == "train"
        self.q = self.randn(s["B"], s["H"], s["Nq"], s["d"]).requires_grad_(self.train)
        self.k = self.randn(s["B"], s["H"], s["Nk"], s["d"]).requires_grad_(self.train)
        self.v = self.randn(s["B"], s["H"], s["Nk"], s["d"]).requires_grad_(self.train)
        self.dout = self.randn(s["B"], s["H"], s["Nq"], s["d"]) if self.train else None

    def fn(self, backend):
        q, k, v, dout, attention = self.q, self.k, self.v, self.dout, attention_call(backend)
        if not self.train:
            return lambda: attention(q, k, v)

        def forward_backward():  # autograd.grad: no .grad accumulation across calls
            out = attention(q, k, v)
            return (out, *torch.autograd.grad(out, (q, k, v), dout))
        return forward_backward


class PatchTextLogitsWorkload(Workload):
    def __init__(self, case, device, seed=0):
        super().__init__(case, device, seed)
        s, self.train = case.shape, case.mode == "train"
        self.x = self.randn(s["B"], s["N"], s["E"]).requires_grad_(self.train)
        self.text = self.randn(s["C"], s["E"]).requires_grad_(self.train)
        self.scale = torch.tensor(LOGIT_SCALE, device=device).requires_grad_(self.train)
        self.dout = self.randn(s["B"], s["N"], s["C"]) if self.train else None

    def fn(self, backend):
        x, text, scale, dout, logits = self.x, self.text, self.scale, self.dout, logits_call(backend)
        if not self.train:
            return lambda: logits(x, text, scale)

        def forward_backward():
            out = logits(x, text, scale)
            return (out, *torch.autograd.grad(out, (x, text, scale), dout))
        return forward_backward


def affinity_features(B: int, n: int, C: int, generator: torch.Generator,
                      device: str | torch.device = "cpu") -> tuple[Tensor, float]:
    """(f [B, n, C] float64, beta) for ProxyCLIP's masked affinity attention: VFM-like features
    (a shared direction plus noise, so mean(S) is well above 0) and a beta that puts the mask
    threshold beta * mean(S) in the middle of the widest gap between the affinities. No S_ij is
    then near the threshold, where rounding could mask it in one backend and not in another.
    The images are one image's patches in other orders (same affinities, same threshold)."""
    f0 = torch.randn(n, C, dtype=torch.float64, generator=generator, device=device) + 0.7 * torch.randn(
        C, dtype=torch.float64, generator=generator, device=device)
    f = torch.stack([f0] + [f0[torch.randperm(n, generator=generator, device=device)]
                            for _ in range(B - 1)])
    if n == 1:
        return f, 1.2
    fn = f0 / f0.norm(dim=-1, keepdim=True)
    S = fn @ fn.t()
    values = S[~torch.eye(n, dtype=torch.bool, device=device)].sort().values
    middle = values[int(0.3 * len(values)):max(int(0.7 * len(values)), 2)]
    i = int((middle[1:] - middle[:-1]).argmax())
    return f, float((middle[i] + middle[i + 1]) / 2 / S.mean())


def baseline_call(op: str, backend: str) -> Callable:
    """``fn(*inputs, **params)`` of `backend`'s baseline attention `op`; sdpa is the SDPA
    composition itself, with no armfast layer in between (as `attention_call`)."""
    if backend == "sdpa":
        from ..ops._backends import sdpa
        fn = getattr(sdpa, op)
        if op == "gaussian_self_correlation":
            return lambda x, v, *, grid, scale: fn(x, v, scale, *grid, 5.0, True)
        if op == "masked_affinity_attention":
            return lambda f, v, *, beta: fn(f, v, beta, 3.0)
        if op == "similarity_aggregation":
            return lambda f, x, *, threshold: fn(f, x, threshold)
        if op == "averaged_dual_softmax":
            return lambda f, k, v, *, scale, beta: fn(f, k, v, scale, beta, 3.0)
        return lambda *ts, scale: fn(*ts, scale)
    return functools.partial(getattr(ops, op), backend=backend)


class BaselineAttentionWorkload(Workload):
    """One of the baseline attentions (forward only) on CLIP-like inputs: q, k, v [B, H, N, d]
    (NACLIP: on an h x w grid after a class token), or ProxyCLIP's and SC-CLIP's features and
    values (their thresholds clear of every affinity: see `affinity_features`)."""

    def __init__(self, case, device, seed=0):
        super().__init__(case, device, seed)
        s = case.shape
        if case.op in ("masked_affinity_attention", "similarity_aggregation", "averaged_dual_softmax"):
            self._features(case, s, device, seed)
            return
        count = 3 if case.op == "self_correlation_sum" else 2
        self.inputs = tuple(self.randn(s["B"], s["H"], s["N"], s["d"]) for _ in range(count))
        self.params = {"scale": s["d"] ** -0.5}
        if case.op == "gaussian_self_correlation":
            self.params["grid"] = (s["h"], s["w"])

    def _features(self, case, s, device, seed):
        n = s.get("n", s.get("N"))
        f, beta = affinity_features(s["B"], n, s["C"], torch.Generator().manual_seed(seed))
        f_in = f.to(device=device, dtype=case.dtype)
        if case.op == "similarity_aggregation":
            # beta * mean(S) lies in a gap of the affinities: a threshold no rounding flips
            mean = torch.nn.functional.normalize(f[0], dim=-1).mean(0).square().sum()
            self.inputs, self.params = (f_in, self.randn(s["B"], n, s["D"])), {"threshold": beta * float(mean)}
        elif case.op == "averaged_dual_softmax":
            self.inputs = (f_in, *(self.randn(s["B"], s["H"], n, s["d"]) for _ in range(2)))
            self.params = {"beta": beta, "scale": s["d"] ** -0.5}
        else:
            self.inputs, self.params = (f_in, self.randn(s["B"], s["H"], n, s["d"])), {"beta": beta}

    def fn(self, backend):
        call, inputs, params = baseline_call(self.case.op, backend), self.inputs, self.params
        return lambda: call(*inputs, **params)


def randomize_residual_outputs(arm: ARM, generator: torch.Generator) -> ARM:
    """ARM's residual output layers start at zero, which would make its output equal to the
    deep features and every gradient through attention zero: a check would then compare
    nothing. Random small weights make the attention matter, as in a trained module."""
    with torch.no_grad():
        for layer in (arm.cross_attn.out, arm.self_attn.out, arm.mlp.fc2):
            layer.weight.copy_(torch.randn(layer.weight.shape, generator=generator,
                                           device=layer.weight.device) * 0.02)
    return arm


def seeded_arm(config: ARMConfig, seed: int) -> ARM:
    """An ARM initialised from `seed` without disturbing the caller's global random state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return ARM(config)


class ArmWorkload(Workload):
    """The ARM module: forward (inference, no autograd) or a training step (forward, logits
    against random labels at token resolution, cross-entropy, backward, AdamW step)."""

    @property
    def check_warms_up(self) -> bool:  # a step's check skips the optimizer (lazy state)
        return self.case.mode == "forward"

    def __init__(self, case, device, seed=0):
        super().__init__(case, device, seed)
        s = case.shape
        config = ARMConfig(shallow_layers=SHALLOW_LAYERS, width=s["W"], embed_dim=s["E"],
                           num_heads=s["h"], head_dim=s["d"])
        self.model = randomize_residual_outputs(seeded_arm(config, seed).to(device), self._generator)
        f32 = torch.float32  # activations enter in float32; autocast lowers them when asked
        self.shallow = [self.randn(s["B"], s["N"], s["W"], dtype=f32) for _ in SHALLOW_LAYERS]
        self.deep = self.randn(s["B"], s["N"], s["E"], dtype=f32)
        self.text = self.randn(s["C"], s["E"], dtype=f32)
        self.labels = torch.randint(s["C"], (s["B"] * s["N"],), generator=self._generator,
                                    device=device)

    def loss(self, model: ARM, backend: str) -> Tensor:
        with autocast(self.device, self.case.dtype):
            x = model(self.shallow, self.deep, backend=backend)
            logits = model.logits(x, self.text, backend=backend)
        return F.cross_entropy(logits.flatten(0, 1).float(), self.labels)

    def fn(self, backend):
        if self.case.mode == "forward":
            model = self.model.eval()

            def forward():
                with torch.no_grad(), autocast(self.device, self.case.dtype):
                    return model(self.shallow, self.deep, backend=backend)
            return forward
        model = copy.deepcopy(self.model).train()  # each backend steps its own copy
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

        def step():
            loss = self.loss(model, backend)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            return loss.detach()
        return step

    def outputs(self, backend):
        if self.case.mode == "forward":
            return super().outputs(backend)
        model = copy.deepcopy(self.model).train()  # same starting weights for every backend
        loss = self.loss(model, backend)
        loss.backward()
        # gradients as one vector: tiny per-tensor gradients (the fusion weights) are judged
        # against the scale of all of them, not against their own rounding noise
        grads = torch.cat([p.grad.flatten().float() for p in model.parameters()])
        return loss.detach(), grads


@functools.lru_cache(maxsize=2)
def _clip_model(device: torch.device) -> nn.Module:
    """Randomly initialised CLIP ViT-B/16 (no weights are downloaded), shared by the cases."""
    from .. import clip

    model = clip.load_clip(CLIP_MODEL, pretrained=None, device=device)
    model.eval().requires_grad_(False)
    return model


def clip_module():
    """armfast.clip, or Unavailable with the reason it cannot be imported."""
    try:
        from .. import clip
    except ImportError as exc:
        raise Unavailable(f"armfast.clip is not importable ({exc})") from exc
    for name in ("load_clip", "extract"):
        if not hasattr(clip, name):
            raise Unavailable(f"armfast.clip has no {name}() yet")
    return clip


class ClipWorkload(Workload):
    """Inference on one batch of crops: CLIP ViT-B/16 with the baseline's last block, then
    logits against C classes, directly (`sclip`) or through an ARM (`sclip+arm`)."""

    def __init__(self, case, device, seed=0):
        super().__init__(case, device, seed)
        self.clip = clip_module()
        s = case.shape
        self.baseline = case.variant.split("+")[0] or CLIP_BASELINE
        self.model = _clip_model(device)
        self.images = self.randn(s["B"], 3, s["crop"], s["crop"], dtype=torch.float32)
        self.text = self.randn(s["C"], CLIP_EMBED, dtype=torch.float32)
        self.arm = None
        if case.variant.endswith("+arm"):
            arm = seeded_arm(ARMConfig(shallow_layers=SHALLOW_LAYERS), seed).to(device)
            self.arm = randomize_residual_outputs(arm, self._generator).eval()

    def fn(self, backend):
        clip, model, arm, images, text = self.clip, self.model, self.arm, self.images, self.text

        def segment():
            with torch.no_grad(), autocast(self.device, self.case.dtype):
                shallow, deep = clip.extract(model, images, baseline=self.baseline,
                                             shallow_layers=SHALLOW_LAYERS, backend=backend)
                if arm is None:
                    return ops.patch_text_logits(deep, text.to(deep.dtype),
                                                 logit_scale=LOGIT_SCALE, backend=backend)
                return arm.logits(arm(shallow, deep, backend=backend), text, backend=backend)
        return segment


_WORKLOADS = {"attention": AttentionWorkload, "patch_text_logits": PatchTextLogitsWorkload,
              "arm": ArmWorkload, "clip": ClipWorkload,
              **{op: BaselineAttentionWorkload for op in BASELINE_OPS}}


def build(case: Case, device: str | torch.device, seed: int = 0) -> Workload:
    """The inputs of `case` on `device`; raises Unavailable when the case cannot run here."""
    return _WORKLOADS[case.op](case, torch.device(device), seed)


def clear_caches() -> None:
    """Drops the cached CLIP model (it holds ~600 MB)."""
    _clip_model.cache_clear()
