"Figure notebooks run through the runner, as `make figures` runs them, into a temporary folder."
import subprocess, sys, json
from pathlib import Path
import pandas as pd

BIN = Path(sys.executable).parent/'dermnb'

def test_data_overview_figure(tmp_path, data_root):
    r = subprocess.run([str(BIN), 'figures', 'data_overview', '--out', str(tmp_path), '--quiet', '--root', str(data_root)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    out = tmp_path/'data_overview'
    for f in ('counts.csv', 'splits.csv', 'samples_isic2018_task1.png', 'diagnosis_counts.png', 'concepts_ph2.png'):
        assert (out/f).exists(), f
    counts = pd.read_csv(out/'counts.csv').set_index('dataset')
    assert counts.loc['isic2018_task1', 'masks'] == 2294 and (counts.profile == 'quick').all()
    idx = json.loads((tmp_path/'index.json').read_text())
    assert idx[0]['name'] == 'data_overview' and idx[0]['status'] == 'ok'
    assert 'data_overview' in (tmp_path/'README.md').read_text()
