"""`target_latency` (issue #19): latency tables are measured once and cached per model/runtime/shape, the budget loop meets its
goal end to end and corrects a wrong prediction. Every timer here is synthetic (a cost computed from the conv widths), so no
test times anything or depends on how fast the machine is."""
import json, os, pickle, warnings
import pytest, torch
from torch import nn
from fastai.learner import Learner
from fastslim.data import digits_dls
from fastslim.latency import LatencyModel, arch_digest, latency_cache_dir, check_latency_kw, CACHE_ENV
from fastslim.models import vgg_tiny
from fastslim.plan import SlimPlan
from fastslim.prune import PruneCallback

class FakeTimer:
    "Seconds of a pretend runtime: overhead + in x out x k x k of every conv (a 30% penalty off multiples of 8) + linear; counts its calls"
    def __init__(self, overhead=1e-4, scale=1e-7): self.calls, self.overhead, self.scale = 0, overhead, scale
    def cost(self, model):
        t = self.overhead
        for m in model.modules():
            if isinstance(m, nn.Conv2d):
                t += self.scale * (m.in_channels // m.groups) * m.out_channels * m.kernel_size[0] * m.kernel_size[1] * (1.3 if m.out_channels % 8 else 1)
            elif isinstance(m, nn.Linear): t += self.scale * m.in_features * m.out_features
        return t
    def __call__(self, model, x):
        self.calls += 1
        return self.cost(model)

def net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
                         nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(),
                         nn.Conv2d(64, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(),
                         nn.Conv2d(64, 48, 3, padding=1), nn.BatchNorm2d(48), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(48, 10))

def l1(plan, dls): return plan.l1_scores()

def plan_of_net(**kw): return SlimPlan(net(), torch.randn(2, 3, 16, 16), verify=False, **kw)

def build_cost(plan, lat):
    "Timings a table build takes: a warm-up, then (dense, narrowed) x `reps` per table point"
    return 1 + 2 * lat.reps * sum(len(t) - 1 for t in lat.tables.values())

def test_tables_are_measured_once_and_cached(tmp_path):
    plan, t = plan_of_net(), FakeTimer()
    keeps = {g.name: g.keep.clone() for g in plan.groups}
    state = {k: v.clone() for k, v in plan.model.state_dict().items()}
    lat = LatencyModel(plan, timer=t, cache_dir=tmp_path, reps=2)
    assert t.calls == lat.cost['timings'] == build_cost(plan, lat) and not lat.cost['cached']
    assert lat.cost['seconds'] >= 0 and 'timings' in repr(lat)
    assert set(lat.tables) == {g.name for g in plan.groups}
    assert all(len(v) == 4 and v[-1] == (plan[k].size, 1.) for k, v in lat.tables.items())   # 3 widths + the dense one
    assert all(a[0] < b[0] for v in lat.tables.values() for a, b in zip(v, v[1:])) and all(r < 1 for v in lat.tables.values() for _, r in v[:-1])
    # the user's masks and weights are untouched
    assert all(torch.equal(g.keep, keeps[g.name]) for g in plan.groups)
    assert all(torch.equal(v, state[k]) for k, v in plan.model.state_dict().items())
    files = os.listdir(tmp_path)
    assert len(files) == 1 and files[0].endswith('.json')   # no temporary file left behind
    saved = json.loads((tmp_path/files[0]).read_text())
    assert saved['key']['arch'] == arch_digest(plan.model) and saved['cost']['timings'] == lat.cost['timings']
    # a new plan on the same architecture (other weights, other masks) reads the cache: no timing at all
    plan2 = plan_of_net(); plan2.select(plan2.l1_scores(), ratio=0.3)
    t2 = FakeTimer()
    lat2 = LatencyModel(plan2, timer=t2, cache_dir=tmp_path, reps=2)
    assert t2.calls == 0 and lat2.cost['cached'] and lat2.cost['timings'] == lat.cost['timings']
    assert lat2.tables == lat.tables and lat2.dense_s == lat.dense_s
    assert lat2.predict({g.name: g.size for g in plan2.groups}) == pytest.approx(1.)

@pytest.mark.parametrize('change', [dict(bs=4), dict(threads=2), dict(fracs=(0.5,)), dict(round_to=8), dict(example=torch.randn(1, 3, 24, 24))])
def test_cache_key_covers_batch_threads_widths_and_shape(tmp_path, change):
    plan = plan_of_net()
    LatencyModel(plan, timer=FakeTimer(), cache_dir=tmp_path, reps=1)
    t = FakeTimer()
    lat = LatencyModel(plan, timer=t, cache_dir=tmp_path, reps=1, **change)
    assert t.calls > 0 and not lat.cost['cached'] and len(os.listdir(tmp_path)) == 2

def test_cache_key_covers_architecture_and_runtime(tmp_path):
    plan = plan_of_net()
    LatencyModel(plan, timer=FakeTimer(), cache_dir=tmp_path, reps=1)
    other = SlimPlan(nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 8, 3, padding=1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4)),
                     torch.randn(2, 3, 16, 16), verify=False)
    assert arch_digest(other.model) != arch_digest(plan.model)
    t = FakeTimer(); LatencyModel(other, timer=t, cache_dir=tmp_path, reps=1); assert t.calls > 0
    class Named(FakeTimer): name = 'my-runtime'
    t = Named(); lat = LatencyModel(plan, timer=t, cache_dir=tmp_path, reps=1)
    assert t.calls > 0 and lat.runtime == 'my-runtime' and len(os.listdir(tmp_path)) == 3

def test_cache_folder_env_var_no_cache_and_corrupt_file(tmp_path, monkeypatch):
    monkeypatch.setenv(CACHE_ENV, str(tmp_path/'env'))
    assert latency_cache_dir() == tmp_path/'env' and latency_cache_dir(tmp_path/'x') == tmp_path/'x'
    plan = plan_of_net()
    lat = LatencyModel(plan, timer=FakeTimer(), reps=1)
    assert lat.path.parent == tmp_path/'env' and lat.path.exists()
    lat.path.write_text('{ not json')                       # a corrupt file is measured again and replaced
    t = FakeTimer(); lat2 = LatencyModel(plan, timer=t, reps=1)
    assert t.calls > 0 and json.loads(lat2.path.read_text())['tables']
    t = FakeTimer(); lat3 = LatencyModel(plan, timer=t, reps=1, cache=False)
    assert t.calls > 0 and lat3.path is None and len(os.listdir(tmp_path/'env')) == 1

def test_bad_arguments(tmp_path):
    plan = plan_of_net()
    for kw, msg in [(dict(runtime='tensorrt'), '`runtime`'), (dict(bs=0), '`bs`'), (dict(threads=1.5), '`threads`'),
                    (dict(fracs=(1.2,)), '`fracs`'), (dict(tol=0), '`tol`'), (dict(rounds=0), '`rounds`')]:
        with pytest.raises(ValueError, match=msg): LatencyModel(plan, cache_dir=tmp_path, **kw)
    lat = LatencyModel(plan, timer=FakeTimer(), cache_dir=tmp_path, reps=1)
    s = plan.l1_scores()
    for kw, msg in [(dict(ratio=0.5, target_latency=0.5), 'exactly one'), (dict(target_macs=0.5, target_latency=0.5), 'exactly one'),
                    (dict(target_latency=0), '`target_latency` must be'), (dict(target_latency=1), '`target_latency` must be'),
                    (dict(target_latency='fast'), '`target_latency` must be'), (dict(target_latency=0.5, scope='local'), "scope='global'")]:
        with pytest.raises(ValueError, match=msg): plan.select(s, latency=lat, **kw)
    with pytest.raises(ValueError, match='built on this plan'): plan_of_net().select(s, target_latency=0.5, latency=lat)
    assert all(g.n_keep == g.size for g in plan.groups)       # nothing changed

@pytest.mark.parametrize('goal', [0.5, 0.25])
@pytest.mark.parametrize('round_to', [None, 8])
def test_budget_loop_meets_the_goal_end_to_end(tmp_path, goal, round_to):
    plan, t = plan_of_net(min_keep=0.1), FakeTimer()
    lat = LatencyModel(plan, timer=t, cache_dir=tmp_path, reps=2, round_to=round_to)
    n0 = t.calls
    plan.select(plan.l1_scores(), target_latency=goal, latency=lat, round_to=round_to)
    rounds = plan.latency_rounds
    assert 1 <= len(rounds) <= lat.rounds and t.calls - n0 == 2 * lat.check_reps * len(rounds)   # each round: one interleaved check
    assert all({'predicted', 'measured', 'goal', 'predicted_goal', 'widths'} <= set(o) for o in rounds)
    true = t.cost(plan.compact()) / t.cost(lat.dense_model)
    assert true <= goal * (1 + lat.tol), (true, rounds)
    # unrounded steps are fine enough to land within the tolerance; widths in multiples of 8 move a tiny net in coarse steps
    assert true >= goal * (1 - lat.tol if round_to is None else 0.8), (true, rounds)
    assert any(o['measured'] == pytest.approx(true) for o in rounds)
    assert all(g.n_keep >= 1 for g in plan.groups)
    if round_to: assert all(g.n_keep % 8 == 0 or g.n_keep == g.size for g in plan.groups)

def test_budget_loop_corrects_a_wrong_prediction(tmp_path):
    plan, t = plan_of_net(min_keep=0.1), FakeTimer()
    lat = LatencyModel(plan, timer=t, cache_dir=tmp_path, reps=1)
    lat.tables = {k: [(w, 1 - 0.5 * (1 - r)) for w, r in v] for k, v in lat.tables.items()}   # savings predicted at half their size
    plan.select(plan.l1_scores(), target_latency=0.5, latency=lat)
    rounds = plan.latency_rounds
    assert len(rounds) > 1 and abs(rounds[0]['measured'] / 0.5 - 1) > lat.tol         # the first selection missed ...
    assert rounds[1]['predicted_goal'] > rounds[0]['predicted_goal']                  # ... under-pruned: the goal was corrected
    assert abs(t.cost(plan.compact()) / t.cost(lat.dense_model) / 0.5 - 1) <= lat.tol  # ... and met

def test_budget_loop_corrects_an_overhead_the_tables_miss(tmp_path):
    "A fixed cost the per-group tables do not see (the end-to-end checks pay it, 0.49 of the dense time) is corrected by the secant within 4 rounds; scaling by budget / measured was still 9% over after its 6"
    plan, t, slow = plan_of_net(min_keep=0.1), FakeTimer(), FakeTimer(overhead=8e-3)
    lat = LatencyModel(plan, timer=t, check_timer=slow, cache_dir=tmp_path, reps=1)
    plan.select(plan.l1_scores(), target_latency=0.5, latency=lat)
    rounds = plan.latency_rounds
    assert rounds[0]['measured'] > 0.5 * (1 + lat.tol) and rounds[1]['measured'] > 0.5 * (1 + lat.tol)   # both over: no bracket yet
    assert len(rounds) <= 4, rounds
    assert abs(slow.cost(plan.compact()) / slow.cost(lat.dense_model) / 0.5 - 1) <= lat.tol

def test_budget_loop_goes_on_when_a_noisy_table_predicts_the_floor_slower(tmp_path):
    "A table whose narrowest width timed slower (noise) makes the floor's prediction large; the loop stops at the floor by widths, not by that prediction"
    plan, t, slow = plan_of_net(min_keep=0.1), FakeTimer(), FakeTimer(overhead=8e-3)
    lat = LatencyModel(plan, timer=t, check_timer=slow, cache_dir=tmp_path, reps=1)
    g = plan.groups[-1].name
    lat.tables[g] = [(lat.tables[g][0][0], 4.)] + lat.tables[g][1:]     # its narrowest width timed 4x the dense model (a spike)
    floor = lat.predict({o.name: o.floor_units(0.1) * o.unit_width for o in plan.groups})
    plan.select(plan.l1_scores(), target_latency=0.5, latency=lat)
    rounds = plan.latency_rounds
    assert rounds[0]['predicted'] < floor and rounds[0]['measured'] > 0.5 * (1 + lat.tol)   # the first check missed, far above the floor
    assert len(rounds) > 1 and abs(slow.cost(plan.compact()) / slow.cost(lat.dense_model) / 0.5 - 1) <= lat.tol

def test_budget_loop_stops_when_a_correction_repeats_a_checked_selection(tmp_path):
    "Tables that promise no saving below some width (flat): a lower goal selects the same widths, which are not timed again"
    plan, t = plan_of_net(min_keep=0.1), FakeTimer()
    lat = LatencyModel(plan, timer=t, cache_dir=tmp_path, reps=1)
    lat.tables = {k: [(w, max(r, 0.85)) for w, r in v] for k, v in lat.tables.items()}
    n0 = t.calls
    with pytest.warns(UserWarning, match='`target_latency` missed'): plan.select(plan.l1_scores(), target_latency=0.25, latency=lat)
    rounds = plan.latency_rounds
    assert not all(g.n_keep <= g.floor_units(0.1) * g.unit_width for g in plan.groups)   # not at the floors ...
    assert len(rounds) == 1 and t.calls - n0 == 2 * lat.check_reps                       # ... but checked once, not `rounds` times
    assert {g.name: g.n_keep for g in plan.groups} == rounds[0]['widths']

def test_milliseconds_budget(tmp_path):
    plan, t = plan_of_net(min_keep=0.1), FakeTimer()
    lat = LatencyModel(plan, timer=t, cache_dir=tmp_path, reps=1)
    ms = 0.4 * t.cost(lat.dense_model) * 1e3
    plan.select(plan.l1_scores(), target_latency=f'{ms:.6f}ms', latency=lat)
    assert abs(t.cost(plan.compact()) * 1e3 / ms - 1) <= lat.tol

def test_unreachable_budget_warns_and_keeps_the_floors(tmp_path):
    plan = plan_of_net(min_keep=0.5)
    lat = LatencyModel(plan, timer=FakeTimer(), cache_dir=tmp_path, reps=1, rounds=2)
    with pytest.warns(UserWarning, match='`target_latency` missed'): plan.select(plan.l1_scores(), target_latency=0.05, latency=lat)
    assert all(g.n_keep == max(1, -(-g.size // 2)) for g in plan.groups)   # every group at its floor, none emptied
    assert len(plan.latency_rounds) == 1                                  # at the floors, one check is enough

def test_prune_callback_target_latency(tmp_path):
    dls = digits_dls(bs=64)
    t = FakeTimer()
    cb = PruneCallback(target_latency=0.5, criterion=l1, compact_at_end=True,
                       latency_kw=dict(timer=t, cache_dir=tmp_path, reps=1))
    learn = Learner(dls, vgg_tiny())
    with learn.no_bar(), learn.no_logging(): learn.fit(1, 1e-3, cbs=cb)
    dense = LatencyModel(SlimPlan(vgg_tiny(), dls.one_batch()[0][:1], verify=False), timer=t, cache_dir=tmp_path, reps=1).dense_model
    assert abs(t.cost(learn.model) / t.cost(dense) / 0.5 - 1) <= 0.05
    assert cb.latency.cost['timings'] > 0 and pickle.loads(pickle.dumps(cb)).latency is None
    with pytest.raises(ValueError, match='exactly one'): PruneCallback(ratio=0.5, target_latency=0.5)
    with pytest.raises(ValueError, match="granularity='channel'"): PruneCallback(target_latency=0.5, granularity='weight', criterion='magnitude')
    with pytest.raises(ValueError, match='`target_latency` must be'): PruneCallback(target_latency=2)
    with pytest.raises(ValueError, match='`target_latency`, which is not given'): PruneCallback(ratio=0.5, latency_kw=dict(threads=2))
    with pytest.raises(ValueError, match='`runtime`'): PruneCallback(target_latency=0.5, latency_kw=dict(runtime='tvm'))
    kept = cb.latency_kept                                   # the end-to-end check of the selection the plan kept
    assert kept['widths'] == {g.name: g.n_keep for g in cb.plan.groups} and kept['measured'] == pytest.approx(t.cost(learn.model) / t.cost(dense))

def test_check_latency_kw_checks_without_timing():
    "`check_latency_kw` (what `SlimConfig` calls on `latency_kw`) refuses what `LatencyModel` would, building and timing nothing"
    t = FakeTimer()
    assert check_latency_kw(None) == {} and check_latency_kw(dict(runtime='torch', threads=2, timer=t)) == dict(runtime='torch', threads=2, timer=t)
    for kw, msg in [(dict(runtime='tensorrt'), '`runtime`'), (dict(bs=0), '`bs`'), (dict(threads=1.5), '`threads`'), (dict(fracs=(1.2,)), '`fracs`'),
                    (dict(tol=0), '`tol`'), (dict(rounds=0), '`rounds`'), (dict(stat='mean'), '`stat`'), (dict(round_to=0), '`round_to`'),
                    (dict(timer=1), '`timer`'), (dict(check_timer='x'), '`check_timer`'), (dict(plan=1), "no option.*'plan'"), ((1, 2), 'a dict')]:
        with pytest.raises(ValueError, match=msg): check_latency_kw(kw)
    assert check_latency_kw(dict(runtime='tensorrt', timer=t))   # a timer of its own: `runtime` is not used
    assert t.calls == 0

def test_next_goal_scales_then_brackets():
    from fastslim.plan.select import next_goal
    r = lambda pg, m: dict(goal=0.5, predicted_goal=pg, measured=m)
    assert next_goal([r(0.5, 0.8)]) == pytest.approx(0.5 * 0.5 / 0.8)                  # no bracket yet: scaled
    g = next_goal([r(0.5, 0.8), r(0.3, 0.4)])                                          # 0.4 under, 0.8 over the budget
    assert 0.3 < g < 0.5 and g == pytest.approx(0.3 + 0.25 * 0.2)
    assert next_goal([r(0.5, 0.8), r(0.3, 0.4), r(0.35, 0.45), r(0.45, 0.6)]) == pytest.approx(0.35 + 0.1 * (0.5 - 0.45) / 0.15)
    assert next_goal([r(0.5, 0.55), r(0.45, 0.525)]) == pytest.approx(0.4)                # both over, measured = 0.3 + 0.5 x goal: the secant's root
    assert next_goal([r(0.3, 0.35), r(0.35, 0.375)]) == pytest.approx(0.6)                # both under: the same line, from below
    assert next_goal([r(0.5, 0.9), r(0.49, 0.899)]) == pytest.approx(0.49 / 4)            # a flat line: kept within 4x
    assert next_goal([r(0.5, 0.8), r(0.4, 0.85)]) == pytest.approx(0.4 * 0.5 / 0.85)      # slower with a smaller goal (noise): scaled
    assert next_goal([r(0.5, 0.8), r(0.5, 0.7)]) == pytest.approx(0.5 * 0.5 / 0.7)        # no second goal to draw a line through
