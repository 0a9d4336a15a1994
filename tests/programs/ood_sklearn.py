"""The OOD numbers `python -m hpcbnn.evaluate RUN_DIR --ood FILE` wrote, recomputed on one rank
with scikit-learn from every example's predictive (the engine's S samples, scored by hand).
Prints OK.

    mpirun -np 1 python tests/programs/ood_sklearn.py RUN_DIR OOD_FILE
"""

import json
import sys
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import roc_auc_score, roc_curve

from hpcbnn.data import open_dataset
from hpcbnn.parallel.engine import Engine
from hpcbnn.run.checkpoint import latest_checkpoint, load_checkpoint, model_fingerprint
from hpcbnn.run.config import load_config
from hpcbnn.run.job import Job

run_dir, ood_file = Path(sys.argv[1]), sys.argv[2]
report = json.loads((run_dir / "evaluation.json").read_text())
cfg = load_config(run_dir / "config.yaml")
samples = report["samples"]
job = Job.start(cfg, [samples])
info = open_dataset(job.data, "train")
model = job.network(info)
model.load_state_dict(load_checkpoint(latest_checkpoint(run_dir), model_fingerprint(model))["model"])
model.eval()
engine = Engine(
    model, None, job.grid, job.comm, samples=samples, batch_size=cfg.batch_size, n_train=info.n, seed=cfg.seed
)
test = job.loader("test")


def scores(loader) -> dict[str, np.ndarray]:
    """max-probability, entropy and mutual information of every example, in float64 NumPy."""
    probs = []
    with torch.no_grad():
        for batch in loader.epoch(0):
            out = engine.predict(batch.x, batch.rows, loader.batch_size, samples)[:, batch.valid]
            probs.append(out.softmax(-1).double().numpy())
    p = np.concatenate(probs, axis=1)
    mean = p.mean(0)
    entropy = -(mean * np.log(mean)).sum(-1)
    return {
        "maxprob": -mean.max(-1),  # higher means OOD for every score
        "entropy": entropy,
        "mi": entropy - (-(p * np.log(p)).sum(-1)).mean(0),
    }


inside, outside = scores(test), scores(job.ood_loader(test, ood_file))
labels = np.r_[np.zeros(len(inside["mi"])), np.ones(len(outside["mi"]))]
for name in ("maxprob", "entropy", "mi"):
    both = np.r_[inside[name], outside[name]]
    auroc = roc_auc_score(labels, both)
    fpr, tpr, _ = roc_curve(1 - labels, -both, drop_intermediate=False)
    assert abs(report["ood"][f"auroc_{name}"] - auroc) < 1e-12, (name, report["ood"][f"auroc_{name}"], auroc)
    assert report["ood"][f"fpr95_{name}"] == fpr[np.argmax(tpr >= 0.95)], name
assert report["ood"]["count_in"] == 360 and report["ood"]["count_out"] == 360
print("OK", flush=True)
