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

def pytest_collection_modifyitems(config, items):
    "The docs-site tests go last, to build from the notebook runs kept by tests/test_notebooks.py; `slow` tests run only when FASTSLIM_TEST_FLAGS names `slow`"
    items.sort(key=lambda i: i.path.name == 'test_docs_site.py')   # stable: every other test keeps its place
    if 'slow' in os.environ.get('FASTSLIM_TEST_FLAGS', '').split(): return
    skip = pytest.mark.skip(reason='slow: run with FASTSLIM_TEST_FLAGS=slow')
    for item in items:
        if 'slow' in item.keywords: item.add_marker(skip)
