#!/usr/bin/env python
"""Write README.md from nbs/index.ipynb (markdown cells as they are, code cells as python blocks), with the results
table generated from the committed figure CSVs (`dermnb.runner.results_markdown`) at the `<!-- results-table -->` marker."""
import sys, json
from pathlib import Path

MARKER = '<!-- results-table -->'

def render(nb_path: Path, figures: Path) -> str:
    nb = json.loads(nb_path.read_text())
    out = ['<!-- Generated from nbs/index.ipynb by `make sync`; edit the notebook, not this file. -->\n']
    for c in nb['cells']:
        src = ''.join(c['source']).strip()
        if not src or src.startswith('#| hide'): continue
        if c['cell_type'] == 'markdown': out.append(src + '\n')
        elif c['cell_type'] == 'code': out.append('```python\n' + src + '\n```\n')
    text = '\n'.join(out)
    if MARKER in text:
        from dermnb.runner import results_markdown
        text = text.replace(MARKER, results_markdown(figures, link_prefix='figures/'))
    return text

if __name__ == '__main__':
    root = Path(__file__).resolve().parents[1]
    text = render(root/'nbs'/'index.ipynb', root/'figures')
    if '--check' in sys.argv:
        sys.exit(0 if (root/'README.md').read_text() == text else 'README.md is out of date with nbs/index.ipynb or the figure CSVs: run make sync')
    (root/'README.md').write_text(text)
