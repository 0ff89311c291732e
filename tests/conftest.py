import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
torch.set_num_threads(2)


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def small_data(tmp_path_factory):
    """Two bundled sources with a 512-token BPE: small enough to prepare in a few seconds."""
    from scalevec.config import DataConfig
    from scalevec.data.prepare import prepare

    data = DataConfig(dir=str(tmp_path_factory.mktemp("data") / "small"), sources=["moby_dick", "milton"],
                      vocab_size=512)
    return prepare(data, progress=False, log=lambda *_: None)
