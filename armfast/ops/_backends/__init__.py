"""The backends of `armfast.ops`, one module each, loaded by `armfast.ops._registry` on first
use: `reference`, `sdpa`, `triton` (a package: its launchers by op family), `cpu` and `cuda`
(the compiled extension, whose loading and argument passing `_extension` holds for both)."""
