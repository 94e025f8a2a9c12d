import os, pytest
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

@pytest.fixture(scope='session')
def data_root():
    "The real dermoscopy data root; CI sets DERMNB_DATA=../shared/dermdata."
    root = os.environ.get('DERMNB_DATA') or str(ROOT.parent/'shared'/'dermdata')
    if not Path(root).is_dir(): pytest.fail(f'DERMNB_DATA={root} is not a folder; the tests need the real data')
    os.environ['DERMNB_DATA'] = root
    return Path(root)
