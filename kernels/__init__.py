"""Triton kernels of armfast (installed as `armfast.kernels`)."""
