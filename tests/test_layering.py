"""The package keeps its shape (issue #17): an import walk over every module of `fastslim/`.

- no module of `fastslim.plan` imports fastai (the plan works on any PyTorch model; fastai glue lives in `prune`);
- only `fastslim/plan/tp_compat.py` imports torch-pruning (one place to audit at each torch-pruning release);
- no module imports another module's private (`_name`) names, relatively or absolutely.

Imports are found anywhere in a module (inside functions too), by parsing it: nothing is executed."""
import ast
from pathlib import Path
import pytest

PKG = Path(__file__).resolve().parents[1]/'fastslim'
MODULES = sorted(p for p in PKG.rglob('*.py') if '.ipynb_checkpoints' not in p.parts)

def module_name(path):
    "`fastslim.plan.budget` for fastslim/plan/budget.py, `fastslim.plan` for fastslim/plan/__init__.py"
    parts = list(path.relative_to(PKG.parent).with_suffix('').parts)
    return '.'.join(parts[:-1] if parts[-1] == '__init__' else parts)

def imports(path):
    "[(line, absolute module imported, [names imported from it])] of every import statement in `path`"
    tree, res = ast.parse(path.read_text(), str(path)), []
    pkg = module_name(path).split('.')
    if path.name != '__init__.py': pkg = pkg[:-1]          # a relative import starts from the module's package
    for node in ast.walk(tree):
        if isinstance(node, ast.Import): res += [(node.lineno, a.name, []) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = pkg[:len(pkg) - node.level + 1] if node.level else []
            mod = '.'.join(base + ([node.module] if node.module else []))
            res.append((node.lineno, mod, [a.name for a in node.names]))
    return res

def _rel(p): return p.relative_to(PKG.parent).as_posix()

def test_walk_finds_the_package():
    names = {module_name(p) for p in MODULES}
    assert {'fastslim.plan', 'fastslim.plan.tp_compat', 'fastslim.plan.plan', 'fastslim.criteria', 'fastslim.prune'} <= names
    lines = imports(PKG/'plan'/'plan.py')
    assert any(m == 'fastslim.plan.budget' for _, m, _ in lines)            # relative imports resolve to absolute names
    assert any(m == 'fastslim.core' for _, m, _ in lines)

def test_plan_imports_no_fastai():
    bad = [f"{_rel(p)}:{l} imports {m}" for p in MODULES if module_name(p).startswith('fastslim.plan')
           for l, m, _ in imports(p) if m == 'fastai' or m.startswith('fastai.')]
    assert not bad, bad

def test_only_tp_compat_imports_torch_pruning():
    bad = [f"{_rel(p)}:{l} imports {m}" for p in MODULES if module_name(p) != 'fastslim.plan.tp_compat'
           for l, m, _ in imports(p) if m == 'torch_pruning' or m.startswith('torch_pruning.')]
    assert not bad, bad

def private_imports(p):
    "`from <fastslim module> import _name` statements of `p` (`__future__`-style dunders are not private)"
    return [f"{_rel(p)}:{l} imports {n} from {m}" for l, m, ns in imports(p) if m == 'fastslim' or m.startswith('fastslim.')
            for n in ns if n.startswith('_') and not (n.startswith('__') and n.endswith('__'))]

@pytest.mark.parametrize('path', MODULES, ids=[_rel(p) for p in MODULES])
def test_no_module_imports_a_private_name(path):
    bad = private_imports(path)
    assert not bad, bad
