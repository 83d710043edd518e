"""What the tests share, importable from any test folder as `helpers.<module>` (pyproject.toml
puts tests/ on pytest's path):

- `tensors`: fresh random q/k/v (strided views too) and the float64 truth of the two hot ops;
- `baseline_math`: the float64 truth of the baseline attentions and their input builders;
- `clip_models`: random-weight CLIPs (ViT-B/16, a tiny registered one) and a fake DINO;
- `synthetic_datasets`: tiny copies of the datasets' layouts, tiny CLIP folders and ARMs;
- `cli`: running the command line in-process and reading its one-line errors;
- `iou`: an independent per-class IoU;
- `emulator`, `nvcc`: the CUDA host emulator and the toolkit of the compile-only tests;
- `internals`: the one door to armfast's private modules, for what no public name gives.
"""
