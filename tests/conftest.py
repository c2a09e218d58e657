"Shared pytest setup: one torch thread per xdist worker, a headless matplotlib, and the repo's paths."
import os
from pathlib import Path
import pytest

os.environ.setdefault('MPLBACKEND', 'Agg')
import torch
torch.set_num_threads(1)   # two xdist workers on two cores; one thread each avoids oversubscription

ROOT = Path(__file__).resolve().parents[1]
MNIST = ROOT.parent/'shared'/'data'/'mnist10k.npz'

@pytest.fixture
def root(): return ROOT

@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
