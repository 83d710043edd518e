"""The launch-config tuner (kernels/_tuning.py): size buckets, one measurement per key, choices
remembered on disk across processes, and the switches that relocate, disable or skip it.

The tuner is driven here with a stand-in kernel sequence and made-up timings, as on a GPU (the
interpreter itself never measures)."""
from __future__ import annotations

import json

import pytest
import torch
import triton

from armfast.kernels import _tuning

CONFIGS = [triton.Config({"BLOCK": b}, num_warps=4, num_stages=s) for b, s in ((64, 3), (32, 2),
                                                                              (128, 3))]
TIMES = {64: 2.0, 32: 1.0, 128: 3.0}  # ms per BLOCK: 32 wins


class FakeGPU:
    """Tuner context as on a GPU: launches recorded, times looked up in TIMES."""

    def __init__(self, monkeypatch):
        self.runs = []
        monkeypatch.setattr(_tuning, "interpreting", lambda: False)
        monkeypatch.setattr(_tuning, "device_facts", lambda device: ("sm90", "fake H200"))
        monkeypatch.setattr(_tuning, "measure", self.measure)
        self.current = None

    def run(self, launch, warmup=False):
        self.runs.append((launch["BLOCK"], warmup))
        self.current = launch["BLOCK"]

    def measure(self, fn):
        fn()
        return TIMES[self.current]

    def tune(self, tuner, key=("bf16", 64, 256, 7)):
        return tuner.tune(key, {"HEAD_DIM": 64}, lambda family: CONFIGS,
                          triton.Config({"BLOCK": 16}), torch.device("cpu"), self.run)


@pytest.fixture
def cache_file(tmp_path, monkeypatch):
    path = tmp_path / "tuning.json"
    monkeypatch.setenv(_tuning.CACHE_ENV, str(path))
    monkeypatch.delenv(_tuning.AUTOTUNE_ENV, raising=False)
    monkeypatch.setattr(_tuning, "DISK", _tuning.DiskCache())
    return path


def _kernel():
    """Some function whose source identifies 'the kernel' in cache entries."""
    return 1


def test_buckets():
    assert [_tuning.bucket(n) for n in (1, 16, 17, 196, 197, 785, 1025, 4096)] == \
        [16, 16, 32, 256, 256, 1024, 2048, 4096]
    assert _tuning.bucket(10**7) == 1 << 16  # beyond the GPU's width sizes tune alike
    assert _tuning.bucket(3, 1, 1024) == 4


def test_families():
    assert [_tuning.family(c) for c in ((9, 0), (10, 0), (8, 0), (8, 6), (8, 9), (12, 0))] == \
        ["sm90", "sm90", "sm80", "small", "small", "small"]


def test_measures_once_then_remembers_across_processes(monkeypatch, cache_file):
    gpu = FakeGPU(monkeypatch)
    tuner = _tuning.Tuner("attn_fwd", _kernel)
    launch = gpu.tune(tuner)
    assert launch["BLOCK"] == 32 and launch["HEAD_DIM"] == 64 and launch["num_stages"] == 2
    assert sorted(b for b, warmup in gpu.runs if warmup) == [32, 64, 128]  # compiled first
    assert tuner.measures == 3 and tuner.best[("bf16", 64, 256, 7)] is launch
    saved = json.loads(cache_file.read_text())
    (entry, value), = saved["fake H200"].items()
    assert entry.startswith("attn_fwd ") and "(bf16, 64, 256)" in entry  # not the device index
    assert value["config"] == _tuning.describe(CONFIGS[1]) and value["ms"] == [2.0, 1.0, 3.0]

    # a new process: fresh tuner and disk reader, same file -> no measurement at all
    monkeypatch.setattr(_tuning, "DISK", _tuning.DiskCache())
    gpu.runs.clear()
    again = _tuning.Tuner("attn_fwd", _kernel)
    assert gpu.tune(again)["BLOCK"] == 32
    assert again.measures == 0 and gpu.runs == []


def test_stale_or_foreign_entries_are_measured_again(monkeypatch, cache_file):
    gpu = FakeGPU(monkeypatch)
    gpu.tune(_tuning.Tuner("attn_fwd", _kernel))
    saved = json.loads(cache_file.read_text())
    for value in saved["fake H200"].values():
        value["config"]["kwargs"]["BLOCK"] = 48  # a config no list offers any more
    cache_file.write_text(json.dumps(saved))
    monkeypatch.setattr(_tuning, "DISK", _tuning.DiskCache())
    tuner = _tuning.Tuner("attn_fwd", _kernel)
    assert gpu.tune(tuner)["BLOCK"] == 32 and tuner.measures == 3
    cache_file.write_text("{not json")
    monkeypatch.setattr(_tuning, "DISK", _tuning.DiskCache())
    tuner = _tuning.Tuner("attn_fwd", _kernel)
    assert gpu.tune(tuner)["BLOCK"] == 32 and tuner.measures == 3
    assert json.loads(cache_file.read_text())  # rewritten whole


def test_cache_off_and_autotune_off(monkeypatch, cache_file):
    gpu = FakeGPU(monkeypatch)
    monkeypatch.setenv(_tuning.CACHE_ENV, "off")
    tuner = _tuning.Tuner("attn_fwd", _kernel)
    assert gpu.tune(tuner)["BLOCK"] == 32 and tuner.measures == 3
    assert not cache_file.exists()
    monkeypatch.setenv(_tuning.AUTOTUNE_ENV, "0")  # first config, nothing measured or compiled
    gpu.runs.clear()
    tuner = _tuning.Tuner("attn_fwd", _kernel)
    assert gpu.tune(tuner)["BLOCK"] == 64 and tuner.measures == 0 and gpu.runs == []


def test_a_config_that_fails_to_launch_is_skipped(monkeypatch, cache_file):
    gpu = FakeGPU(monkeypatch)

    def measure(fn):
        fn()
        if gpu.current == 32:
            raise triton.runtime.errors.OutOfResources(300000, 232448, "shared memory")
        return TIMES[gpu.current]
    monkeypatch.setattr(_tuning, "measure", measure)
    assert gpu.tune(_tuning.Tuner("attn_fwd", _kernel))["BLOCK"] == 64


def test_interpreter_takes_its_own_config(monkeypatch):
    gpu = FakeGPU(monkeypatch)
    monkeypatch.setattr(_tuning, "interpreting", lambda: True)
    assert gpu.tune(_tuning.Tuner("attn_fwd", _kernel))["BLOCK"] == 16 and gpu.runs == []


def test_default_cache_path(monkeypatch, tmp_path):
    monkeypatch.delenv(_tuning.CACHE_ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert _tuning.DiskCache.path() == tmp_path / "armfast" / "triton-tuning.json"


@pytest.mark.gpu
def test_tunes_on_the_gpu_and_remembers(monkeypatch, cache_file):
    """On a real GPU: the first call of a bucket times every candidate (all of them run), the
    choice lands in the cache file, and a fresh process would read it instead of measuring."""
    from armfast.ops import attention
    from armfast.ops._backends import triton as _triton
    from helpers.tensors import attention_f64, make_qkv, max_err
    monkeypatch.setenv(_tuning.AUTOTUNE_ENV, "1")
    _triton.clear_tuners()  # fresh tuners, nothing chosen yet
    try:
        q, k, v = make_qkv(2, 8, 300, 300, 64, dtype=torch.bfloat16, device="cuda",
                           requires_grad=True)
        out = attention(q, k, v, backend="triton")
        out.backward(torch.ones_like(out))
        ks = _triton.attention.kernels()
        assert ks.fwd.measures >= 3 and ks.bwd.measures >= 3
    finally:
        _triton.clear_tuners()
    (entries,) = json.loads(cache_file.read_text()).values()
    for name in ("attn_fwd", "attn_bwd"):
        (times,) = [e["ms"] for key, e in entries.items() if key.startswith(name + " ")]
        assert all(t is not None and t > 0 for t in times), (name, times)
    assert max_err(out, attention_f64(q, k, v)) < 2e-2


def test_parallel_compiles_inside_another_async_compile():
    """Inside someone else's AsyncCompileMode (Triton allows one at a time) compiles just run
    one after another instead of failing."""
    async_compile = pytest.importorskip("triton.runtime._async_compile")
    from concurrent.futures import ThreadPoolExecutor
    with ThreadPoolExecutor(1) as pool, async_compile.AsyncCompileMode(pool):
        with _tuning.parallel_compiles(3):
            pass


def test_sweep_remembers_its_winner_for_the_next_process(monkeypatch, cache_file):
    """`Tuner.sweep` (benchmarks/bwd_sweep.py) times every config with the timer it is given,
    counts a config that fails as inf, and leaves its winner where `tune` finds it in a fresh
    tuner: that one measures nothing."""
    gpu = FakeGPU(monkeypatch)
    sweeper = _tuning.Tuner("attn_bwd", _kernel)
    key = ("bf16", 64, 1024, 7)

    def run(launch, warmup=False):
        if launch["BLOCK"] == 128:
            raise RuntimeError("out of resources")
        gpu.run(launch, warmup)
    times = sweeper.sweep(key, {"HEAD_DIM": 64}, CONFIGS, "fake H200", run, timer=gpu.measure)
    assert times == [2.0, 1.0, float("inf")] and sweeper.best[key]["BLOCK"] == 32
    fresh = _tuning.Tuner("attn_bwd", _kernel)
    monkeypatch.setattr(_tuning, "DISK", _tuning.DiskCache())  # as a new process reads it
    gpu.runs.clear()
    assert gpu.tune(fresh, key)["BLOCK"] == 32 and fresh.measures == 0 and gpu.runs == []
