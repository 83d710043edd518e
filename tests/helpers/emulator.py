"""The host emulator of the CUDA kernels (tests/cuda_emulator): building it, calling it through
ctypes, and the guarded buffers and error bounds its tests check outputs with."""
from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]  # the repository
EMULATOR = ROOT / "tests" / "cuda_emulator"
CXX = shutil.which(os.environ.get("CXX", "g++")) or shutil.which("c++")

DTYPES = (torch.float16, torch.bfloat16, torch.float32)
DTYPE_IDS = {"ids": lambda dtype: {torch.float32: "tf32"}.get(dtype, str(dtype).removeprefix("torch."))}
DTYPE_CODE = {torch.float16: 0, torch.bfloat16: 1, torch.float32: 2}
# Error always allowed on top of 3x PyTorch's own error in the dtype: absolute for float16 and
# bfloat16; for TF32, whose 10-bit mantissa PyTorch's CPU float32 does not share, relative to the
# largest value, or 1 (about 10 units of TF32 rounding, 2^-11).
FLOOR = {torch.float16: 2e-3, torch.bfloat16: 1.5e-2, torch.float32: 5e-3}
KIB = 1024
H100 = dict(smem=227 * KIB, sms=132)
SENTINEL = -512.0  # exact in every dtype


def cuda_include_dir():
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(str(Path(nvcc).resolve().parents[1]))
    for base in filter(None, candidates):
        if (Path(base) / "include" / "cuda_fp16.h").exists():
            return Path(base) / "include"
    return None


def compile_cpp(sources, output, *flags):
    if CXX is None:
        pytest.skip("no C++ compiler")
    cmd = [CXX, "-std=c++17", "-O1", "-g0", "-I", str(ROOT / "csrc" / "include"), *flags, *map(str, sources),
           "-o", str(output)]
    result = subprocess.run(cmd, capture_output=True, text=True)
    assert result.returncode == 0, f"{' '.join(cmd)}\n{result.stderr[-4000:]}"


class Emulator:
    def __init__(self, path):
        self.lib = lib = ctypes.CDLL(str(path))
        for name in ("emu_attention_forward", "emu_attention_backward", "emu_launch_log", "emu_warp_product",
                     "emu_logits_gemm"):
            getattr(lib, name).restype = ctypes.c_char_p
        lib.emu_attention_backward_workspace.restype = ctypes.c_int64

    @staticmethod
    def _i64(values):
        return (ctypes.c_int64 * len(values))(*values)

    def _args(self, *tensors):
        """(data pointer, strides) of each tensor, as the emulated entry points take them."""
        out = []
        for t in tensors:
            out += [ctypes.c_void_p(t.data_ptr()), self._i64(t.stride())]
        return out

    def _register(self, *tensors):
        self.lib.emu_clear_globals()
        for t in tensors:
            self.lib.emu_register_global(ctypes.c_void_p(t.untyped_storage().data_ptr()),
                                         ctypes.c_int64(t.untyped_storage().nbytes()))

    def _check(self, error):
        if error:
            raise RuntimeError(error.decode())

    def launches(self):
        """(kernel name, blocks, threads, shared memory bytes) of each launch of the last call."""
        launches = []
        for entry in filter(None, self.lib.emu_launch_log().decode().split(";")):
            name, *numbers = entry.rsplit(" ", 3)
            launches.append((name, *map(int, numbers)))
        return launches

    def warp_product(self, dtype, A, B, B2, a_trans, b_trans, chain):
        C = torch.full((16, 16), float("nan"))
        self._check(self.lib.emu_warp_product(
            DTYPE_CODE[dtype], *(ctypes.cast(t.data_ptr(), ctypes.POINTER(ctypes.c_float)) for t in (A, B, B2, C)),
            int(a_trans), int(b_trans), int(chain)))
        return C

    def logits_gemm(self, a, b, a_mk, b_nk, kscale, mscale, nscale, sscale, splits, rows_split=0):
        """out = sscale * mscale[:, None] * nscale[None, :] * (A @ (kscale[:, None] * B)), A [M, K] and
        B [K, N] strided views; rows_split > 0 reads A's rows as a [M / rows_split, rows_split] grid
        (x's b*N + n rows)."""
        M, K = a.shape
        N = b.shape[1]
        out = torch.full((M, N), float("nan"))
        partial = torch.full((max(splits, 1) * M * N,), float("nan"))
        self._register(a, b, out, partial, kscale, mscale, nscale, sscale)
        a_outer = a.stride(0) * rows_split
        f = lambda t: ctypes.cast(t.data_ptr(), ctypes.POINTER(ctypes.c_float))
        self._check(self.lib.emu_logits_gemm(
            DTYPE_CODE[a.dtype], int(a_mk), int(b_nk), ctypes.c_int64(M), ctypes.c_int64(N), ctypes.c_int64(K),
            ctypes.c_void_p(a.data_ptr()), ctypes.c_int64(rows_split), ctypes.c_int64(a_outer),
            ctypes.c_int64(a.stride(0)), ctypes.c_int64(a.stride(1)), ctypes.c_void_p(b.data_ptr()),
            ctypes.c_int64(b.stride(0)), ctypes.c_int64(b.stride(1)), f(kscale), f(mscale), f(nscale), f(sscale),
            f(out), ctypes.c_int(splits), f(partial)))
        vec = dict(item.split("=") for item in self.lib.emu_launch_log().decode().strip(";").split())
        return out, vec

    def forward(self, q, k, v, out, lse, scale, smem, sms, reverse=False):
        B, H, Nq, d = q.shape
        self._register(q, k, v, out, lse)
        self.lib.emu_set_reverse_schedule(int(reverse))
        args = []
        for t in (q, k, v, out, lse):
            args += [ctypes.c_void_p(t.data_ptr()), self._i64(t.stride())]
        self._check(self.lib.emu_attention_forward(
            DTYPE_CODE[q.dtype], self._i64([B, H, Nq, k.shape[2], d]), *args, ctypes.c_float(scale),
            ctypes.c_int64(smem), ctypes.c_int(sms)))

    def backward(self, dout, q, k, v, out, lse, dq, dk, dv, scale, deterministic, smem, sms, reverse=False):
        B, H, Nq, d = q.shape
        shape = self._i64([B, H, Nq, k.shape[2], d])
        workspace = torch.full((self.lib.emu_attention_backward_workspace(shape, int(deterministic)),), float("nan"))
        self._register(dout, q, k, v, out, lse, workspace, dq, dk, dv)
        self.lib.emu_set_reverse_schedule(int(reverse))
        args = []
        for t in (dout, q, k, v, out, lse):
            args += [ctypes.c_void_p(t.data_ptr()), self._i64(t.stride())]
        args.append(ctypes.cast(workspace.data_ptr(), ctypes.POINTER(ctypes.c_float)))
        for t in (dq, dk, dv):
            args += [ctypes.c_void_p(t.data_ptr()), self._i64(t.stride())]
        self._check(self.lib.emu_attention_backward(
            DTYPE_CODE[q.dtype], shape, *args, ctypes.c_float(scale), ctypes.c_int(int(deterministic)),
            ctypes.c_int64(smem), ctypes.c_int(sms)))


def guarded(shape, dtype, fill, layout, g=None):
    """A [B, H, N, d] tensor living inside a larger buffer filled with `fill`: layout 'contiguous',
    'heads_inner' (a [B, N, H, d] buffer: the vec path with large strides) or 'every_other' (inner
    stride 2: the scalar path). Returns (view, buffer); random values when g is given."""
    B, H, N, d = shape
    margin = 64
    if layout == "contiguous":
        base_shape, make = (B, H, N, d), lambda b: b
    elif layout == "heads_inner":
        base_shape, make = (B, N, H, d), lambda b: b.transpose(1, 2)
    else:
        base_shape, make = (B, H, N, 2 * d), lambda b: b[..., ::2]
    numel = torch.Size(base_shape).numel()
    buf = torch.full((numel + 2 * margin,), fill, dtype=dtype)
    view = make(buf[margin:margin + numel].view(base_shape))
    if g is not None:
        view.copy_(torch.randn(shape, generator=g, dtype=torch.float64).to(dtype))
    return view, buf


def untouched_outside(view, buf, fill):
    """Whether every element of buf outside `view` still holds `fill`."""
    mask = torch.ones(buf.shape, dtype=torch.bool)
    marker = torch.zeros(buf.shape, dtype=torch.int8)
    offset = view.storage_offset() - buf.storage_offset()
    torch.as_strided(marker, view.shape, view.stride(), offset).fill_(1)
    mask &= marker == 0
    values = buf[mask].double()
    return bool(torch.isnan(values).all()) if fill != fill else bool((values == fill).all())


def assert_close_to_truth(got, truth, peer, name):
    assert torch.isfinite(got).all(), f"{name}: non-finite values"
    err = (got.double() - truth).abs().max().item()
    peer_err = (peer.double() - truth).abs().max().item()
    floor = FLOOR[got.dtype] * (max(1.0, truth.abs().max().item()) if got.dtype == torch.float32 else 1.0)
    bound = 3 * peer_err + floor
    assert err <= bound, f"{name}: error {err:.3g} > {bound:.3g} (PyTorch in {peer.dtype}: {peer_err:.3g})"


def build_emulator(tmp_path_factory, cls=None):
    """The emulated kernels (tests/cuda_emulator's harness) compiled into a fresh library and
    loaded as `cls` (`Emulator` or a subclass); skips without the CUDA headers."""
    include = cuda_include_dir()
    if include is None:
        pytest.skip("the CUDA headers (cuda_fp16.h) are not installed")
    lib = tmp_path_factory.mktemp("emulator") / "libarmfast_emulated.so"
    compile_cpp([EMULATOR / "harness.cpp", EMULATOR / "emulator.cpp"], lib, "-shared", "-fPIC",
                "-DARMFAST_EMULATE", "-I", str(EMULATOR), "-I", str(ROOT / "csrc" / "cuda"), "-I",
                str(include))
    return (cls or Emulator)(lib)
