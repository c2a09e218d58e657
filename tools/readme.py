"""Write `README.md` from `nbs/index.ipynb`: the docs site's front page and the README are one text (nbdev's convention).

Markdown cells are copied as they are; code cells become ```python blocks (without their outputs, which only the
docs site shows); cells starting with `#| hide` are left out. `tests/test_metadata.py` fails when README.md is not
what this script writes.

    python tools/readme.py            # rewrites README.md
"""
import json, os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HEADER = '<!-- Written by tools/readme.py from nbs/index.ipynb: edit the notebook, then run the script. -->'

def _directives(src):
    "The `#| ...` lines at the top of a cell's source"
    return [l for l in src.splitlines() if l.startswith('#|')]

def readme_text(nb_path=ROOT/'nbs'/'index.ipynb'):
    "README.md's text made from the notebook at `nb_path`"
    parts = [HEADER]
    for c in json.loads(Path(nb_path).read_text(encoding='utf-8'))['cells']:
        src = ''.join(c['source']).strip()
        if not src or any(d.split()[1:2] == ['hide'] for d in _directives(src)): continue
        if c['cell_type'] == 'markdown': parts.append(src)
        elif c['cell_type'] == 'code':
            code = '\n'.join(l for l in src.splitlines() if not l.startswith('#|')).strip()
            parts.append(f'```python\n{code}\n```')
    return '\n\n'.join(parts) + '\n'

def main():
    tmp = ROOT/'.README.md.tmp'
    tmp.write_text(readme_text(), encoding='utf-8'); os.replace(tmp, ROOT/'README.md')

if __name__ == '__main__': main()
