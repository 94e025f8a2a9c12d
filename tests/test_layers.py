"The layering check of .ci/check_sync.py: it passes on the package and fails on an upward import."
import sys, subprocess, textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT/'.ci'))
from check_layers import violations


def test_package_is_layered():
    assert violations(ROOT) == []


def test_upward_import_fails(tmp_path):
    (tmp_path/'nbs').mkdir(); (tmp_path/'dermnb').mkdir()
    (tmp_path/'nbs'/'00_low.py').write_text('#| default_exp low\n')
    (tmp_path/'nbs'/'01_high.py').write_text('#| default_exp high\n')
    (tmp_path/'nbs'/'02_top.py').write_text('#| default_exp top\n')
    (tmp_path/'dermnb'/'high.py').write_text('from dermnb.low import f\nfrom .low import g\n')   # downward: fine
    (tmp_path/'dermnb'/'top.py').write_text('from .high import h\n')
    (tmp_path/'dermnb'/'low.py').write_text(textwrap.dedent('''
        import os
        def g():
            from dermnb.high import h          # upward, inside a function
            return h
        '''))
    (tmp_path/'dermnb'/'low2.py').write_text('')
    assert violations(tmp_path) == [('low', 'high', 4)]
    (tmp_path/'dermnb'/'low.py').write_text('from .top import x\n')                 # upward, relative (as nbdev writes it)
    assert violations(tmp_path) == [('low', 'top', 1)]
    (tmp_path/'dermnb'/'low.py').write_text(textwrap.dedent('''
        import os
        def g():
            from dermnb.high import h          # upward, inside a function
            return h
        '''))
    r = subprocess.run([sys.executable, str(ROOT/'.ci'/'check_layers.py'), str(tmp_path)], capture_output=True, text=True)
    assert r.returncode == 1 and 'dermnb.low (line 4) imports dermnb.high' in r.stdout
