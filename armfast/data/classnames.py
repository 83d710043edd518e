"""Class-name files: one class per line, comma-separated synonyms (the baselines' convention).

The model scores every synonym and a class takes the best of its synonyms. Background datasets
list stuff words on the background line so that "not an object" has something to match.
The files ship as package data in ``armfast/data/classnames/``; a user file works the same way.
"""
from __future__ import annotations

from importlib import resources
from pathlib import Path


def _key(name: str) -> str:
    return " ".join(name.lower().split())


def duplicate_names(classes: list[list[str]]) -> list[tuple[str, int, int]]:
    """(name, first class, later class) for every name listed again: a name in two classes
    makes the later one lose every pixel to the first (equal scores, argmax takes the first)."""
    seen: dict[str, int] = {}
    found = []
    for i, synonyms in enumerate(classes):
        for n in synonyms:
            k = _key(n)
            if k in seen:
                found.append((n, seen[k], i))
            else:
                seen[k] = i
    return found


def describe_duplicates(classes: list[list[str]], found, where=None) -> str:
    """One line on the first duplicate; `where(i)` names class i's place (default: class i)."""
    where = where or (lambda i: f"class {i} ({', '.join(classes[i][:3])}"
                               f"{', ...' if len(classes[i]) > 3 else ''})")
    n, a, b = found[0]
    more = f" (and {len(found) - 1} more repeated name(s))" if len(found) > 1 else ""
    if a == b:
        return f"{n!r} is listed twice in {where(a)}{more}; list each name once"
    return (f"{n!r} names both {where(a)} and {where(b)}{more}: the second could never be "
            f"predicted; a name may belong to one class only")


def check_unique(classes: list[list[str]], source: str) -> None:
    found = duplicate_names(classes)
    if found:
        raise ValueError(f"{source}: {describe_duplicates(classes, found)}")


def parse_class_names(text: str, source: str = "<text>", *, unique: bool = True) -> list[list[str]]:
    """Synonym lists of a class-name file's text. `unique`: refuse a name listed twice (the
    published COCO-Object file lists "bed" as a background word and as a class)."""
    classes, lines = [], []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        names = [n.strip() for n in line.split(",")]
        if any(not n for n in names):
            raise ValueError(f"{source}:{lineno}: empty synonym in {line!r}")
        classes.append(names)
        lines.append(lineno)
    if not classes:
        raise ValueError(f"{source}: no class names")
    found = duplicate_names(classes) if unique else []
    if found:
        raise ValueError(f"{source}: " + describe_duplicates(
            classes, found, lambda i: f"class {i} (line {lines[i]})"))
    return classes


def load_class_names(name_or_path: str | Path, what: str = "class-name file") -> list[list[str]]:
    """Synonym lists of a dataset (`voc21`, ...) or of a class-name file at a path (errors
    name `what`, e.g. ``--class-file``)."""
    path = Path(name_or_path)
    if path.suffix == ".txt" or path.exists():
        if not path.is_file():
            raise FileNotFoundError(f"{what}: no file at {path}")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as exc:
            raise ValueError(f"{what}: {path} is not UTF-8 text ({exc})") from exc
        return parse_class_names(text, str(path))
    from .datasets import DATASETS, get_dataset_class  # a dataset name (or alias) -> its file

    try:
        stem = get_dataset_class(str(name_or_path)).classnames
    except ValueError as exc:
        raise FileNotFoundError(f"{what}: no file at {path}, and not a dataset name "
                                f"({', '.join(DATASETS)})") from exc
    res = resources.files("armfast.data").joinpath("classnames", f"{stem}.txt")
    if not res.is_file():
        raise FileNotFoundError(f"class-name file {stem}.txt is missing from the armfast package "
                                f"(armfast/data/classnames); reinstall armfast")
    return parse_class_names(res.read_text(encoding="utf-8"), f"armfast/data/classnames/{stem}.txt",
                             unique=False)


def flatten_class_names(classes: list[list[str]]) -> tuple[list[str], list[int]]:
    """(every synonym, the class index of each) -- the query list the text encoder sees."""
    names, index = [], []
    for i, synonyms in enumerate(classes):
        names += synonyms
        index += [i] * len(synonyms)
    return names, index
