"""Reward-model fidelity on the policy's own samples (docs/results.md, "Can a reward model here
rank the policy's own answers at all?"). Reads a finished tiny run store (round-00 world and SFT, round-01/02
rejection-sampling samples), trains an RM on the named data (or scores with an existing one, --skip_train), and
prints per task family: oracle helpfulness of the RM's best of K, the mean, the oracle's best of K, and the
same-prompt pair accuracy, on prompts whose own-sample pairs the RM never saw.

    python -m bench.rm_fidelity --skip_train --out runs/tiny/round-01/rm_helpfulness/checkpoint
    python -m bench.rm_fidelity --pairs_per_prompt 8 --out /tmp/rm_pp8      # + the policy's own pairs
"""
import argparse
import collections
import dataclasses
import glob
import hashlib
import itertools
import json
import random
import time
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from pipeline.config.run import compose_run
from pipeline.world import Prompt, oracle
from pipeline.world.config import AnnotatorConfig
from pipeline.world.preferences import compare
from pipeline.world.tables import comparison_rows
from pipeline.data.schemas import PREFERENCES
from pipeline.stages.reward_model.algorithm import reward_model_data, train_reward_model, encode_side, _concat
from model.checkpoint import load_checkpoint
from model.tokenizer import load_tokenizer
from model.packing import pad_right

ap = argparse.ArgumentParser()
ap.add_argument('--run', default='runs/tiny')
ap.add_argument('--batches', type=int, default=3)
ap.add_argument('--pairs_per_prompt', type=int, default=0)
ap.add_argument('--epochs', type=int, default=1)
ap.add_argument('--lr', type=float, default=2e-3)
ap.add_argument('--out', default='/tmp/exp/rm')
ap.add_argument('--skip_train', action='store_true')
ap.add_argument('--init', default='large')
ap.add_argument('--world', action='store_true')
a = ap.parse_args()
run = a.run
read = lambda p: pq.read_table(sorted(glob.glob(p))).to_pylist()
prompts = {r['id']: r for r in read(f'{run}/round-00/world_prompts_train/*.parquet')}
def half(pid): return int(hashlib.sha256(pid.encode()).hexdigest(), 16) % 2
s1 = read(f'{run}/round-01/rs_samples/*.parquet')
s2 = read(f'{run}/round-02/rs_samples/*.parquet')

if a.world:
    from pipeline.world import World
    from pipeline.world.tables import preferences_table
    w = World()
    prefs = pa.concat_tables([preferences_table(w, b) for b in range(1, a.batches + 1)])
else:
    prefs = pa.concat_tables([pq.read_table(f) for b in range(1, a.batches + 1) for f in glob.glob(f'{run}/round-00/world_preferences_b{b:02d}/*.parquet')])
cfg = dataclasses.replace(compose_run('experiment=tiny-full').rm, epochs=a.epochs, lr=a.lr)
train, heldout = reward_model_data(prefs, 'helpfulness', cfg)
if a.pairs_per_prompt:
    answers = collections.defaultdict(list)
    for r in s1:
        t = (r['response'] or '').strip()
        if half(r['prompt_id']) == 0 and t and t not in answers[r['prompt_id']]:
            answers[r['prompt_id']].append(t)
    rng = random.Random(0); comps = []
    for pid in sorted(answers):
        p = Prompt.from_row(prompts[pid]); kind = 'safety' if p.is_safety else 'helpfulness'
        ans = answers[pid]; rng.shuffle(ans)

        combos = list(itertools.combinations(range(len(ans)), 2)); rng.shuffle(combos)
        for i, j in combos[:a.pairs_per_prompt]:
            comps.append(compare(p, (ans[i], ans[j]), kind, 9, rng, AnnotatorConfig()))
    pp = pa.Table.from_pylist(comparison_rows(comps, 'pp', 'policy'), schema=PREFERENCES)
    print('policy pairs', pp.num_rows, collections.Counter(pp.column('kind').to_pylist()), collections.Counter(pp.column('rating').to_pylist()))
    train = _concat([train, pp.filter(pc.equal(pp['kind'], 'helpfulness'))])
from pipeline.stages.reward_model.stage import fits_context
train = train.filter(fits_context(train, f'{run}/round-00/sft_large/checkpoint'))
print('train pairs', train.num_rows)
t0 = time.time()
if not a.skip_train:
    m = train_reward_model(f'{run}/round-00/sft_{a.init}/checkpoint', train, cfg, a.out)
    print('trained', m['steps'], 'steps', round(time.time() - t0), 's', 'loss', m['first_loss'], m['last_loss'])
tok = load_tokenizer(a.out); model = load_checkpoint(a.out, head='reward').eval()

@torch.no_grad()
def score(rows):
    enc = [encode_side(tok, prompts[r['prompt_id']]['messages'], r['response']) for r in rows]
    order = sorted(range(len(enc)), key=lambda i: len(enc[i])); out = np.zeros(len(enc))
    for s in range(0, len(order), 64):
        idx = order[s:s + 64]; ids, mask = pad_right([enc[i] for i in idx], tok.pad_id)
        out[idx] = model(ids, attention_mask=mask).float().numpy()
    return out

def report(name, rows):
    sc = score(rows)
    by = collections.defaultdict(lambda: collections.defaultdict(list))
    for r, x in zip(rows, sc):
        p = prompts[r['prompt_id']]
        v = oracle.judge(p['category'], p['meta'], r['response'])
        fam = json.loads(p['meta']).get('task', p['category']) if p['category'] == 'helpful' else p['category']
        by[fam][r['prompt_id']].append((x, v.helpfulness))
    line = []
    for fam in sorted(by):
        best = np.mean([max(v)[1] for v in by[fam].values()]); mean = np.mean([np.mean([y[1] for y in v]) for v in by[fam].values()])
        top = np.mean([max(y[1] for y in v) for v in by[fam].values()])
        acc = [];
        for v in by[fam].values():
            for i in range(len(v)):
                for j in range(i + 1, len(v)):
                    if v[i][1] != v[j][1]:
                        acc.append((v[i][0] - v[j][0]) * (v[i][1] - v[j][1]) > 0)
        line.append(f'{fam}: best {best:.3f} mean {mean:.3f} oracle-best {top:.3f} pairacc {np.mean(acc) if acc else float("nan"):.2f}')
    fams=['arithmetic','count','fact','sort','unit']
    allp=[v for f in fams for v in by[f].values()]
    acc=[(v[i][0]-v[j][0])*(v[i][1]-v[j][1])>0 for v in allp for i in range(len(v)) for j in range(i+1,len(v)) if v[i][1]!=v[j][1]]
    line.append('HELPFUL: best %.3f mean %.3f oracle-best %.3f pairacc %.2f' % (np.mean([max(v)[1] for v in allp]), np.mean([np.mean([y[1] for y in v]) for v in allp]), np.mean([max(y[1] for y in v) for v in allp]), np.mean(acc)))
    print(name); print('\n'.join('  ' + l for l in line))

report('round1 held-out-half', [r for r in s1 if half(r['prompt_id']) == 1])
report('round2 held-out-half', [r for r in s2 if half(r['prompt_id']) == 1])
report('round2 train-half', [r for r in s2 if half(r['prompt_id']) == 0])
