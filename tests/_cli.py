"""What the family tests share: command-line runs, their checkpoints and the checks of both."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from genkernels import train
from genkernels.cli import main


def train_run(tmp_path_factory, family: str, *options: str) -> Path:
    """The checkpoint of `genkernels train FAMILY --data digits OPTIONS --out DIR --no-progress` (exit status 0)."""
    out = tmp_path_factory.mktemp(f"run-{family}")
    assert main(["train", family, "--data", "digits", *options, "--out", str(out), "--no-progress"]) == 0
    return out / f"{family}.safetensors"


def assert_usage_error(argv: list[str], message: str, capsys) -> None:
    """``argv`` exits with status 2 (argparse) and ``message`` on stderr."""
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    assert message in capsys.readouterr().err


def assert_same_grid_twice(argv: list[str], tmp_path: Path, size: tuple[int, int] | None = None) -> None:
    """`genkernels ARGV --out X` twice writes the same grid (of ``size`` (width, height) when given)."""
    grids = []
    for name in ("a.png", "b.png"):
        out = tmp_path / name
        assert main([*argv, "--out", str(out)]) == 0
        with Image.open(out) as im:
            assert size is None or im.size == size
        grids.append(out.read_bytes())
    assert grids[0] == grids[1]


def foreign_checkpoint(path: Path, model: str) -> Path:
    """A genkernels checkpoint at ``path`` whose metadata names ``model`` (and only a Linear's weights)."""
    train.save_checkpoint(path, torch.nn.Linear(1, 1), None, {"model": model})
    return path


def assert_same_weights(model: torch.nn.Module, other: torch.nn.Module) -> None:
    """The two models hold the same tensors under the same names, exactly."""
    state, other_state = model.state_dict(), other.state_dict()
    assert state.keys() == other_state.keys()
    for k, v in state.items():
        assert torch.equal(v, other_state[k]), k


def assert_load_errors(load, path: Path, family: str, other: str, tmp_path: Path) -> None:
    """``load`` refuses a missing file and another family's checkpoint; the diffusion reader refuses ``path``."""
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load(tmp_path / "nope.safetensors")
    with pytest.raises(ValueError, match=f"holds a '{other}' model, not a {family} checkpoint"):
        load(foreign_checkpoint(tmp_path / "other.safetensors", other))
    with pytest.raises(ValueError, match=f"holds a '{family}' model, not a diffusion checkpoint"):
        train.read_metadata(path)
