#!/usr/bin/env python
"Write README.md from nbs/index.ipynb (markdown cells as they are, code cells as python blocks)."
import sys, json
from pathlib import Path

def render(nb_path: Path) -> str:
    nb = json.loads(nb_path.read_text())
    out = ['<!-- Generated from nbs/index.ipynb by `make sync`; edit the notebook, not this file. -->\n']
    for c in nb['cells']:
        src = ''.join(c['source']).strip()
        if not src or src.startswith('#| hide'): continue
        if c['cell_type'] == 'markdown': out.append(src + '\n')
        elif c['cell_type'] == 'code': out.append('```python\n' + src + '\n```\n')
    return '\n'.join(out)

if __name__ == '__main__':
    root = Path(__file__).resolve().parents[1]
    text = render(root/'nbs'/'index.ipynb')
    if '--check' in sys.argv:
        sys.exit(0 if (root/'README.md').read_text() == text else 'README.md is out of date with nbs/index.ipynb: run make sync')
    (root/'README.md').write_text(text)
