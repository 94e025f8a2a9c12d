# %% [markdown]
# # Download
#
# > `dermnb data download`, `data add` and `data check`: the official releases, fetched with checksums and resumable
# > downloads into the layouts that `dermnb.data` reads, a clear path for the datasets behind a registration page, and
# > a validator for any data root.

# %%
#| default_exp download

# %%
#| export
from __future__ import annotations
import os, sys, io, json, time, shutil, socket, hashlib, tempfile, zipfile, tarfile, threading, contextlib, subprocess, warnings
import http.client, http.server, urllib.request, urllib.error, urllib.parse
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Sequence, Callable
from PIL import Image
from dermnb.core import DataError, DermnbError, atomic_write, save_json, load_mask
from dermnb.data import (LAYOUTS, load_isic2017, load_isic2018_task1, load_isic2019, load_ph2, load_derm7pt, load_enhance,
                         load_image_for)

# %%
from fastcore.test import test_eq, test_ne, test_fail
import shutil as _sh
from dermnb.core import data_root
ROOT = data_root()   # the shared development data: read from, never written


# %% [markdown]
# ## The source table
#
# Where each file of each dataset comes from is data, not code: one `DatasetSource` per dataset, holding its licence,
# citation, official count and `Source` entries. A `Source` gives the URL, the size and SHA-256 when they are known,
# and the path it creates under the data root; an archive names the folder inside it that becomes that path.
#
# No official release publishes checksums. The sizes and SHA-256 of the ENHANCE CSVs and the TAEF2 weights were
# computed by us from the files in their upstream git repositories, at the commits the URLs pin; the same bytes are
# in the shared development copy. The ISIC files could not be fetched from the machine this table was written on,
# so their sizes and digests are `None`: the first download computes the SHA-256, prints it, and records it in
# `<root>/.download/checksums.json`, so that a later download of the same file (`--force`) is checked against it.
# The rough sizes in `approx` are for people and are never checked: the "about 10 GB" for the ISIC 2018
# images, the "about 9 GB" that other projects' download scripts quote for ISIC 2019, the shared copies' sizes for the
# ISIC 2017 CSVs, and estimates (said so) for the rest.
#
# The ISIC 2017 metadata CSV is only published inside the multi-GB training-image archive; `zip-member` reads that
# one file out of the remote archive with HTTP range requests (the archive's directory and the member, some
# hundred kilobytes), and falls back to downloading the archive when the server does not support ranges.

# %%
#| export
@dataclass(frozen=True)
class Source:
    "One file of an official release: where it comes from, how it is checked, and what it creates under the data root."
    name:str               # file name; also the key of overrides (DERMNB_SOURCES)
    url:str|None           # download URL
    target:str             # path under the data root that this file creates (a folder for 'zip')
    unpack:str='file'      # 'file': placed as is; 'zip': the archive's `member` folder becomes `target`; 'zip-member': one file of a remote zip
    member:str|None=None   # the folder ('zip') or file ('zip-member') inside the archive
    size:int|None=None     # bytes of the downloaded file; None = not known here
    sha256:str|None=None   # hex digest of the downloaded file (for 'zip-member': of the member); None = no published checksum
    checksum:str=''        # where `sha256` comes from, or why there is none
    approx:str=''          # a rough size for people when `size` is unknown (never checked, never used as a size)


# %%
#| export
@dataclass(frozen=True)
class DatasetSource:
    "A dataset's licence, citation and official files; for datasets behind registration, the steps to get them."
    key:str                # dataset key, as in dermnb.data.LAYOUTS (and 'taef2' for the autoencoder weights)
    title:str              # readable name
    licence:str            # licence / terms of use
    citation:str           # what to cite
    homepage:str           # official page
    official_count:int|None=None # images (or rows) in the official release, for `data check`
    sources:tuple=()       # `Source`s that `dermnb data download` fetches
    register:str|None=None # page to register at and download `user_file` from (no public URL)
    user_file:str|None=None # the file to download there
    add_target:str|None=None # folder under the root that `dermnb data add` fills
    add_markers:tuple=()   # paths the unpacked release folder holds (how `data add` recognises it)


# %%
#| export
_S3 = 'https://isic-challenge-data.s3.amazonaws.com'
_ENHANCE = 'https://raw.githubusercontent.com/raumannsr/ENHANCE/61b4176c4e8b90e6670c5fde67e98dc6babc4308/0_data/crowd'
_TAESD = 'https://raw.githubusercontent.com/madebyollin/taesd/5cccb12dc72074a4be35680c3b108548a7c69978'
_NONE = 'no published checksum: computed on first download, recorded in <root>/.download/checksums.json'
_GIT = 'no published checksum: computed by us from the file in the upstream git repository at the commit in the URL'
_ISIC_CC = 'CC-BY-NC 4.0 (research, non-commercial, with attribution)'
_ENH_CIT = ('R. Raumanns, G. Schouten, M. Joosten, J. P. W. Pluim, V. Cheplygina. ENHANCE (ENriching Health data by '
            'ANnotations of Crowd and Experts): a case study for skin lesion classification. MELBA, 2021.')

SOURCE_TABLE = [
    {'key': 'isic2018_task1', 'title': 'ISIC 2018 Task 1 (lesion segmentation), training set', 'licence': _ISIC_CC,
     'citation': 'N. Codella et al. Skin Lesion Analysis Toward Melanoma Detection 2018: A Challenge Hosted by the ISIC. '
                 'arXiv:1902.03368, 2019; and P. Tschandl et al. The HAM10000 dataset. Sci. Data 5, 180161, 2018.',
     'homepage': 'https://challenge.isic-archive.com/data/#2018', 'official_count': 2594, 'sources': [
        {'name': 'ISIC2018_Task1-2_Training_Input.zip', 'url': f'{_S3}/2018/ISIC2018_Task1-2_Training_Input.zip', 'unpack': 'zip',
         'member': 'ISIC2018_Task1-2_Training_Input', 'target': 'isic2018_task1/ISIC2018_Task1-2_Training_Input',
         'checksum': _NONE, 'approx': 'about 10 GB'},
        {'name': 'ISIC2018_Task1_Training_GroundTruth.zip', 'url': f'{_S3}/2018/ISIC2018_Task1_Training_GroundTruth.zip', 'unpack': 'zip',
         'member': 'ISIC2018_Task1_Training_GroundTruth', 'target': 'isic2018_task1/ISIC2018_Task1_Training_GroundTruth',
         'checksum': _NONE, 'approx': 'tens of MB (an estimate)'}]},
    {'key': 'isic2017', 'title': 'ISIC 2017 Part 3 labels and metadata, training set', 'licence': _ISIC_CC,
     'citation': 'N. Codella et al. Skin Lesion Analysis Toward Melanoma Detection: A Challenge at ISBI 2017, Hosted by '
                 'the ISIC. arXiv:1710.05006, 2017.',
     'homepage': 'https://challenge.isic-archive.com/data/#2017', 'official_count': 2000, 'sources': [
        {'name': 'ISIC-2017_Training_Part3_GroundTruth.csv', 'url': f'{_S3}/2017/ISIC-2017_Training_Part3_GroundTruth.csv',
         'target': 'isic2017/ISIC-2017_Training_Part3_GroundTruth.csv', 'checksum': _NONE, 'approx': 'about 40 kB, like the shared copy'},
        {'name': 'ISIC-2017_Training_Data_metadata.csv', 'url': f'{_S3}/2017/ISIC-2017_Training_Data.zip', 'unpack': 'zip-member',
         'member': 'ISIC-2017_Training_Data/ISIC-2017_Training_Data_metadata.csv',
         'target': 'isic2017/ISIC-2017_Training_Data_metadata.csv', 'checksum': _NONE,
         'approx': 'about 50 kB like the shared copy, read out of the multi-GB ISIC-2017_Training_Data.zip'}]},
    {'key': 'isic2019', 'title': 'ISIC 2019 training set (HAM10000, BCN20000, MSK)', 'licence': _ISIC_CC,
     'citation': 'P. Tschandl et al. The HAM10000 dataset. Sci. Data 5, 180161, 2018; N. Codella et al. arXiv:1710.05006, '
                 '2017; M. Combalia et al. BCN20000: Dermoscopic Lesions in the Wild. arXiv:1908.02288, 2019.',
     'homepage': 'https://challenge.isic-archive.com/data/#2019', 'official_count': 25331, 'sources': [
        {'name': 'ISIC_2019_Training_Input.zip', 'url': f'{_S3}/2019/ISIC_2019_Training_Input.zip', 'unpack': 'zip',
         'member': 'ISIC_2019_Training_Input', 'target': 'isic2019/ISIC_2019_Training_Input', 'checksum': _NONE, 'approx': 'about 9 GB'},
        {'name': 'ISIC_2019_Training_GroundTruth.csv', 'url': f'{_S3}/2019/ISIC_2019_Training_GroundTruth.csv',
         'target': 'isic2019/ISIC_2019_Training_GroundTruth.csv', 'checksum': _NONE, 'approx': 'about 1 MB (an estimate)'},
        {'name': 'ISIC_2019_Training_Metadata.csv', 'url': f'{_S3}/2019/ISIC_2019_Training_Metadata.csv',
         'target': 'isic2019/ISIC_2019_Training_Metadata.csv', 'checksum': _NONE, 'approx': 'about 1 MB (an estimate)'}]},
    {'key': 'ph2', 'title': 'PH2 dermoscopic image database', 'licence': 'research use; cite the paper',
     'citation': 'T. Mendonça, P. M. Ferreira, J. S. Marques, A. R. S. Marcal, J. Rozeira. PH2 - A dermoscopic image '
                 'database for research and benchmarking. IEEE EMBC 2013.',
     'homepage': 'https://www.fc.up.pt/addi/ph2%20database.html', 'official_count': 200,
     'register': 'https://www.fc.up.pt/addi/ph2%20database.html', 'user_file': 'PH2Dataset.rar',
     'add_target': 'ph2/PH2Dataset', 'add_markers': ['PH2 Dataset images', 'PH2_dataset.xlsx']},
    {'key': 'derm7pt', 'title': 'Derm7pt (seven-point checklist dermoscopy dataset)', 'licence': 'research use, non-commercial; cite the paper',
     'citation': 'J. Kawahara, S. Daneshvar, G. Argenziano, G. Hamarneh. Seven-Point Checklist and Skin Lesion '
                 'Classification using Multitask Multimodal Neural Nets. IEEE JBHI 23(2), 2019.',
     'homepage': 'https://derm.cs.sfu.ca', 'official_count': 1011,
     'register': 'https://derm.cs.sfu.ca', 'user_file': 'release_v0.zip',
     'add_target': 'derm7pt', 'add_markers': ['meta/meta.csv', 'images']},
    {'key': 'enhance', 'title': 'ENHANCE crowd A/B/C scores (ISIC 2017 and PH2)',
     'licence': 'no licence file in the repository; public research data, cite the paper', 'citation': _ENH_CIT,
     'homepage': 'https://github.com/raumannsr/ENHANCE', 'official_count': 1450, 'sources': [
        {'name': f'{c}.csv', 'url': f'{_ENHANCE}/{c}.csv', 'target': f'enhance/crowd/{c}.csv', 'size': n, 'sha256': h, 'checksum': _GIT}
        for c, n, h in [
            ('asymmetry', 23762, '7046e4b63cd002962c28f241f1c6798a8421f2a9fdb5227e6082554b30191434'),
            ('border', 23762, '51a6652cf5d5c9476d9c7cef27139f91ae9b05494b095da8569bf90d229f753c'),
            ('color', 23762, 'b5dccf29f88456e8ee5cc5ef94888b5c7ec193ca9b4b0763ee4c12275b425fdb'),
            ('asymmetry_ph2', 2612, '402d82b42c83e80e446b802412eca4f7f351e3661a4e9092ef43068a9d4cbd36'),
            ('border_ph2', 2612, 'b6ccc77473e83f386c6603f3b58e2693e7909edb36f4fac3743410e67141c0a2'),
            ('color_ph2', 2612, '1f54e5d56e3ff7a1e04f6e24d8cfb0da7234a60973fa68326537be56e5dd8e08')]]},
    {'key': 'taef2', 'title': 'TAEF2 tiny autoencoder weights (FLUX.2 latent space)', 'licence': 'MIT (weights/taef2/LICENSE)',
     'citation': 'O. Boer Bohan. TAESD: Tiny AutoEncoder for Stable Diffusion. https://github.com/madebyollin/taesd',
     'homepage': 'https://github.com/madebyollin/taesd', 'official_count': None, 'sources': [
        {'name': f, 'url': f'{_TAESD}/{f}', 'target': f'weights/taef2/{f}', 'size': n, 'sha256': h, 'checksum': _GIT}
        for f, n, h in [
            ('taef2_encoder.pth', 2704692, '10a4e1021e89d7551eaf161352da8dbd0b1aa83872ae28b150c1df1ce2f147b6'),
            ('taef2_decoder.pth', 2704756, '0a44a31e1ae59eb9dbf9359d24942fd3ef5928162c1800d97a28c61d51be0ab5'),
            ('LICENSE', 1073, '261497cf8e9ed613ed1fa5ddf48af32cdf50545b2ccd9edd7eacc91fb9255d6e')]]},
]
DOWNLOAD_DATASETS = [d['key'] for d in SOURCE_TABLE]


# %% [markdown]
# `get_sources` turns the table into `DatasetSource`s and applies overrides, by file name: a dict, or the JSON file
# named by `$DERMNB_SOURCES`, mapping a `Source.name` to new `url`, `size` and `sha256` values. That is how a mirror
# (or a test's local server) replaces the official hosts, and how a user fixes a URL that moved without a new release.

# %%
#| export
def get_sources(overrides:dict|None=None # {source name: {url, size, sha256, ...}}; default the JSON file $DERMNB_SOURCES
               )->dict:
    "The source table as {dataset key: DatasetSource}, with overrides applied."
    if overrides is None and os.environ.get('DERMNB_SOURCES'):
        p = Path(os.environ['DERMNB_SOURCES'])
        try: overrides = json.loads(p.read_text())
        except (OSError, ValueError) as e: raise DataError(f"DERMNB_SOURCES={p}: cannot read the overrides ({e})") from e
    overrides = dict(overrides or {})
    out = {}
    for d in SOURCE_TABLE:
        srcs = []
        for s in d.get('sources', ()):
            s = {**s, **overrides.pop(s['name'], {})}
            srcs.append(Source(**s))
        out[d['key']] = DatasetSource(**{**d, 'sources': tuple(srcs), 'add_markers': tuple(d.get('add_markers', ()))})
    if overrides: raise DataError(f"Unknown source name(s) in the overrides: {sorted(overrides)}; known: "
                                  f"{[s.name for d in out.values() for s in d.sources]}")
    return out


# %%
#| export
def parse_datasets(spec:str|Sequence[str]|None='all' # 'all', a comma-separated string or a list of dataset keys
                  )->list:
    "Dataset keys from a --datasets value, in table order."
    keys = DOWNLOAD_DATASETS if spec in (None, 'all', ['all']) else [k.strip() for k in (spec.split(',') if isinstance(spec, str) else spec) if k.strip()]
    bad = [k for k in keys if k not in DOWNLOAD_DATASETS]
    if bad: raise DermnbError(f"Unknown dataset(s) {bad}; choose from {','.join(DOWNLOAD_DATASETS)} or all")
    return [k for k in DOWNLOAD_DATASETS if k in keys]


# %%
S = get_sources({})
test_eq(list(S), ['isic2018_task1', 'isic2017', 'isic2019', 'ph2', 'derm7pt', 'enhance', 'taef2'])
assert set(LAYOUTS) <= set(S)                                                  # every loader's dataset has a source
assert all(s.url.startswith('https://') and (s.sha256 is None) == (s.size is None) for d in S.values() for s in d.sources)
assert all(s.checksum for d in S.values() for s in d.sources)                 # every digest says where it comes from
test_eq(get_sources({'LICENSE': {'url': 'http://x/L'}})['taef2'].sources[2].url, 'http://x/L')
test_fail(lambda: get_sources({'nope.zip': {}}), contains='nope.zip')
test_eq(parse_datasets('taef2, isic2017'), ['isic2017', 'taef2']); test_eq(parse_datasets('all'), DOWNLOAD_DATASETS)
test_fail(lambda: parse_datasets('isic2020'), contains='isic2018_task1')


# %% [markdown]
# The table's checksums are the shared copy's: the ENHANCE CSVs and TAEF2 files in `$DERMNB_DATA` are byte for byte
# those of the upstream commits.

# %%
#| export
def sha256_file(path:str|Path, # file to hash
                chunk:int=1 << 20 # bytes read at a time
               )->str:
    "Hex SHA-256 of a file, read in chunks."
    h = hashlib.sha256()
    with open(path, 'rb') as f:
        for b in iter(lambda: f.read(chunk), b''): h.update(b)
    return h.hexdigest()


# %%
for k in ('enhance', 'taef2'):
    for s in S[k].sources:
        p = ROOT/s.target
        test_eq((p.stat().st_size, sha256_file(p)), (s.size, s.sha256))


# %% [markdown]
# ## A local server, for mirrors and tests
#
# Tests never reach the internet. `serve_folder` serves a folder on 127.0.0.1 the way the official hosts do: with
# `Content-Length`, `HEAD`, and byte ranges (`206 Partial Content`). It can also drop the connection once after a
# given number of body bytes, to test resuming, and it stops by itself after `timeout` seconds. Every request is
# logged as (method, path, Range header).

# %%
#| export
class _Handler(http.server.BaseHTTPRequestHandler):
    "GET/HEAD with byte ranges over `server.folder`; optionally drops one response after `server.drop_after` bytes."
    protocol_version = 'HTTP/1.1'
    def log_message(self, *a): pass
    def _serve(self, body:bool):
        srv = self.server; rng = self.headers.get('Range')
        srv.log.append((self.command, self.path, rng))
        p = srv.folder/urllib.parse.unquote(self.path.split('?')[0]).lstrip('/')
        if not p.is_file() or srv.folder not in p.resolve().parents:
            self.send_response(404); self.send_header('Content-Length', '0'); self.end_headers(); return
        n = p.stat().st_size; a, b = 0, n - 1
        if rng and rng.startswith('bytes='):
            lo, hi = rng[6:].split('-')
            a = int(lo); b = min(int(hi), n - 1) if hi else n - 1
            if a >= n:
                self.send_response(416); self.send_header('Content-Range', f'bytes */{n}'); self.send_header('Content-Length', '0')
                self.end_headers(); return
            self.send_response(206); self.send_header('Content-Range', f'bytes {a}-{b}/{n}')
        else: self.send_response(200)
        self.send_header('Content-Length', str(b - a + 1)); self.send_header('Accept-Ranges', 'bytes'); self.end_headers()
        if not body: return
        with open(p, 'rb') as f:
            f.seek(a); left = b - a + 1
            drop = srv.drop_after
            while left > 0:
                k = min(left, 1 << 16) if drop is None else min(left, 1 << 16, drop)
                self.wfile.write(f.read(k)); left -= k
                if drop is not None:
                    drop -= k
                    if drop <= 0 and left > 0:   # cut the connection mid-body, once
                        srv.drop_after = None; self.wfile.flush(); self.close_connection = True
                        self.connection.shutdown(socket.SHUT_RDWR); return
    def do_GET(self): self._serve(True)
    def do_HEAD(self): self._serve(False)

@contextlib.contextmanager
def serve_folder(folder:str|Path, # folder whose files are served at /<relative path>
                 drop_after:int|None=None, # drop the first response that is longer after this many body bytes
                 timeout:float=300 # the server shuts itself down after this many seconds
                ):
    "Serve a folder over HTTP on 127.0.0.1 (ranges, HEAD), yielding the server (`.url`, `.log`, `.drop_after`)."
    srv = http.server.ThreadingHTTPServer(('127.0.0.1', 0), _Handler)
    srv.folder, srv.log, srv.drop_after, srv.daemon_threads = Path(folder).resolve(), [], drop_after, True
    srv.url = f'http://127.0.0.1:{srv.server_address[1]}'
    t = threading.Thread(target=srv.serve_forever, daemon=True); t.start()
    stop = threading.Timer(timeout, srv.shutdown); stop.daemon = True; stop.start()
    try: yield srv
    finally: stop.cancel(); srv.shutdown(); srv.server_close()


# %% [markdown]
# ## Resumable downloads
#
# `fetch_url` downloads into `<dest>.part` and renames it to `dest` only when every byte arrived. A dropped
# connection is retried from where it stopped with a `Range` request, `retries` times; after that the partial file
# stays, and running the same command again resumes it. A server that ignores the range (`200` instead of `206`) makes
# the download restart from zero rather than append the wrong bytes. The progress bar shows the size, the rate and
# the time left.

# %%
#| export
class _Interrupted(Exception): pass

def _open(url:str, headers:dict|None=None, method:str='GET', timeout:float=60):
    "urlopen with a User-Agent; HTTP and network errors become DataError naming the URL (416 is returned, not raised)."
    req = urllib.request.Request(url, headers={'User-Agent': 'dermnb', **(headers or {})}, method=method)
    try: return urllib.request.urlopen(req, timeout=timeout)
    except urllib.error.HTTPError as e:
        if e.code == 416: return e
        raise DataError(f"{url}: HTTP {e.code} {e.reason}. The official location may have moved: see data/README.md, "
                        "or point DERMNB_SOURCES at a JSON file with the new URL") from e
    except (urllib.error.URLError, OSError) as e:
        host = urllib.parse.urlparse(url).netloc
        raise DataError(f"cannot reach {host} ({getattr(e, 'reason', e)}): `dermnb data download` needs internet access; "
                        "on an offline machine copy a data root and set DERMNB_DATA") from e

def fetch_url(url:str, # what to download
              dest:str|Path, # final file; bytes collect in <dest>.part until complete
              size:int|None=None, # expected bytes, when known
              retries:int=3, # reconnections after a dropped connection within this call
              progress:bool=True, # tqdm bar with size, rate and ETA
              timeout:float=60 # seconds without data before a connection counts as dropped
             )->Path:
    "Download `url` to `dest`, resuming a partial download with HTTP Range requests."
    from tqdm.auto import tqdm
    dest = Path(dest); part = dest.with_name(dest.name + '.part')
    if dest.exists() and (size is None or dest.stat().st_size == size): return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    bar, attempt = None, 0
    try:
        while True:
            have = part.stat().st_size if part.exists() else 0
            if size is not None and have == size: break
            r = _open(url, {'Range': f'bytes={have}-'} if have else None, timeout=timeout)
            if r.status == 416:                        # nothing left to send: the part is complete, or stale
                total = int(r.headers.get('Content-Range', '*/-1').rsplit('/', 1)[1])
                if have == total: break
                part.unlink(); continue
            if r.status == 200 and have: have = 0      # the server ignored the range: start again
            total = size if size is not None else ((have + int(r.headers['Content-Length'])) if r.headers.get('Content-Length') else None)
            if bar is None: bar = tqdm(total=total, initial=have, unit='B', unit_scale=True, unit_divisor=1024, desc=dest.name,
                                       disable=not progress, file=sys.stderr, leave=False)
            else: bar.reset(total); bar.update(have)
            try:
                with r, open(part, 'ab' if have else 'wb') as f:
                    while chunk := r.read(1 << 20):
                        f.write(chunk); bar.update(len(chunk))
                got = part.stat().st_size
                if total is not None and got < total: raise _Interrupted(f'{got} of {total} bytes')
                if total is not None and got > total: part.unlink(); raise DataError(f"{url}: got {got} bytes, expected {total}")
                break
            except (_Interrupted, http.client.HTTPException, ConnectionError, TimeoutError, socket.timeout) as e:
                attempt += 1
                if attempt > retries:
                    got = part.stat().st_size if part.exists() else 0
                    raise DataError(f"{url}: download interrupted after {got} of {total or '?'} bytes ({type(e).__name__}: {e}); "
                                    f"run the same command again to resume (partial file: {part})") from e
                time.sleep(min(2 ** attempt * .1, 5))
    finally:
        if bar is not None: bar.close()
    os.replace(part, dest)
    return dest


# %%
with tempfile.TemporaryDirectory() as tmp:
    tmp = Path(tmp); (tmp/'srv').mkdir()
    blob = (ROOT/'weights/taef2/taef2_encoder.pth').read_bytes()[:300_000]; (tmp/'srv'/'w.bin').write_bytes(blob)
    with serve_folder(tmp/'srv') as srv:
        test_eq(fetch_url(f'{srv.url}/w.bin', tmp/'a'/'w.bin', progress=False).read_bytes(), blob)
        srv.drop_after = 100_000                                         # dropped once, retried in the same call
        test_eq(fetch_url(f'{srv.url}/w.bin', tmp/'b.bin', progress=False).read_bytes(), blob)
        test_eq(srv.log[-1][2], 'bytes=100000-')
        srv.drop_after = 50_000                                          # no retries: the partial file stays
        test_fail(lambda: fetch_url(f'{srv.url}/w.bin', tmp/'c.bin', retries=0, progress=False), contains='run the same command again')
        test_eq((tmp/'c.bin.part').stat().st_size, 50_000); assert not (tmp/'c.bin').exists()
        test_eq(fetch_url(f'{srv.url}/w.bin', tmp/'c.bin', progress=False).read_bytes(), blob)   # ... and resumes
        n = len(srv.log); fetch_url(f'{srv.url}/w.bin', tmp/'c.bin', progress=False); test_eq(len(srv.log), n)  # present: no request
        test_fail(lambda: fetch_url(f'{srv.url}/missing.zip', tmp/'m.zip', progress=False), contains='HTTP 404')
    test_fail(lambda: fetch_url('http://127.0.0.1:9/x.zip', tmp/'x.zip', progress=False), contains='cannot reach 127.0.0.1:9')


# %% [markdown]
# ## Checksums before unpacking
#
# A downloaded file is checked before anything is unpacked or placed. Against the table's SHA-256 when it has one;
# otherwise against the digest recorded when this file was first downloaded into this root; otherwise the digest is
# computed, printed and recorded (trust on first use, said as such). A mismatch deletes the file, so the next run
# downloads it again, and raises an error that names the file and both digests.

# %%
#| export
def _stage(root:Path)->Path: return root/'.download'

def _records(root:Path)->dict:
    p = _stage(root)/'checksums.json'
    return json.loads(p.read_text()) if p.exists() else {}

def verify_download(path:str|Path, # the downloaded file (or extracted member)
                    src:Source, # its table entry
                    root:str|Path, # the data root (where computed digests are recorded)
                    say:Callable=print # where the "computed, no published checksum" note goes
                   )->str:
    "Check a download's size and SHA-256 against the table or the recorded digest; record it when there is none."
    path, root = Path(path), Path(root)
    n, digest = path.stat().st_size, sha256_file(path)
    rec = _records(root).get(src.name)
    want, whence = (src.sha256, 'the source table') if src.sha256 else ((rec['sha256'], 'the digest recorded at its first download') if rec else (None, ''))
    if (src.size is not None and n != src.size) or (want and digest != want):
        path.unlink()
        exp = ' and '.join(x for x in (f'sha256 {want}' if want else '', f'{src.size} bytes' if src.size is not None else '') if x)
        raise DataError(f"{src.name}: {'checksum' if want and digest != want else 'size'} mismatch, nothing unpacked (file deleted; "
                        f"the next run downloads it again). Expected {exp} ({whence or 'the source table'}), "
                        f"got sha256 {digest} and {n} bytes from {src.url}"
                        + (f". If the official file really changed, delete its entry in {_stage(root)/'checksums.json'}" if rec and not src.sha256 else ''))
    if not want:
        recs = _records(root); recs[src.name] = {'sha256': digest, 'size': n, 'url': src.url, 'recorded': time.strftime('%Y-%m-%d')}
        save_json(recs, _stage(root)/'checksums.json')
        say(f"  {src.name}: no published checksum; computed sha256 {digest} ({n} bytes), recorded in {_stage(root)/'checksums.json'}")
    return digest


# %%
with tempfile.TemporaryDirectory() as tmp:
    tmp = Path(tmp); f = tmp/'x.csv'; f.write_text('a,b\n1,2\n'); msgs = []
    s0 = Source('x.csv', 'http://h/x.csv', 'd/x.csv')
    d = verify_download(f, s0, tmp, msgs.append)
    assert 'no published checksum; computed sha256 ' + d in msgs[0]
    test_eq(_records(tmp)['x.csv']['sha256'], d)
    test_eq(verify_download(f, s0, tmp, msgs.append), d); test_eq(len(msgs), 1)   # second time: checked against the record
    f.write_text('a,b\n1,3\n')
    test_fail(lambda: verify_download(f, s0, tmp), contains='delete its entry in'); assert not f.exists()
    f.write_text('abc')
    test_fail(lambda: verify_download(f, replace(s0, name='y', sha256='0'*64, size=3), tmp), contains=f"Expected sha256 {'0'*64}")


# %% [markdown]
# ## Unpacking through a temporary folder
#
# An archive unpacks into a temporary folder next to the data root's datasets (same file system), and only the
# finished folder is renamed to its place in the layout: an interrupted unpack leaves a `.download/unpack-*` folder
# the loaders never look at, not a half-filled `ISIC2018_Task1-2_Training_Input/`. The folder named in the table is
# found wherever it sits in the archive; an archive without it is an error that lists what the archive holds.
# Member paths that would escape the folder (`../`, absolute paths) are refused.

# %%
#| export
def _top(names:Sequence[str], k:int=8)->list:
    "The first top-level entries of an archive listing."
    return sorted({n.strip('/').split('/')[0] for n in names if n.strip('/')})[:k]

def _find_prefix(names:Sequence[str], folder:str)->str|None:
    "The shallowest 'a/b/<folder>/' prefix of an archive listing, or None."
    best = None
    for n in names:
        parts = n.strip('/').split('/')
        if folder in parts[:-1] or (n.endswith('/') and parts[-1] == folder):
            i = parts.index(folder); pre = '/'.join(parts[:i + 1]) + '/'
            if best is None or pre.count('/') < best.count('/'): best = pre
    return best

def _safe_rel(name:str)->str:
    "Reject archive member paths that are absolute or climb out of the folder."
    p = Path(name)
    if p.is_absolute() or '..' in p.parts: raise DataError(f"archive member {name!r} would be written outside its folder; refusing to unpack")
    return name

def unpack_zip(archive:str|Path, # the verified zip file
               folder:str|None, # folder inside the archive that becomes `target` (None: the whole archive)
               target:str|Path, # final folder
               tmp_dir:str|Path, # where the temporary folder is made (same file system as target)
               progress:bool=True # tqdm bar over the bytes unpacked
              )->Path:
    "Unpack one folder of a zip archive into `target` through a temporary folder renamed into place."
    from tqdm.auto import tqdm
    archive, target = Path(archive), Path(target)
    try: zf = zipfile.ZipFile(archive)
    except (zipfile.BadZipFile, OSError) as e: raise DataError(f"{archive}: not a readable zip archive ({e})") from e
    with zf:
        names = zf.namelist()
        pre = '' if folder is None else _find_prefix(names, folder)
        if pre is None: raise DataError(f"{archive.name} holds no folder {folder}/ (the layout needs {target.name}/); "
                                        f"its top-level entries: {_top(names)}")
        infos = [i for i in zf.infolist() if i.filename.startswith(pre) and i.filename != pre]
        Path(tmp_dir).mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=tmp_dir, prefix=f'unpack-{target.name}-'))
        try:
            with tqdm(total=sum(i.file_size for i in infos), unit='B', unit_scale=True, unit_divisor=1024, desc=f'unpack {archive.name}',
                      disable=not progress, file=sys.stderr, leave=False) as bar:
                for i in infos:
                    out = tmp/'t'/_safe_rel(i.filename[len(pre):])
                    if i.is_dir(): out.mkdir(parents=True, exist_ok=True); continue
                    out.parent.mkdir(parents=True, exist_ok=True)
                    with zf.open(i) as s, open(out, 'wb') as d: shutil.copyfileobj(s, d, 1 << 20)
                    bar.update(i.file_size)
            (tmp/'t').mkdir(exist_ok=True); _place(tmp/'t', target, tmp)
        finally: shutil.rmtree(tmp, ignore_errors=True)
    return target

def _place(src:Path, target:Path, tmp:Path):
    "Rename `src` to `target`; an existing target moves into `tmp` first (and goes with it)."
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.exists(): os.replace(target, tmp/'old')
    os.replace(src, target)


# %%
def _zip(path:Path, files:dict)->Path:
    "A zip archive of {member name: source file or bytes}."
    with zipfile.ZipFile(path, 'w') as z:
        for n, f in files.items(): z.writestr(n, f if isinstance(f, bytes) else Path(f).read_bytes())
    return path

ISIC_IN = ROOT/'isic2018_task1'/'ISIC2018_Task1-2_Training_Input'
ids = sorted(p.stem for p in ISIC_IN.glob('ISIC_*.jpg'))[:3]
with tempfile.TemporaryDirectory() as tmp:
    tmp = Path(tmp)
    z = _zip(tmp/'in.zip', {f'ISIC2018_Task1-2_Training_Input/{i}.jpg': ISIC_IN/f'{i}.jpg' for i in ids} | {'ISIC2018_Task1-2_Training_Input/LICENSE.txt': b'CC-BY-NC'})
    t = unpack_zip(z, 'ISIC2018_Task1-2_Training_Input', tmp/'root'/'isic2018_task1'/'ISIC2018_Task1-2_Training_Input', tmp/'root'/'.download', progress=False)
    test_eq(sorted(p.stem for p in t.glob('*.jpg')), ids)
    test_eq(list((tmp/'root'/'.download').iterdir()), [])                          # no temporary folder left
    test_fail(lambda: unpack_zip(z, 'ISIC2018_Task1_Training_GroundTruth', tmp/'gt', tmp, progress=False), contains="top-level entries: ['ISIC2018_Task1-2_Training_Input']")
    nested = _zip(tmp/'n.zip', {'release/ISIC2018_Task1-2_Training_Input/a.jpg': b'x'})
    test_eq(_find_prefix(zipfile.ZipFile(nested).namelist(), 'ISIC2018_Task1-2_Training_Input'), 'release/ISIC2018_Task1-2_Training_Input/')
    evil = _zip(tmp/'e.zip', {'ISIC2018_Task1-2_Training_Input/../../evil.txt': b'x'})
    test_fail(lambda: unpack_zip(evil, 'ISIC2018_Task1-2_Training_Input', tmp/'e', tmp, progress=False), contains='outside its folder')
    assert not (tmp/'e').exists() and not (tmp.parent/'evil.txt').exists()


# %% [markdown]
# ## One file out of a remote zip
#
# `_RangeFile` is a read-only, seekable file over HTTP range requests: enough for `zipfile` to read an archive's
# central directory at its end and then one member, without downloading the rest.

# %%
#| export
class _NoRanges(Exception): pass

class _RangeFile(io.RawIOBase):
    "A seekable read-only file whose reads are HTTP Range requests; `.fetched` counts the bytes transferred."
    def __init__(self, url:str, timeout:float=60):
        self.url, self.timeout, self.pos, self.fetched = url, timeout, 0, 0
        r = _open(url, {'Range': 'bytes=0-0'}, timeout=timeout)
        with r:
            if r.status != 206 or '/' not in r.headers.get('Content-Range', ''): raise _NoRanges(url)
            self.size = int(r.headers['Content-Range'].rsplit('/', 1)[1])
    def readable(self): return True
    def seekable(self): return True
    def tell(self): return self.pos
    def seek(self, off, whence=0):
        self.pos = {0: off, 1: self.pos + off, 2: self.size + off}[whence]; return self.pos
    def readinto(self, b):
        if self.pos >= self.size or not len(b): return 0
        end = min(self.size, self.pos + len(b)) - 1
        for attempt in range(4):
            try:
                with _open(self.url, {'Range': f'bytes={self.pos}-{end}'}, timeout=self.timeout) as r: data = r.read()
                if len(data) == end - self.pos + 1: break
            except (http.client.HTTPException, ConnectionError, TimeoutError, socket.timeout): pass
            if attempt == 3: raise DataError(f"{self.url}: range request {self.pos}-{end} kept failing")
        b[:len(data)] = data; self.pos += len(data); self.fetched += len(data)
        return len(data)

def fetch_zip_member(url:str, # the remote zip archive
                     member:str, # path of the file inside it (matched by file name when the folder differs)
                     dest:str|Path, # where the member's bytes go (written atomically)
                     stage:str|Path, # folder for the whole archive if the server does not support ranges
                     progress:bool=True # progress bar for the fallback download
                    )->Path:
    "Extract one member of a remote zip into `dest`, reading only what is needed through HTTP ranges."
    dest = Path(dest)
    try: f = io.BufferedReader(_RangeFile(url), buffer_size=1 << 16); local = None
    except _NoRanges:
        local = fetch_url(url, Path(stage)/Path(urllib.parse.urlparse(url).path).name, progress=progress); f = open(local, 'rb')
    try:
        with f, zipfile.ZipFile(f) as zf:
            names = zf.namelist()
            hit = member if member in names else next((n for n in sorted(names, key=len) if n.split('/')[-1] == member.split('/')[-1]), None)
            if hit is None: raise DataError(f"{url}: the archive holds no {member}; its top-level entries: {_top(names)}")
            with zf.open(hit) as s, atomic_write(dest) as d: shutil.copyfileobj(s, d)
    except zipfile.BadZipFile as e: raise DataError(f"{url}: not a readable zip archive ({e})") from e
    finally:
        if local is not None: local.unlink(missing_ok=True)
    return dest


# %%
with tempfile.TemporaryDirectory() as tmp:
    tmp = Path(tmp); (tmp/'srv').mkdir()
    meta = ROOT/'isic2017'/'ISIC-2017_Training_Data_metadata.csv'
    big = _zip(tmp/'srv'/'ISIC-2017_Training_Data.zip', {f'ISIC-2017_Training_Data/{i}.jpg': ISIC_IN/f'{i}.jpg' for i in ids} |
               {'ISIC-2017_Training_Data/ISIC-2017_Training_Data_metadata.csv': meta})
    with serve_folder(tmp/'srv') as srv:
        out = fetch_zip_member(f'{srv.url}/ISIC-2017_Training_Data.zip', 'ISIC-2017_Training_Data/ISIC-2017_Training_Data_metadata.csv', tmp/'m.csv', tmp)
        test_eq(out.read_bytes(), meta.read_bytes())
        assert all(r[2] for r in srv.log)                                        # only range requests
        test_fail(lambda: fetch_zip_member(f'{srv.url}/ISIC-2017_Training_Data.zip', 'x/nothing.csv', tmp/'n.csv', tmp), contains='holds no x/nothing.csv')


# %% [markdown]
# ## Licences, once
#
# Each dataset's licence and citation are printed once per command, before its files are fetched or added.

# %%
#| export
def licence_text(ds:DatasetSource)->str:
    "Two lines: the dataset's licence and what to cite."
    return f"  licence: {ds.licence}\n  cite: {ds.citation}"


# %%
#| export
def registration_steps(ds:DatasetSource, # a dataset behind registration (ph2, derm7pt)
                       root:str|Path # the data root the add command fills
                      )->str:
    "What to do for a dataset without a public URL: the page, the file, and the exact `dermnb data add` command."
    return (f"  {ds.title} needs registration: no public download.\n"
            f"  1. register and download {ds.user_file} at {ds.register}\n"
            f"  2. dermnb data add {ds.key} {ds.user_file} --root {root}\n"
            f"     (it unpacks the archive into {Path(root)/ds.add_target}/; an unpacked folder works too)")


# %%
txt = registration_steps(S['ph2'], '/data')
assert 'dermnb data add ph2 PH2Dataset.rar --root /data' in txt and 'https://www.fc.up.pt/addi/ph2%20database.html' in txt
assert 'CC-BY-NC 4.0' in licence_text(S['isic2019'])


# %% [markdown]
# ## `dermnb data download`
#
# For each selected dataset: print its licence and citation; then, for each of its files that is not yet in the root,
# download (resuming), verify, and unpack or place it. Files already present are skipped, so a second run downloads
# nothing; `force=True` downloads and replaces them. Datasets behind registration print their steps instead.
# `dry_run=True` lists what would be fetched, with sizes: the table's, else the server's `Content-Length` from a
# `HEAD` request, else "size unknown". Archives are deleted once unpacked unless `keep_archives=True`; temporary
# folders that a killed run left in `<root>/.download` are removed (two downloads into one root at once are not
# supported).

# %%
#| export
def _fmt_size(n:int|None)->str:
    if n is None: return 'size unknown'
    for u in ('B', 'kB', 'MB', 'GB', 'TB'):
        if n < 1000 or u == 'TB': return f'{n:.0f} {u}' if u == 'B' else f'{n:.1f} {u}'
        n /= 1000

def _remote_size(url:str, timeout:float=10)->int|None:
    "Content-Length from a HEAD request, or None."
    try:
        with _open(url, method='HEAD', timeout=timeout) as r: return int(r.headers['Content-Length']) if r.headers.get('Content-Length') else None
    except (DataError, ValueError, OSError): return None

def _download_root(root:str|Path|None)->Path:
    root = root or os.environ.get('DERMNB_DATA')
    if not root: raise DataError("No data root to download into: pass --root DIR or set DERMNB_DATA (make data uses ./data)")
    return Path(root).expanduser().resolve()

def fetch_source(src:Source, # the file to fetch
                 root:Path, # data root
                 progress:bool=True, # progress bars
                 keep_archives:bool=False, # keep a zip after unpacking it
                 retries:int=3, # reconnections per download
                 say:Callable=print # output
                )->str:
    "Download, verify and unpack or place one source file under the root."
    target, stage = root/src.target, _stage(root)
    if src.unpack == 'zip-member':
        tmp = stage/f'{src.name}.member'
        fetch_zip_member(src.url, src.member, tmp, stage, progress)
        verify_download(tmp, src, root, say); target.parent.mkdir(parents=True, exist_ok=True); os.replace(tmp, target)
        return 'extracted'
    dl = fetch_url(src.url, stage/src.name, src.size, retries, progress)
    verify_download(dl, src, root, say)
    if src.unpack == 'file':
        target.parent.mkdir(parents=True, exist_ok=True); os.replace(dl, target); return 'downloaded'
    if src.unpack != 'zip': raise DermnbError(f"{src.name}: unknown unpack kind {src.unpack!r}")
    unpack_zip(dl, src.member, target, stage, progress)
    if not keep_archives: dl.unlink()
    return 'unpacked'


# %%
#| export
def download(datasets:str|Sequence[str]='all', # dataset keys, a comma-separated string or 'all'
             root:str|Path|None=None, # data root to fill (created); default $DERMNB_DATA
             force:bool=False, # download and replace files already present
             dry_run:bool=False, # only list what would be fetched, with sizes
             overrides:dict|None=None, # source overrides (see `get_sources`); default $DERMNB_SOURCES
             keep_archives:bool=False, # keep downloaded zips under <root>/.download
             keep_going:bool=False, # report a failing dataset and go on with the next one
             retries:int=3, # reconnections per download
             progress:bool=True, # progress bars
             say:Callable=print # output
            )->list:
    "Fill a data root with the public datasets in the official layouts; print the steps for the others."
    root, table = _download_root(root), get_sources(overrides)
    say(f"data root: {root}" + ('  (dry run: nothing is downloaded)' if dry_run else ''))
    stale = [p for p in _stage(root).glob('*-*') if p.is_dir() and p.name.split('-')[0] in ('unpack', 'add')] if not dry_run else []
    if stale: say(f"removing {len(stale)} temporary folder(s) left by an interrupted run"); [shutil.rmtree(p, ignore_errors=True) for p in stale]
    report, total = [], 0
    for key in parse_datasets(datasets):
        ds = table[key]; say(f"{key}: {ds.title}"); say(licence_text(ds))
        if not ds.sources:
            there = (root/ds.add_target).exists()
            say(f"  present: {root/ds.add_target}" if there and not force else registration_steps(ds, root))
            report.append({'dataset': key, 'source': ds.user_file, 'status': 'present' if there else 'needs registration'}); continue
        for src in ds.sources:
            there = (root/src.target).exists()
            row = {'dataset': key, 'source': src.name, 'target': str(root/src.target), 'size': src.size}
            if there and not force:
                say(f"  present, skipped: {src.target}  (--force downloads it again)"); report.append(row | {'status': 'present'}); continue
            if dry_run:
                n = src.size if src.size is not None else (None if src.unpack == 'zip-member' else _remote_size(src.url))
                total += n or 0
                say(f"  would fetch {src.url}\n    {_fmt_size(n)}{f' ({src.approx})' if n is None and src.approx else ''} -> {src.target}"
                    f"{' (replacing the present copy)' if there else ''}; checksum: {'sha256 ' + src.sha256[:12] + '...' if src.sha256 else 'none published'}")
                report.append(row | {'status': 'would fetch', 'size': n}); continue
            say(f"  fetching {src.name} ({_fmt_size(src.size) if src.size is not None else src.approx or 'size unknown'}) -> {src.target}")
            try: st = fetch_source(src, root, progress, keep_archives, retries, say)
            except DermnbError as e:
                if not keep_going: raise
                print(f"dermnb: error: {key}: {e}", file=sys.stderr); report.append(row | {'status': 'failed', 'error': str(e)}); break
            say(f"  {st}: {src.target}"); report.append(row | {'status': st})
    if dry_run: say(f"total of the known sizes: {_fmt_size(total)}")
    return report


# %% [markdown]
# A whole download from a local mirror: a few real files of the shared data packed as the official archives, served
# on 127.0.0.1, the table pointed at the server by overrides. The loaders read the result; a second run requests
# nothing; a wrong digest stops before unpacking.

# %%
def _mirror(tmp:Path, n:int=3)->tuple:
    "Official-looking archives and files built from n shared ISIC 2018 pairs (+ the ENHANCE CSVs); returns (folder, overrides)."
    srv = tmp/'srv'; srv.mkdir(parents=True)
    gt = ROOT/'isic2018_task1'/'ISIC2018_Task1_Training_GroundTruth'; ids = sorted(p.stem for p in ISIC_IN.glob('ISIC_*.jpg'))[:n]
    _zip(srv/'ISIC2018_Task1-2_Training_Input.zip', {f'ISIC2018_Task1-2_Training_Input/{i}.jpg': ISIC_IN/f'{i}.jpg' for i in ids})
    _zip(srv/'ISIC2018_Task1_Training_GroundTruth.zip', {f'ISIC2018_Task1_Training_GroundTruth/{i}_segmentation.png': gt/f'{i}_segmentation.png' for i in ids})
    for s in S['enhance'].sources: _sh.copy(ROOT/s.target, srv/s.name)
    over = {s.name: {'url': f'/{s.name}'} for k in ('isic2018_task1', 'enhance') for s in S[k].sources}
    return srv, over, ids

with tempfile.TemporaryDirectory() as tmp:
    tmp = Path(tmp); srv_dir, over, ids = _mirror(tmp); out = []
    with serve_folder(srv_dir) as srv:
        over = {k: {'url': srv.url + v['url']} for k, v in over.items()}
        rep = download('isic2018_task1,enhance', tmp/'root', overrides=over, progress=False, say=out.append)
        test_eq([r['status'] for r in rep], ['unpacked', 'unpacked'] + ['downloaded'] * 6)
        test_eq([r.id for r in load_isic2018_task1(tmp/'root', strict=True)], ids)
        test_eq(len(load_enhance(tmp/'root')), 1450)
        test_eq(sum('licence: CC-BY-NC 4.0' in l for l in out), 1)                       # printed once per dataset
        assert any('no published checksum; computed sha256' in l for l in out)           # the ISIC archives: computed, said so
        n = len(srv.log); rep2 = download('isic2018_task1,enhance', tmp/'root', overrides=over, progress=False, say=out.append)
        test_eq(len(srv.log), n); test_eq({r['status'] for r in rep2}, {'present'})      # a second run requests nothing
        test_eq(sorted(p.name for p in (tmp/'root'/'.download').iterdir()), ['checksums.json'])  # archives deleted, no temp folders
        dry = []; download('isic2018_task1', tmp/'root2', overrides=over, dry_run=True, say=dry.append)
        assert any(f"{_fmt_size((srv_dir/'ISIC2018_Task1-2_Training_Input.zip').stat().st_size)} -> isic2018_task1/" in l for l in dry), dry
        assert not (tmp/'root2').exists()                                                # a dry run writes nothing
        bad = over | {'ISIC2018_Task1-2_Training_Input.zip': over['ISIC2018_Task1-2_Training_Input.zip'] | {'sha256': 'f'*64, 'size': None}}
        test_fail(lambda: download('isic2018_task1', tmp/'root3', overrides=bad, progress=False, say=out.append), contains='checksum mismatch')
        assert not (tmp/'root3'/'isic2018_task1').exists()                               # nothing unpacked
        (tmp/'root'/'.download'/'unpack-x-123').mkdir(); msgs = []                       # left by a killed run
        download('enhance', tmp/'root', overrides=over, progress=False, say=msgs.append)
        assert not (tmp/'root'/'.download'/'unpack-x-123').exists() and 'left by an interrupted run' in msgs[1]

# %% [markdown]
# ## `dermnb data add`: datasets behind registration
#
# PH2 and Derm7pt have no public URL. The user registers, downloads the release and hands the file to
# `dermnb data add ph2 FILE` (or `derm7pt`). The archive may be a zip, a tar, PH2's RAR (unpacked with `unrar`, `7z`,
# `bsdtar` or `unar`, whichever is installed) or an already unpacked folder. The release folder is recognised by what
# it holds (`add_markers`), wherever it sits in the archive; a zip or tar that does not hold it is refused before
# anything is unpacked, naming what was expected and what the archive holds. The folder is then read by the
# dataset's loader *before* it is renamed into the root, so the root only ever receives a dataset the loaders accept.

# %%
#| export
_RAR_TOOLS = [('unrar', lambda f, d: ['unrar', 'x', '-o+', '-idq', str(f), str(d) + '/']), ('7z', lambda f, d: ['7z', 'x', '-y', f'-o{d}', str(f)]),
              ('bsdtar', lambda f, d: ['bsdtar', '-xf', str(f), '-C', str(d)]), ('unar', lambda f, d: ['unar', '-q', '-o', str(d), str(f)])]

def _listing(path:Path)->list|None:
    "Member names of a zip or tar archive, relative file paths of a folder; None for other archives."
    if path.is_dir(): return [p.relative_to(path).as_posix() + ('/' if p.is_dir() else '') for p in path.rglob('*')]
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as z: return z.namelist()
    if tarfile.is_tarfile(path):
        with tarfile.open(path) as t: return [m.name + ('/' if m.isdir() else '') for m in t.getmembers()]
    return None

def _release_prefix(names:Sequence[str], markers:Sequence[str])->str|None:
    "The shallowest prefix under which every marker path exists in a listing, or None."
    names = [n[2:] if n.startswith('./') else n for n in names]
    def has(pre, m): return any(n.rstrip('/') == pre + m or n.startswith(pre + m + '/') for n in names)
    cands = set()
    for n in names:
        s = '/' + n.rstrip('/')
        i = s.find('/' + markers[0])
        while i >= 0:
            cands.add(s[1:i + 1]); i = s.find('/' + markers[0], i + 1)
    ok = [p for p in cands if all(has(p, m) for m in markers)]
    return min(ok, key=lambda p: p.count('/')) if ok else None

def _extract(path:Path, dest:Path):
    "Unpack a zip, tar or RAR archive (or copy a folder) into dest."
    if path.is_dir(): shutil.copytree(path, dest/path.name); return
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as z:
            for n in z.namelist(): _safe_rel(n)
            z.extractall(dest); return
    if tarfile.is_tarfile(path):
        with tarfile.open(path) as t: t.extractall(dest, filter='data'); return
    if path.read_bytes()[:4] == b'Rar!' or path.suffix.lower() == '.rar':
        for tool, cmd in _RAR_TOOLS:
            if shutil.which(tool):
                r = subprocess.run(cmd(path, dest), capture_output=True, text=True)
                if r.returncode: raise DataError(f"{path}: {tool} could not unpack it: {(r.stderr or r.stdout).strip()[-300:]}")
                return
        raise DataError(f"{path} is a RAR archive and no RAR tool is installed: install unrar, 7z (p7zip-full), bsdtar "
                        f"(libarchive-tools) or unar, or unpack it yourself and pass the folder instead")
    raise DataError(f"{path}: not a zip, tar or RAR archive, nor a folder")

_CHECK_LOADERS = {'ph2': lambda r: load_ph2(r, join=False), 'derm7pt': load_derm7pt}

def add_dataset(key:str, # 'ph2' or 'derm7pt'
                path:str|Path, # the downloaded archive, or its unpacked folder
                root:str|Path|None=None, # data root (created); default $DERMNB_DATA
                force:bool=False, # replace the dataset if it is already in the root
                say:Callable=print # output
               )->Path:
    "Unpack a dataset downloaded after registration into the official layout under the root."
    table = get_sources(); ds = table.get(key)
    if ds is None or not ds.add_target: raise DermnbError(f"`data add` takes {[k for k, d in table.items() if d.add_target]}, not {key!r}")
    root, path = _download_root(root), Path(path).expanduser()
    if not path.exists(): raise DataError(f"{path}: file not found (download {ds.user_file} at {ds.register})")
    target = root/ds.add_target
    if target.exists() and not force: raise DataError(f"{target} already exists; pass --force to replace it")
    say(f"{key}: {ds.title}"); say(licence_text(ds))
    expected = (f"expected the {ds.title} release ({ds.user_file} from {ds.register}): a folder holding "
                f"{' and '.join(repr(m) for m in ds.add_markers)}")
    names = _listing(path)
    if names is not None and _release_prefix(names, ds.add_markers) is None:
        raise DataError(f"{path.name} is not the {key} release: {expected}. It holds: {_top(names)}")
    _stage(root).mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=_stage(root), prefix=f'add-{key}-'))
    try:
        _extract(path, tmp/'x')
        names = [p.relative_to(tmp/'x').as_posix() + ('/' if p.is_dir() else '') for p in (tmp/'x').rglob('*')]
        pre = _release_prefix(names, ds.add_markers)
        if pre is None: raise DataError(f"{path.name} is not the {key} release: {expected}. It holds: {_top(names)}")
        staged = tmp/'root'/ds.add_target; staged.parent.mkdir(parents=True)
        os.replace(tmp/'x'/pre if pre else tmp/'x', staged)
        with warnings.catch_warnings():
            warnings.simplefilter('ignore'); recs = _CHECK_LOADERS[key](tmp/'root')
        if not recs: raise DataError(f"{path.name}: the {key} loader found no images in it; {expected}")
        _place(staged, target, tmp)
    finally: shutil.rmtree(tmp, ignore_errors=True)
    say(f"  added {len(recs)} images ({len(recs.skipped)} listed but absent) -> {target}")
    return target


# %%
P2 = ROOT/'ph2'/'PH2Dataset'
cases = sorted(p.name for p in (P2/'PH2 Dataset images').iterdir())[:3]
def _ph2_zip(path):
    files = {'PH2Dataset/PH2_dataset.xlsx': P2/'PH2_dataset.xlsx'}
    for c in cases:
        for sub, f in ((f'{c}_Dermoscopic_Image', f'{c}.bmp'), (f'{c}_lesion', f'{c}_lesion.bmp')):
            files[f'PH2Dataset/PH2 Dataset images/{c}/{sub}/{f}'] = P2/'PH2 Dataset images'/c/sub/f
    return _zip(path, files)

with tempfile.TemporaryDirectory() as tmp:
    tmp = Path(tmp); out = []
    add_dataset('ph2', _ph2_zip(tmp/'PH2Dataset.zip'), tmp/'root', say=out.append)
    test_eq([r.id for r in load_ph2(tmp/'root')], cases); assert 'research use' in out[1]
    test_fail(lambda: add_dataset('ph2', tmp/'PH2Dataset.zip', tmp/'root'), contains='already exists; pass --force')
    add_dataset('ph2', tmp/'PH2Dataset.zip', tmp/'root', force=True, say=out.append)
    wrong = _zip(tmp/'release_v0.zip', {'release_v0/meta/meta.csv': ROOT/'derm7pt'/'meta'/'meta.csv'})
    test_fail(lambda: add_dataset('ph2', wrong, tmp/'root2'), contains="expected the PH2 dermoscopic image database release (PH2Dataset.rar")
    test_fail(lambda: add_dataset('ph2', wrong, tmp/'root2'), contains="It holds: ['release_v0']")
    assert not (tmp/'root2'/'ph2').exists()
    add_dataset('ph2', tmp/'root'/'ph2', tmp/'root4', say=out.append)             # an unpacked folder works too
    test_eq(len(load_ph2(tmp/'root4')), 3)
    (tmp/'x.rar').write_bytes(b'Rar!\x1a\x07\x00')
    if not any(shutil.which(t) for t, _ in _RAR_TOOLS): test_fail(lambda: add_dataset('ph2', tmp/'x.rar', tmp/'root5'), contains='install unrar')


# %% [markdown]
# ## `dermnb data check`
#
# `check_root` validates a data root per dataset with the loaders of `dermnb.data`: the layout (a dataset the loader
# cannot find is *missing*), counts against the official release, image/mask pairing, mask sizes against their
# images, and corrupt or truncated files (each image is decoded, big JPEGs at reduced scale; `deep=False` reads only
# headers). Files with a known digest (the table's, or the one recorded at download) are re-hashed. A problem that
# breaks training or evaluation (an unpaired mask, a size mismatch, a corrupt file) is an error; a subset of the
# official release, or label rows whose image is absent (the loaders skip them), is a warning. Every dataset that is
# not ok comes with the command that fixes it.

# %%
#| export
def _fix(ds:DatasetSource, root:Path, broken:bool)->str:
    if ds.sources: return f"dermnb data download --datasets {ds.key} --root {root}" + (' --force' if broken else '')
    return f"register at {ds.register}, download {ds.user_file}, then: dermnb data add {ds.key} {ds.user_file} --root {root}" + (' --force' if broken else '')

def _probe(rec, deep:bool)->tuple:
    "Open a record's image (decoding it when deep) and mask; returns the image size or raises DataError."
    if deep:
        _, full = load_image_for(rec.image, 8, 'pad')
        if rec.mask is not None: load_mask(rec.mask, size=full)
        return full
    try:
        with Image.open(rec.image) as im: full = im.size
        if rec.mask is not None:
            with Image.open(rec.mask) as m:
                if m.size != full: raise DataError(f"{rec.mask}: mask size {m.size[0]}x{m.size[1]} differs from its image {full[0]}x{full[1]}")
    except OSError as e: raise DataError(f"{getattr(e, 'filename', None) or rec.image}: unreadable image header ({e})") from e
    return full

def _check_images(recs, deep:bool, progress:bool, name:str)->tuple:
    from tqdm.auto import tqdm
    errs, sizes = [], set()
    for r in tqdm(recs, desc=f'check {name}', disable=not progress, leave=False):
        try: sizes.add(_probe(r, deep))
        except DataError as e: errs.append(str(e))
    return errs, sizes

def _check_root_dir(root)->Path:
    "The root to check: it must exist; the error says how to create it."
    root = root or os.environ.get('DERMNB_DATA')
    if not root: raise DataError("No data root: set DERMNB_DATA or pass --root (make data downloads one into ./data)")
    root = Path(root).expanduser()
    if not root.is_dir(): raise DataError(f"Data root {root} does not exist or is not a folder: run `dermnb data download --root {root}` (or make data)")
    return root

def check_dataset(key:str, # dataset key
                  root:str|Path|None=None, # data root; default $DERMNB_DATA
                  deep:bool=True, # decode every image and mask (False: headers only)
                  progress:bool=False, # tqdm bar over the images
                  overrides:dict|None=None # source overrides (default $DERMNB_SOURCES)
                 )->dict:
    "Validate one dataset of a data root: status ('ok', 'missing', 'broken'), counts, errors, warnings and the fix."
    root = _check_root_dir(root); ds = get_sources(overrides)[key]
    out = {'dataset': key, 'status': 'ok', 'counts': {}, 'errors': [], 'warnings': [], 'fix': ''}
    def missing(why): out.update(status='missing', errors=[why], fix=_fix(ds, root, False)); return out
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        try:
            if key == 'isic2018_task1':
                recs = load_isic2018_task1(root, join=False); d = root/'isic2018_task1'
                out['counts'] = {'images': len(list((d/'ISIC2018_Task1-2_Training_Input').glob('ISIC_*.jpg'))),
                                 'masks': len(list((d/'ISIC2018_Task1_Training_GroundTruth').glob('ISIC_*_segmentation.png'))), 'pairs': len(recs)}
                out['errors'] += [f'{p}: {w}' for p, w in recs.skipped]
            elif key in ('isic2019', 'ph2', 'derm7pt'):
                recs = {'isic2019': load_isic2019, 'ph2': lambda r: load_ph2(r, join=False), 'derm7pt': load_derm7pt}[key](root)
                out['counts'] = {'images': len(recs)} | ({'masks': sum(r.mask is not None for r in recs)} if key == 'ph2' else {})
                (out['errors'] if key == 'ph2' else out['warnings']).extend(f'{p}: {w}' for p, w in recs.skipped)
            elif key == 'isic2017':
                recs = []; t = load_isic2017(root); out['counts'] = {'rows': len(t), 'with_metadata': int(t['sex'].notna().sum())}
            elif key == 'enhance':
                recs = []; t = load_enhance(root)
                out['counts'] = {'rows': len(t), 'isic': int(t.index.str.startswith('ISIC').sum()), 'ph2': int(t.index.str.startswith('IMD').sum())}
            else: recs = []
        except DataError as e: return missing(str(e).split('\n')[0])
    for s in ds.sources:                                  # files with a known digest; for 'taef2' the files are the dataset
        p = root/s.target
        if not p.exists():
            if key == 'taef2': return missing(f"{p} not found")
            continue
        want = s.sha256 or _records(root).get(s.name, {}).get('sha256')
        if p.is_file() and want and sha256_file(p) != want: out['errors'].append(f"{p}: sha256 differs from {'the source table' if s.sha256 else 'the one recorded at download'}")
    if key == 'taef2': out['counts'] = {'files': sum((root/s.target).exists() for s in ds.sources)}
    if recs:
        errs, sizes = _check_images(recs, deep, progress, key); out['errors'] += errs
        w, h = zip(*sizes) if sizes else ((0,), (0,))
        out['counts']['image_sizes'] = f'{min(w)}x{min(h)} to {max(w)}x{max(h)}'
    n = out['counts'].get('pairs', out['counts'].get('images', out['counts'].get('rows')))
    if ds.official_count and n is not None and n < ds.official_count:
        out['warnings'].append(f"{n} of the official release's {ds.official_count}: a subset")
    if not n and key != 'taef2': out['errors'].append('no images or rows found')
    if out['errors']: out.update(status='broken', fix=_fix(ds, root, True))
    return out


# %%
#| export
def check_root(root:str|Path|None=None, # data root; default $DERMNB_DATA
               datasets:str|Sequence[str]='all', # which datasets
               deep:bool=True, # decode every file (False: headers only)
               progress:bool=False # tqdm bars
              )->dict:
    "Validate a data root: {dataset: check_dataset result}."
    root = _check_root_dir(root)
    return {k: check_dataset(k, root, deep, progress) for k in parse_datasets(datasets)}


# %%
#| export
def format_check(res:dict, # check_root's result
                 k:int=5 # problems listed per dataset
                )->str:
    "A readable report: one line per dataset, its problems, and the command that fixes it."
    lines = []
    for key, r in res.items():
        counts = ', '.join(f'{v} {n}' if isinstance(v, int) else f'{n} {v}' for n, v in r['counts'].items())
        lines.append(f"{key:15s} {r['status']:8s} {counts}")
        for kind in ('errors', 'warnings'):
            for e in r[kind][:k]: lines.append(f"    {kind[:-1]}: {e}")
            if len(r[kind]) > k: lines.append(f"    ... and {len(r[kind]) - k} more {kind}")
        if r['fix']: lines.append(f"    fix: {r['fix']}")
    bad = [k for k, r in res.items() if r['status'] != 'ok']
    lines.append('all datasets ok' if not bad else f"not ok: {', '.join(bad)}")
    return '\n'.join(lines)


# %% [markdown]
# The shared development root passes (it is a subset of the official releases, which is a warning), and so does the
# little root downloaded above; a broken copy of it fails with the file names and the fix.

# %%
res = check_root(ROOT, 'isic2017,enhance,taef2,ph2', deep=False)
test_eq({k: r['status'] for k, r in res.items()}, {'isic2017': 'ok', 'enhance': 'ok', 'taef2': 'ok', 'ph2': 'ok'})
test_eq((res['ph2']['counts']['images'], res['enhance']['counts']['rows']), (200, 1450))
with tempfile.TemporaryDirectory() as tmp:
    tmp = Path(tmp); srv_dir, over, ids = _mirror(tmp)
    with serve_folder(srv_dir) as srv:
        download('isic2018_task1,enhance', tmp/'root', overrides={k: {'url': srv.url + v['url']} for k, v in over.items()}, progress=False, say=lambda s: None)
    res = check_root(tmp/'root', 'isic2018_task1,enhance,ph2')
    test_eq({k: r['status'] for k, r in res.items()}, {'isic2018_task1': 'ok', 'enhance': 'ok', 'ph2': 'missing'})
    assert 'a subset' in res['isic2018_task1']['warnings'][0] and 'dermnb data add ph2 PH2Dataset.rar' in res['ph2']['fix']
    g = tmp/'root'/'isic2018_task1'/'ISIC2018_Task1_Training_GroundTruth'
    (g/f'{ids[0]}_segmentation.png').unlink()                                        # an image without its mask
    Image.open(g/f'{ids[1]}_segmentation.png').resize((10, 10)).save(g/f'{ids[1]}_segmentation.png')   # a wrong size
    b = (ISIC_IN/f'{ids[2]}.jpg').read_bytes(); (tmp/'root'/'isic2018_task1'/'ISIC2018_Task1-2_Training_Input'/f'{ids[2]}.jpg').write_bytes(b[:len(b)//2])
    (tmp/'root'/'enhance'/'crowd'/'color.csv').write_text('ID,i,ii,iii\nISIC_0000000,1,1,1\n')
    res = check_root(tmp/'root', 'isic2018_task1,enhance'); txt = format_check(res)
    test_eq({k: r['status'] for k, r in res.items()}, {'isic2018_task1': 'broken', 'enhance': 'broken'})
    for s in (f'{ids[0]}.jpg: image has no mask', 'differs from its image', f'{ids[2]}.jpg: unreadable or truncated', 'color.csv: sha256 differs',
              f'fix: dermnb data download --datasets isic2018_task1 --root {tmp/"root"} --force', 'not ok: isic2018_task1, enhance'):
        assert s in txt, (s, txt)
test_fail(lambda: check_root('/no/such/root'), contains='dermnb data download --root /no/such/root')
