"""Background as an explicit choice: none, a probability threshold, or background words.

Open-vocabulary segmentation has no "none of these" answer: every pixel goes to its best class.
The baselines give datasets with a background class one of two rules (or both):

- ``threshold``: a pixel whose best class probability is under ``prob_thd`` is background
  (SCLIP, NACLIP, ClearCLIP, ProxyCLIP on VOC21, Context60, COCO-Object);
- ``words``: extra text classes ("sky, wall, tree, ...") are scored with the others, and a pixel
  won by one of them is background (SCLIP/NACLIP's VOC21 and COCO-Object class files list them
  as the synonyms of class 0); ``prob_thd`` may be set as well.

`Background` says which, and where background pixels go. By default (``name="background"``)
it adds a class of that name at ``index`` to the classes the caller names, shifting the ones at
and after it by one (so ``["cat", "dog"]`` becomes ``["background", "cat", "dog"]``); with
``name=None`` ``index`` is a class the caller already has (a class file whose line ``index`` is
the background) and the words, if any, become extra synonyms of it.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional, Sequence, Union

MODES = ("none", "threshold", "words")


@dataclass(frozen=True)
class Background:
    mode: str = "none"  # none | threshold | words
    prob_thd: float = 0.0  # pixels whose best class probability is below become background
    words: tuple[str, ...] = ()  # words mode: text classes whose pixels are background
    index: int = 0  # the label of background pixels
    name: Optional[str] = "background"  # class added at `index`; None: `index` is a given class

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"Background.mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if isinstance(self.words, str):
            raise TypeError("Background.words must be a sequence of words, not one string; "
                            "split it, e.g. 'sky,wall'.split(',')")
        words = tuple(str(w).strip() for w in self.words)
        if any(not w for w in words):
            raise ValueError(f"Background.words has an empty word: {self.words!r}")
        object.__setattr__(self, "words", words)
        object.__setattr__(self, "prob_thd", float(self.prob_thd))
        if not 0.0 <= self.prob_thd <= 1.0:
            raise ValueError(f"Background.prob_thd must be in [0, 1], got {self.prob_thd}")
        if self.mode == "none" and (self.prob_thd or words):
            raise ValueError("Background mode 'none' takes no prob_thd and no words")
        if self.mode == "threshold" and (self.prob_thd <= 0.0 or words):
            raise ValueError(f"Background mode 'threshold' needs prob_thd > 0 and no words, got "
                             f"prob_thd={self.prob_thd}, words={words}")
        if self.mode == "words" and not words:
            raise ValueError("Background mode 'words' needs at least one word")
        if isinstance(self.index, bool) or not isinstance(self.index, int) or self.index < 0:
            raise ValueError(f"Background.index must be a non-negative class index, got {self.index!r}")
        if self.name is not None and (not isinstance(self.name, str) or not self.name.strip()):
            raise ValueError(f"Background.name must be a non-empty class name or None, got {self.name!r}")

    @property
    def enabled(self) -> bool:
        return self.mode != "none"

    @property
    def adds_class(self) -> bool:
        """True when a background class is inserted at `index` (rather than being a given one)."""
        return self.enabled and self.name is not None

    def describe(self) -> str:
        """One line for configuration printouts."""
        if not self.enabled:
            return "none"
        parts = []
        if self.words:
            shown = ", ".join(self.words[:6]) + (f", ... ({len(self.words)} words)"
                                                  if len(self.words) > 6 else "")
            parts.append(f"words [{shown}]")
        if self.prob_thd > 0:
            parts.append(f"prob_thd {self.prob_thd:g}")
        where = (f"added class {self.name!r} at {self.index}" if self.name is not None
                 else f"class {self.index}")
        return " + ".join(parts) + f" -> {where}"

    @classmethod
    def none(cls) -> "Background":
        return cls()

    @classmethod
    def threshold(cls, prob_thd: float, *, index: int = 0,
                  name: Optional[str] = "background") -> "Background":
        return cls("threshold", prob_thd, (), index, name)

    @classmethod
    def from_words(cls, words: Sequence[str] = (), *, prob_thd: float = 0.0, index: int = 0,
                   name: Optional[str] = "background") -> "Background":
        """Words mode; no words gives `default_words()` (SCLIP's background set)."""
        return cls("words", prob_thd, tuple(words) or default_words(), index, name)

    def at(self, index: int, name: Optional[str] = "background") -> "Background":
        """The same rule with background pixels going to `index` (added class `name`, or an
        existing class when ``name`` is None)."""
        return replace(self, index=index, name=name)


# SCLIP's background set (configs/cls_voc21.txt and cls_coco_object.txt, line 0), also quoted in
# its successors' papers; NACLIP ships the same lines.
SCLIP_BACKGROUND_WORDS = (
    "sky", "wall", "tree", "wood", "grass", "road", "sea", "river", "mountain", "sands", "desk",
    "bed", "building", "cloud", "lamp", "door", "window", "wardrobe", "ceiling", "shelf",
    "curtain", "stair", "floor", "hill", "rail", "fence")


def default_words() -> tuple[str, ...]:
    return SCLIP_BACKGROUND_WORDS


BackgroundLike = Union[Background, str, float, None]


def parse_background(spec: BackgroundLike, *, index: int = 0,
                     name: Optional[str] = "background") -> Background:
    """A `Background` from a spec:

    - a `Background` (returned as is), ``None`` or ``"none"``: no background;
    - a float in (0, 1] or ``"thd:0.3"`` (``"threshold:0.3"``): threshold mode;
    - ``"words"`` (SCLIP's set) or ``"words:sky,wall,tree"``: words mode;
    - both joined by ``+``: ``"words:sky,wall+thd:0.2"``.

    ``index`` and ``name`` place a background built from a string (see `Background`).
    """
    if isinstance(spec, Background):
        return spec
    if spec is None:
        return Background()
    if isinstance(spec, (int, float)) and not isinstance(spec, bool):
        return Background.threshold(float(spec), index=index, name=name)
    if not isinstance(spec, str):
        raise TypeError(f"background must be a Background, a string such as 'thd:0.3' or "
                        f"'words:sky,wall', a threshold or None; got {type(spec).__name__}")
    text = spec.strip()
    if text.lower() in ("", "none", "off"):
        return Background()
    words: Optional[tuple[str, ...]] = None
    thd = 0.0
    for part in text.split("+"):
        kind, sep, value = part.strip().partition(":")
        kind = kind.strip().lower()
        if kind in ("thd", "threshold", "prob_thd"):
            try:
                thd = float(value)
            except ValueError:
                raise ValueError(f"background: {part.strip()!r} needs a number, e.g. 'thd:0.3'") from None
        elif kind == "words":
            words = tuple(w.strip() for w in value.split(",") if w.strip()) if sep else ()
            if sep and not words:
                raise ValueError(f"background: {part.strip()!r} lists no words; use 'words' for "
                                 f"SCLIP's background set or 'words:sky,wall,...'")
        else:
            raise ValueError(f"background must be 'none', 'thd:<p>', 'words[:w1,w2,...]' or both "
                             f"joined by '+'; got {spec!r}")
    if words is not None:
        return Background.from_words(words, prob_thd=thd, index=index, name=name)
    return Background.threshold(thd, index=index, name=name)
