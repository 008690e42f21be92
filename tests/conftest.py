from pathlib import Path

import pytest
import torch

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
