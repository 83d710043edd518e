"""Class-name files: one class per line, comma-separated synonyms (the baselines' convention).

The model scores every synonym and a class takes the best of its synonyms. Background datasets
list stuff words on the background line so that "not an object" has something to match.
The files ship as package data in ``armfast/data/classnames/``; a user file works the same way.
"""
from __future__ import annotations

from importlib import resources
from pathlib import Path


def parse_class_names(text: str, source: str = "<text>") -> list[list[str]]:
    classes = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        names = [n.strip() for n in line.split(",")]
        if any(not n for n in names):
            raise ValueError(f"{source}:{lineno}: empty synonym in {line!r}")
        classes.append(names)
    if not classes:
        raise ValueError(f"{source}: no class names")
    return classes


def load_class_names(name_or_path: str | Path) -> list[list[str]]:
    """Synonym lists of a dataset (`voc21`, ...) or of a class-name file at a path."""
    path = Path(name_or_path)
    if path.suffix == ".txt" or path.exists():
        if not path.is_file():
            raise FileNotFoundError(f"class-name file not found: {path}")
        return parse_class_names(path.read_text(encoding="utf-8"), str(path))
    from .datasets import get_dataset_class  # a dataset name (or alias) -> its file

    stem = get_dataset_class(str(name_or_path)).classnames
    res = resources.files("armfast.data").joinpath("classnames", f"{stem}.txt")
    if not res.is_file():
        raise FileNotFoundError(f"class-name file {stem}.txt is missing from the armfast package "
                                f"(armfast/data/classnames); reinstall armfast")
    return parse_class_names(res.read_text(encoding="utf-8"), f"armfast/data/classnames/{stem}.txt")


def flatten_class_names(classes: list[list[str]]) -> tuple[list[str], list[int]]:
    """(every synonym, the class index of each) -- the query list the text encoder sees."""
    names, index = [], []
    for i, synonyms in enumerate(classes):
        names += synonyms
        index += [i] * len(synonyms)
    return names, index
