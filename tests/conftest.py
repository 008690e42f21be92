from pathlib import Path

import pytest
import torch
from cli_run import QUICK

from handgrad import cli

NAMES_TXT = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "names.txt"


@pytest.fixture
def names_txt() -> Path:
    if not NAMES_TXT.exists():
        pytest.skip(f"seed data set not found at {NAMES_TXT} (it lives in ../shared beside the project)")
    return NAMES_TXT


@pytest.fixture(autouse=True)
def _single_thread():
    torch.set_num_threads(1)
    yield


@pytest.fixture(scope="session")
def saved_run(tmp_path_factory) -> Path:
    """A finished 20-step run with checkpoints at steps 10 and 20, shared by the tests: copy it before changing it."""
    out = tmp_path_factory.mktemp("saved") / "run"
    assert cli.main(["train", "-o", str(out), "--steps", "20", "--save-every", "10", *QUICK]) == 0
    return out
