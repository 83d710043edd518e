"""The README's commands run as written: every `armfast` line parses, the ARM folder it passes
to --arm is the one training writes, training lines name their weights, links stay inside the
repository."""
from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from armfast.cli import build_parser
from armfast.train.trainer import ARM_FOLDER

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def commands() -> list[list[str]]:
    """`armfast` command lines of the README's bash blocks (continuations joined, comments cut;
    ``torchrun ... --no-python armfast ARGS`` included)."""
    out = []
    for block in re.findall(r"```bash\n(.*?)```", README, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            for i, w in enumerate(words):
                if w == "armfast" and i + 1 < len(words):
                    end = words.index("&&", i) if "&&" in words[i:] else len(words)
                    out.append(words[i + 1:end])
    return out


@pytest.mark.parametrize("argv", commands(), ids=lambda a: " ".join(a)[:60])
def test_every_command_parses(argv):
    build_parser().parse_args(argv)


def test_arm_folder_is_the_one_training_writes():
    outs = {a[a.index("--out") + 1] for a in commands() if a[0] == "train"}
    arms = {a[a.index("--arm") + 1] for a in commands() if "--arm" in a}
    assert outs and arms and arms == {f"{o}/{ARM_FOLDER}" for o in outs}, (outs, arms)


def test_training_lines_name_their_weights():
    for argv in commands():
        if argv[0] == "train":
            assert "--pretrained" in argv or "--clip-weights" in argv, argv


def test_links_point_inside_the_repository():
    for target in re.findall(r"\]\(([^)#]+)\)", README):
        if "://" in target:
            continue
        path = (ROOT / target).resolve()
        assert path.is_relative_to(ROOT) and path.exists(), target
