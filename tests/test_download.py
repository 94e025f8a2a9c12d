"""`dermnb data download / add / check`, offline: official-looking archives built from a few files of the shared data,
served on 127.0.0.1 by a server started here (it stops itself), the source table pointed at it by DERMNB_SOURCES."""
import json, os, shutil, subprocess, sys, zipfile
from pathlib import Path
import pandas as pd
import pytest

BIN = Path(sys.executable).parent/'dermnb'
REPO = Path(__file__).resolve().parents[1]
N_ISIC18, N_ISIC19, N_PH2, N_D7 = 4, 5, 3, 4


def run(*args, env=None):
    return subprocess.run([str(BIN), *map(str, args)], capture_output=True, text=True, timeout=300, env={**os.environ, **(env or {})})


def _zip(path, files):
    with zipfile.ZipFile(path, 'w') as z:
        for name, src in files.items(): z.writestr(name, src if isinstance(src, bytes) else Path(src).read_bytes())
    return path


@pytest.fixture(scope='module')
def mirror(tmp_path_factory, data_root):
    "A folder holding every official file of the source table, built from the shared data, and the ids it holds."
    d = tmp_path_factory.mktemp('mirror'); srv = d/'srv'; srv.mkdir()
    i18, g18 = data_root/'isic2018_task1'/'ISIC2018_Task1-2_Training_Input', data_root/'isic2018_task1'/'ISIC2018_Task1_Training_GroundTruth'
    ids18 = sorted(p.stem for p in i18.glob('ISIC_*.jpg'))[:N_ISIC18]
    _zip(srv/'ISIC2018_Task1-2_Training_Input.zip', {f'ISIC2018_Task1-2_Training_Input/{i}.jpg': i18/f'{i}.jpg' for i in ids18}
         | {'ISIC2018_Task1-2_Training_Input/LICENSE.txt': b'CC-BY-NC 4.0'})
    _zip(srv/'ISIC2018_Task1_Training_GroundTruth.zip', {f'ISIC2018_Task1_Training_GroundTruth/{i}_segmentation.png': g18/f'{i}_segmentation.png' for i in ids18})
    shutil.copy(data_root/'isic2017'/'ISIC-2017_Training_Part3_GroundTruth.csv', srv)
    _zip(srv/'ISIC-2017_Training_Data.zip', {f'ISIC-2017_Training_Data/{i}.jpg': i18/f'{i}.jpg' for i in ids18}
         | {'ISIC-2017_Training_Data/ISIC-2017_Training_Data_metadata.csv': data_root/'isic2017'/'ISIC-2017_Training_Data_metadata.csv'})
    i19 = data_root/'isic2019'
    ids19 = sorted(p.stem for p in (i19/'ISIC_2019_Training_Input').glob('ISIC_*.jpg'))[:N_ISIC19]
    _zip(srv/'ISIC_2019_Training_Input.zip', {f'ISIC_2019_Training_Input/{i}.jpg': i19/'ISIC_2019_Training_Input'/f'{i}.jpg' for i in ids19})
    for f in ('ISIC_2019_Training_GroundTruth.csv', 'ISIC_2019_Training_Metadata.csv'):
        t = pd.read_csv(i19/f); t[t.image.isin(ids19)].to_csv(srv/f, index=False)
    for f in (data_root/'enhance'/'crowd').glob('*.csv'): shutil.copy(f, srv)
    for f in (data_root/'weights'/'taef2').iterdir(): shutil.copy(f, srv)
    # the registration-only releases, as the user would download them
    p2 = data_root/'ph2'/'PH2Dataset'; cases = sorted(p.name for p in (p2/'PH2 Dataset images').iterdir())[:N_PH2]
    files = {'PH2Dataset/PH2_dataset.xlsx': p2/'PH2_dataset.xlsx'}
    for c in cases:
        for sub, f in ((f'{c}_Dermoscopic_Image', f'{c}.bmp'), (f'{c}_lesion', f'{c}_lesion.bmp')):
            files[f'PH2Dataset/PH2 Dataset images/{c}/{sub}/{f}'] = p2/'PH2 Dataset images'/c/sub/f
    _zip(d/'PH2Dataset.zip', files)
    meta = pd.read_csv(data_root/'derm7pt'/'meta'/'meta.csv').iloc[:N_D7]
    _zip(d/'release_v0.zip', {'release_v0/meta/meta.csv': meta.to_csv(index=False).encode()}
         | {f'release_v0/images/{p}': data_root/'derm7pt'/'images'/p for p in meta.derm})
    return {'dir': d, 'srv': srv, 'ids18': ids18, 'ids19': ids19, 'cases': cases}


@pytest.fixture(scope='module')
def server(mirror):
    from dermnb.download import serve_folder
    with serve_folder(mirror['srv'], timeout=240) as srv: yield srv


def overrides(mirror, server, **extra):
    "DERMNB_SOURCES content: every source of the table pointed at the local server."
    from dermnb.download import get_sources
    names = [s.name for d in get_sources({}).values() for s in d.sources]
    url = {n: f'{server.url}/ISIC-2017_Training_Data.zip' if n == 'ISIC-2017_Training_Data_metadata.csv' else f'{server.url}/{n}' for n in names}
    return {n: {'url': url[n], **extra.get(n, {})} for n in names}


def env_for(tmp_path, over):
    p = tmp_path/'sources.json'; p.write_text(json.dumps(over))
    return {'DERMNB_SOURCES': str(p), 'DERMNB_CACHE': str(tmp_path/'cache')}


@pytest.fixture(scope='module')
def downloaded(mirror, server, tmp_path_factory):
    "A root filled by `dermnb data download` from the local server, then `data add` for PH2 and Derm7pt."
    tmp = tmp_path_factory.mktemp('dl'); env = env_for(tmp, overrides(mirror, server)); root = tmp/'root'
    n0 = len(server.log)
    r = run('data', 'download', '--root', root, '--quiet', env=env)
    first = (r, server.log[n0:])
    adds = [run('data', 'add', 'ph2', mirror['dir']/'PH2Dataset.zip', '--root', root, env=env),
            run('data', 'add', 'derm7pt', mirror['dir']/'release_v0.zip', '--root', root, env=env)]
    return {'root': root, 'env': env, 'first': first, 'adds': adds}


def test_full_download_then_summary(downloaded, mirror):
    r, log = downloaded['first']
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert out.count('licence: CC-BY-NC 4.0') == 3 and out.count('licence: research use') == 2     # once per dataset
    assert 'no published checksum; computed sha256' in out                                          # said, for ISIC files
    assert 'dermnb data add ph2 PH2Dataset.rar --root' in out and 'dermnb data add derm7pt release_v0.zip --root' in out
    assert 'https://derm.cs.sfu.ca' in out
    assert all(a.returncode == 0 for a in downloaded['adds']), [a.stderr for a in downloaded['adds']]
    root = downloaded['root']
    rec = json.loads((root/'.download'/'checksums.json').read_text())
    assert set(rec) == {'ISIC2018_Task1-2_Training_Input.zip', 'ISIC2018_Task1_Training_GroundTruth.zip', 'ISIC-2017_Training_Part3_GroundTruth.csv',
                        'ISIC-2017_Training_Data_metadata.csv', 'ISIC_2019_Training_Input.zip', 'ISIC_2019_Training_GroundTruth.csv',
                        'ISIC_2019_Training_Metadata.csv'}                                            # the ones without a table digest
    assert sorted(p.name for p in (root/'.download').iterdir()) == ['checksums.json']                # archives gone, no temp folders
    # the metadata CSV came out of the remote zip through range requests only, not by downloading the archive
    zlog = [l for l in log if l[1] == '/ISIC-2017_Training_Data.zip']
    assert zlog and all(l[2] for l in zlog)
    s = run('data', 'summary', '--json', '--root', root, env=downloaded['env'])
    assert s.returncode == 0, s.stderr
    s = json.loads(s.stdout)
    assert (s['isic2018_task1']['images'], s['isic2018_task1']['masks']) == (N_ISIC18, N_ISIC18)
    assert s['isic2019']['images'] == N_ISIC19 and s['isic2019']['skipped'] == 0
    assert (s['ph2']['images'], s['ph2']['masks']) == (N_PH2, N_PH2)
    assert s['derm7pt']['images'] == N_D7 and s['derm7pt']['skipped'] == 0
    assert s['isic2017']['images'] == 2000 and s['enhance']['images'] == 1450
    ids17 = set(pd.read_csv(mirror['srv']/'ISIC-2017_Training_Part3_GroundTruth.csv').image_id)
    assert s['isic2017']['with_isic2018_task1_image'] == len(ids17 & set(mirror['ids18']))
    import torch
    from dermnb.diffusion import load_taef2                                                          # the weights load
    ae = load_taef2(root/'weights'/'taef2')
    assert sum(p.numel() for p in ae.parameters()) > 2_000_000


def test_second_run_downloads_nothing(downloaded, server):
    n = len(server.log)
    r = run('data', 'download', '--root', downloaded['root'], '--quiet', env=downloaded['env'])
    assert r.returncode == 0, r.stderr
    assert len(server.log) == n                                                                       # not one request
    from dermnb.download import get_sources
    n_files = sum(len(d.sources) for d in get_sources({}).values())
    assert r.stdout.count('present, skipped') == n_files and r.stdout.count('present: ') == 2          # + ph2, derm7pt


def test_check_good_root(downloaded):
    r = run('data', 'check', '--root', downloaded['root'], '--quiet', env=downloaded['env'])
    assert r.returncode == 0, r.stdout + r.stderr
    assert 'all datasets ok' in r.stdout and f'{N_ISIC18} pairs' in r.stdout and 'a subset' in r.stdout


def test_check_broken_root(downloaded, tmp_path):
    root = tmp_path/'root'; shutil.copytree(downloaded['root'], root)
    gt = root/'isic2018_task1'/'ISIC2018_Task1_Training_GroundTruth'; idir = root/'isic2018_task1'/'ISIC2018_Task1-2_Training_Input'
    masks = sorted(gt.iterdir()); masks[0].unlink()                                                 # an image without its mask
    img = sorted(idir.glob('*.jpg'))[1]; img.write_bytes(img.read_bytes()[:2000])                   # a truncated image
    shutil.rmtree(root/'derm7pt')                                                                    # a missing dataset
    (root/'weights'/'taef2'/'taef2_decoder.pth').write_bytes(b'not the weights')                      # a corrupt file
    r = run('data', 'check', '--root', root, '--quiet', env=downloaded['env'])
    assert r.returncode == 1
    out = r.stdout
    assert f"{masks[0].name.replace('_segmentation.png', '.jpg')}: image has no mask" in out
    assert f'{img.name}: unreadable or truncated' in out
    assert 'derm7pt         missing' in out and f'dermnb data add derm7pt release_v0.zip --root {root}' in out
    assert 'taef2_decoder.pth: sha256 differs from the source table' in out
    assert f'fix: dermnb data download --datasets isic2018_task1 --root {root} --force' in out
    assert 'not ok: isic2018_task1, derm7pt, taef2' in out


def test_checksum_mismatch_unpacks_nothing(mirror, server, tmp_path):
    over = overrides(mirror, server, **{'ISIC2018_Task1-2_Training_Input.zip': {'sha256': '0' * 64}})
    root = tmp_path/'root'
    r = run('data', 'download', '--root', root, '--datasets', 'isic2018_task1', '--quiet', env=env_for(tmp_path, over))
    assert r.returncode == 1
    assert 'checksum mismatch, nothing unpacked' in r.stderr and 'ISIC2018_Task1-2_Training_Input.zip' in r.stderr
    assert f"Expected sha256 {'0' * 64}" in r.stderr
    assert not (root/'isic2018_task1').exists()
    assert [p.name for p in (root/'.download').iterdir()] == []                                       # the bad archive is deleted


def test_dropped_connection_resumes_to_the_same_bytes(mirror, server, tmp_path):
    from dermnb.download import download
    over = overrides(mirror, server); root = tmp_path/'root'
    z = mirror['srv']/'ISIC2018_Task1-2_Training_Input.zip'; half = z.stat().st_size // 2
    server.drop_after = half
    with pytest.raises(Exception, match='run the same command again to resume'):
        download('isic2018_task1', root, overrides=over, retries=0, progress=False, say=lambda s: None)
    part = root/'.download'/'ISIC2018_Task1-2_Training_Input.zip.part'
    assert part.stat().st_size == half and not (root/'isic2018_task1').exists()                      # nothing the loaders accept
    n = len(server.log)
    download('isic2018_task1', root, overrides=over, retries=0, progress=False, say=lambda s: None, keep_archives=True)
    assert (root/'.download'/z.name).read_bytes() == z.read_bytes()                                  # the same bytes
    assert ('GET', f'/{z.name}', f'bytes={half}-') in server.log[n:]                                  # resumed, not restarted
    with zipfile.ZipFile(z) as zf:
        for name in zf.namelist():
            if name.endswith('.jpg'): assert (root/'isic2018_task1'/name).read_bytes() == zf.read(name)


def test_dropped_connection_retried_within_one_run(mirror, server, tmp_path):
    server.drop_after = 1000
    r = run('data', 'download', '--root', tmp_path/'root', '--datasets', 'isic2018_task1', '--quiet', env=env_for(tmp_path, overrides(mirror, server)))
    assert r.returncode == 0, r.stderr
    assert server.drop_after is None and len(list((tmp_path/'root'/'isic2018_task1'/'ISIC2018_Task1-2_Training_Input').glob('*.jpg'))) == N_ISIC18


def test_dry_run_lists_sizes_and_writes_nothing(mirror, server, tmp_path):
    r = run('data', 'download', '--root', tmp_path/'root', '--datasets', 'isic2019,taef2', '--dry-run', env=env_for(tmp_path, overrides(mirror, server)))
    assert r.returncode == 0, r.stderr
    from dermnb.download import _fmt_size
    assert f"{_fmt_size((mirror['srv']/'ISIC_2019_Training_Input.zip').stat().st_size)} -> isic2019/ISIC_2019_Training_Input" in r.stdout  # HEAD size
    assert '2.7 MB -> weights/taef2/taef2_encoder.pth' in r.stdout                                    # table size
    assert not (tmp_path/'root').exists()


def test_add_wrong_archive_names_what_was_expected(mirror, tmp_path):
    r = run('data', 'add', 'derm7pt', mirror['dir']/'PH2Dataset.zip', '--root', tmp_path/'root')
    assert r.returncode == 2 and 'Traceback' not in r.stderr
    assert 'PH2Dataset.zip is not the derm7pt release' in r.stderr
    assert "release_v0.zip from https://derm.cs.sfu.ca): a folder holding 'meta/meta.csv' and 'images'" in r.stderr
    assert "It holds: ['PH2Dataset']" in r.stderr
    assert not (tmp_path/'root'/'derm7pt').exists()


def test_unreachable_host_is_one_clear_line(tmp_path):
    over = {'taef2_encoder.pth': {'url': 'http://127.0.0.1:9/taef2_encoder.pth'}}
    r = run('data', 'download', '--root', tmp_path/'root', '--datasets', 'taef2', '--quiet', env=env_for(tmp_path, over))
    assert r.returncode == 1 and 'cannot reach 127.0.0.1:9' in r.stderr and 'Traceback' not in r.stderr


def test_make_figures_without_data_root_starts_nothing(tmp_path):
    r = subprocess.run(['make', '-C', str(REPO), 'figures', f'DERMNB_DATA={tmp_path/"none"}'], capture_output=True, text=True, timeout=60)
    assert r.returncode != 0
    assert f'No data root at {tmp_path/"none"}. No figure was started.' in r.stdout
    assert f'Run:  make data DERMNB_DATA={tmp_path/"none"}' in r.stdout
    assert 'dermnb figures' not in r.stdout and 'pip install' not in r.stdout
