"The method commands' argument checks, run as a user would (fast: they fail before any model is loaded or trained)."
import subprocess, sys, os
from pathlib import Path

BIN = Path(sys.executable).parent/'dermnb'

def run(*args):
    return subprocess.run([str(BIN), *args], capture_output=True, text=True, env=os.environ.copy(), timeout=300)

def test_generate_rejects_bad_requests(tmp_path):
    r = run('generate', '--method', 'lesiongen', '--prompt', 'dermoscopy of a melanoma', '--n', '0', '--out', str(tmp_path/'o'))
    assert r.returncode == 2 and 'positive number' in r.stderr
    r = run('generate', '--method', 'lesiongen', '--n', '2', '--out', str(tmp_path/'o'))
    assert r.returncode == 2 and 'needs --prompt' in r.stderr
    r = run('generate', '--method', 'skindualgen', '--n', '2', '--out', str(tmp_path/'o'))
    assert r.returncode == 2 and 'needs --prompt' in r.stderr

def test_edit_rejects_unknown_attribute(tmp_path, data_root):
    img = next((data_root/'ph2'/'PH2Dataset'/'PH2 Dataset images').iterdir())
    r = run('edit', '--images', str(img/f'{img.name}_Dermoscopic_Image'), '--attribute', 'sparkles', '--direction', 'add', '--out', str(tmp_path/'o'))
    assert r.returncode == 2 and 'known attributes: streaks' in r.stderr and not (tmp_path/'o').exists()

def test_caption_rejects_unknown_dataset(tmp_path):
    r = run('caption', '--dataset', 'isic2020', '--out', str(tmp_path/'c.jsonl'))
    assert r.returncode == 2 and 'unknown dataset' in r.stderr and not (tmp_path/'c.jsonl').exists()
