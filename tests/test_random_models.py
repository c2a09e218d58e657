"Property tests (hypothesis): random small CNNs, pruned as `learn.slim` prunes them, compact to models equal to the masked ones."
import importlib.util
from pathlib import Path
import pytest
from hypothesis import given, settings, HealthCheck, strategies as st

_spec = importlib.util.spec_from_file_location('random_models', Path(__file__).resolve().parents[1]/'bench'/'random_models.py')
rm = importlib.util.module_from_spec(_spec); _spec.loader.exec_module(rm)   # the generator the 1,000-model bench runs

@settings(max_examples=30, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_random_cnn_compacts_to_the_masked_model(data, tmp_path_factory):
    "Runs, equals the masked model within 1e-4 on fresh inputs in eval and training mode, no empty group, bit-exact save/load"
    spec, kw = rm.draw_case(lambda opts: data.draw(st.sampled_from(opts)))
    r = rm.check_model(spec, tmp=tmp_path_factory.getbasetemp(), **kw)
    assert r.status == 'ok', (r, spec, kw)
    assert all(isinstance(v, str) and v for v in r.skipped.values())     # every group left unpruned says why

def test_generator_covers_the_constructs():
    "The generator reaches every construct the suite is about (so the property test is not vacuous)"
    import random
    rng, kinds, heads, aux = random.Random(0), set(), set(), 0
    for _ in range(200):
        s = rm.draw_spec(rng.choice)
        kinds |= {b[0] for b in s['blocks']} | {f"conv-{b[3]}" for b in s['blocks'] if b[0] == 'conv'}
        heads.add(s['head']); aux += s['aux'] is not None
    assert kinds >= {'res', 'cat', 'cat_input', 'split', 'chunk', 'shuffle', 'pool', 'conv-1', 'conv-dw', 'conv-g2'}
    assert heads == {'gap', 'flat', 'cat_flat'} and aux > 20
