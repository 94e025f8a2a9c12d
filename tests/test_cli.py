"The installed `dermnb` command, run as a user would."
import json, subprocess, sys, os
from pathlib import Path

BIN = Path(sys.executable).parent/'dermnb'

def run(*args, env=None):
    return subprocess.run([str(BIN), *args], capture_output=True, text=True, env={**os.environ, **(env or {})})

def test_data_summary_json_counts(data_root):
    r = run('data', 'summary', '--json', '--root', str(data_root))
    assert r.returncode == 0, r.stderr
    s = json.loads(r.stdout)
    assert set(s) == {'isic2018_task1', 'isic2017', 'isic2019', 'ph2', 'derm7pt', 'enhance'}
    assert (s['isic2018_task1']['images'], s['isic2018_task1']['masks']) == (2294, 2294)
    assert (s['ph2']['images'], s['ph2']['masks']) == (200, 200)
    assert s['derm7pt']['images'] == 1010 and s['isic2019']['images'] == 5984
    assert all('images' in v for v in s.values())

def test_data_summary_text(data_root):
    r = run('data', 'summary', '--root', str(data_root))
    assert r.returncode == 0 and 'ph2: 200 images, 200 masks' in r.stdout and 'concept streaks' in r.stdout

def test_bad_root_is_one_clear_line(tmp_path):
    r = run('data', 'summary', '--json', '--root', str(tmp_path/'missing'))
    assert r.returncode == 2 and 'missing' in r.stderr and 'Traceback' not in r.stderr

def test_wrong_layout_shows_expected(tmp_path, data_root):
    (tmp_path/'isic2018_task1').mkdir()
    r = run('data', 'summary', '--json', '--root', str(tmp_path))
    s = json.loads(r.stdout)
    assert r.returncode == 1 and 'ISIC2018_Task1-2_Training_Input' in r.stderr
    assert s['isic2018_task1']['images'] == 0 and 'ISIC2018_Task1-2_Training_Input' in s['isic2018_task1']['error']

def test_unknown_figure(data_root):
    r = run('figures', 'no_such_figure')
    assert r.returncode == 2 and 'no_such_figure' in r.stderr and 'data_overview' in r.stderr

def _isic_folder(tmp_path, data_root, n):
    "Copy the first n ISIC 2018 images and their masks into tmp_path/img and tmp_path/gt; returns their ids."
    import shutil
    src = data_root/'isic2018_task1'
    ids = sorted(p.stem for p in (src/'ISIC2018_Task1-2_Training_Input').glob('ISIC_*.jpg'))[:n]
    (tmp_path/'img').mkdir(); (tmp_path/'gt').mkdir()
    for i in ids:
        shutil.copy(src/'ISIC2018_Task1-2_Training_Input'/f'{i}.jpg', tmp_path/'img')
        shutil.copy(src/'ISIC2018_Task1_Training_GroundTruth'/f'{i}_segmentation.png', tmp_path/'gt')
    return ids

def test_segment_otsu_then_eval(tmp_path, data_root):
    "dermnb segment writes ISIC-named masks that dermnb eval seg reads."
    ids = _isic_folder(tmp_path, data_root, 4)
    r = run('segment', '--method', 'otsu', '--images', str(tmp_path/'img'), '--out', str(tmp_path/'pred'))
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in (tmp_path/'pred').iterdir()) == [f'{i}_segmentation.png' for i in ids]
    r = run('eval', 'seg', '--pred', str(tmp_path/'pred'), '--gt', str(tmp_path/'gt'), '--json')
    res = json.loads(r.stdout)
    assert r.returncode == 0 and res['n'] == 4 and 0 < res['dice'] <= 1

def test_segment_unreadable_image_names_file(tmp_path, data_root):
    (tmp_path/'img').mkdir(); (tmp_path/'img'/'ISIC_0000000.jpg').write_bytes(b'\xff\xd8\xff truncated')
    r = run('segment', '--method', 'otsu', '--images', str(tmp_path/'img'), '--out', str(tmp_path/'pred'))
    assert r.returncode == 2 and 'ISIC_0000000.jpg' in r.stderr and 'Traceback' not in r.stderr

def test_segment_colour_baseline(tmp_path, data_root):
    "The training-free colour baseline through the CLI: input-size masks that beat an empty guess on real images."
    ids = _isic_folder(tmp_path, data_root, 3)
    r = run('segment', '--method', 'colour', '--images', str(tmp_path/'img'), '--out', str(tmp_path/'pred'), '--uncertainty')
    assert r.returncode == 0 and 'applies to the diffseg methods only' in r.stderr, r.stderr
    r = run('eval', 'seg', '--pred', str(tmp_path/'pred'), '--gt', str(tmp_path/'gt'), '--json')
    assert r.returncode == 0 and json.loads(r.stdout)['dice'] > .5
