"""Throw-away probe (2026-11-24), kept as the record behind experiments/RESULTS.md 5.2: conv1 -> 5
by auto, L1 magnitude and random, 3 seeds, under four retraining settings, on a base model
from an UNSEEDED draw (torch 2.13 started the process from a random seed; 91.20%), so it
cannot be run again to the same numbers. Run from the repository root with the .venv python."""
import json, sys, time, copy
import torch
sys.path.insert(0, "/work/main")
from experiments import fashion_mnist as fm, selection, torchnet
from experiments.torchnet import TrainConfig
from onnxaom_torch.edit import apply_edits
from onnxaom.edits import RemoveKernels
from pathlib import Path
torch.set_num_threads(1)
out = Path("/tmp/s14/models"); out.mkdir(parents=True, exist_ok=True)
data = fm.load_data("fashion-mnist")
base = fm._initial_model(0)
bp = out / "base.pt"
if bp.exists():
    base.load_state_dict(torch.load(bp))
else:
    torchnet.train(base, data.x_train, data.y_train, TrainConfig(epochs=5, batch_size=128, lr=1e-3, seed=0))
    torch.save(base.state_dict(), bp)
base.eval()
print("base acc", fm._accuracy(base, data), flush=True)
stats, findings, _, onnx_model = fm.statistics_of(base, data, out, "base", 1)
pool = fm.pool_statistics_of(onnx_model, data, 1)
feats = torchnet.prefix_features(base, "conv1", data.x_train)
N = int(sys.argv[1]) if len(sys.argv) > 1 else 5
configs = [(128, 1e-3), (32, 1e-3), (32, 3e-4), (64, 1e-3)]
res = {}
for seed in (0, 1, 2):
    kept_sets = {"unreduced": tuple(range(16)),
                 "auto": selection.proposal_keep(stats, findings, "/conv1/Conv", N, "auto", model=onnx_model, pool_stats=pool),
                 "magnitude": selection.magnitude_keep(base, "conv1", N),
                 "random": selection.random_keep(16, N, seed, salt=1)}
    for name, kept in kept_sets.items():
        for bs, lr in configs:
            removed = tuple(i for i in range(16) if i not in kept)
            model = apply_edits(base, onnx_model, [RemoveKernels("/conv1/Conv", removed)]).module if removed else torchnet.clone(base)
            h = feats[:, list(kept)].contiguous()
            t = time.time()
            torchnet.retrain_suffix(model, "conv1", h, data.y_train, TrainConfig(epochs=1, batch_size=bs, lr=lr, seed=seed))
            acc = fm._accuracy(model, data)
            res.setdefault(f"{bs},{lr}", {}).setdefault(name, []).append(acc)
            print(seed, name, bs, lr, kept, round(acc, 4), round(time.time() - t, 1), flush=True)
json.dump(res, open(f"/tmp/s14/probe{N}.json", "w"), indent=1)
import numpy as np
for c, d in res.items():
    print(c, {k: round(100*float(np.mean(v)), 2) for k, v in d.items()})
