"Shared by the benchmark scripts: write a result table to benchmarks/results/<name>.csv (committed; notebooks cite it)."
import datetime, os, platform
from pathlib import Path
import pandas as pd
import torch

RESULTS = Path(__file__).resolve().parent/'results'

def save_results(rows, name:str)->Path:
    "Write `rows` (list of dicts or a DataFrame) with the machine it ran on; returns the CSV path."
    df = pd.DataFrame(rows).copy()
    df['machine'] = f"{platform.machine()} {os.cpu_count()} cpus, torch {torch.__version__}"
    df['threads'] = torch.get_num_threads()
    df['measured'] = datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')
    RESULTS.mkdir(exist_ok=True)
    p = RESULTS/f'{name}.csv'
    tmp = p.with_suffix('.tmp'); df.to_csv(tmp, index=False); os.replace(tmp, p)
    print(f'results written to {p}')
    return p
