#!/usr/bin/env bash
# The CPU-sized cross-validation recipes (recipes/cv_cpu_patch.yaml and cv_cpu_global.yaml) on one GPU
# machine: both modes at once, the learner runs of each in parallel processes (`cv --jobs`), the GPU shared.
# The recipes are used as they are except for what a GPU machine changes: device cuda, a larger evaluation
# batch, the data and cache paths. No loader workers: the parallel learner processes use the CPU cores
# (and need no shared memory, which containers often limit). Each mode's `cv` stops at
# LIMIT seconds; an unfinished protocol resumes anywhere with the same `cv` command.
# Results are packed into $OUT: <mode>.tgz (predictions, report, configs, logs, done markers; no weights)
# and, for the patch-mode fold whose ensemble scored best on its validation fold, weights.tgz.* (best.pt of
# its learner runs and its ensemble run; 15 MB pieces), plus summary.txt.
# Usage: DATA=/path/to/cxr4 OUT=/tmp/out [SPLITS=runs/splits_cxr4.csv] [LIMIT=420] [JOBS_PATCH=<cores>]
#        [JOBS_GLOBAL=5] [RECIPE_OVERRIDES='{"learner": {"epochs": 1}}'] bash scripts/gpu_cv.sh
set -u
OUT="${OUT:-/tmp/gpu_cv}"
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PY="${PYTHON:-python3}"
DATA="${DATA:?set DATA to the cxr4 folder (holding images/<label>/...)}"
SPLITS="${SPLITS:-runs/splits_cxr4.csv}"
WORK="${WORK:-/tmp/gpu_cv_work}"
LIMIT="${LIMIT:-420}"
SUMMARY="$OUT/summary.txt"
START=$(date +%s)
mkdir -p "$WORK"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader > "$SUMMARY" 2>&1 || echo "no nvidia-smi" > "$SUMMARY"
echo "cpus $(nproc)" >> "$SUMMARY"

DATA="$DATA" SPLITS="$SPLITS" WORK="$WORK" OVERRIDES="${RECIPE_OVERRIDES:-{\}}" $PY - <<'PYEOF' >> "$SUMMARY" 2>&1
import csv, json, os
from pathlib import Path
import torch, yaml
data, work = Path(os.environ["DATA"]), Path(os.environ["WORK"])
with open(os.environ["SPLITS"], newline="") as fh:
    rows = list(csv.DictReader(fh))
for r in rows:  # the same files under this machine's data folder: images/<label>/<name>
    p = Path(r["path"])
    r["path"] = str(data / "images" / p.parent.name / p.name)
missing = [r["path"] for r in rows if not Path(r["path"]).is_file()]
print(f"splits: {len(rows)} rows, {len(missing)} missing files", missing[:3])
with open(work / "splits.csv", "w", newline="") as fh:
    w = csv.DictWriter(fh, fieldnames=list(rows[0]))
    w.writeheader()
    w.writerows(rows)
over = json.loads(os.environ["OVERRIDES"])
for mode in ("patch", "global"):
    cfg = yaml.safe_load(open(f"recipes/cv_cpu_{mode}.yaml"))
    cfg.update(splits=str(work / "splits.csv"), cache_dir=str(work / "cache"),
               device="cuda" if torch.cuda.is_available() else "cpu")
    cfg["learner"].update(num_workers=0, eval_batch=64)
    for key, value in over.items():
        (cfg[key].update(value) if isinstance(value, dict) else cfg.__setitem__(key, value))
    (work / f"{mode}.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    print(mode, "learner", cfg["learner"], "k", cfg.get("k"), "k_val", cfg.get("k_val"))
PYEOF

run_mode() {  # run_mode MODE JOBS
  local t0=$(date +%s)
  timeout --signal=INT --kill-after=20 "$LIMIT" $PY -m patchflannel.cli cv "$WORK/$1.yaml" --out "$WORK/$1" --jobs "$2" \
    > "$OUT/$1.log" 2>&1
  echo "$1: rc=$? after $(( $(date +%s) - t0 ))s" >> "$SUMMARY"
}
run_mode patch "${JOBS_PATCH:-$(nproc)}" &  # 25 for 16 cores was too many (docs/training.md)
run_mode global "${JOBS_GLOBAL:-5}" &
wait
echo "total $(( $(date +%s) - START ))s" >> "$SUMMARY"

for mode in patch global; do
  [ -d "$WORK/$mode" ] && tar -C "$WORK" --exclude='*.pt' -czf "$OUT/$mode.tgz" "$mode"
done
WORK="$WORK" OUT="$OUT" $PY - <<'PYEOF' >> "$SUMMARY" 2>&1
import csv, os, subprocess
from pathlib import Path
from sklearn.metrics import f1_score
work = Path(os.environ["WORK"]) / "patch"
scores = {}
if (work / "predictions.csv").is_file():
    rows = [r for r in csv.DictReader(open(work / "predictions.csv")) if r["model"] == "flannel_patch" and r["split"] == "val"]
    for fold in sorted({r["fold"] for r in rows}):
        fr = [r for r in rows if r["fold"] == fold]
        scores[fold] = f1_score([r["label"] for r in fr], [r["pred"] for r in fr], average="macro")
print("ensemble val macro-F1 by fold", scores)
fold = max(scores, key=scores.get) if scores else "0"
files = sorted(str(p.relative_to(work.parent)) for p in work.glob(f"*/*/fold{fold}/best.pt"))
files += sorted(str(p.relative_to(work.parent)) for p in work.glob(f"ensemble/fold{fold}/*") if p.suffix != ".pt" or p.name == "best.pt")
print("shipping fold", fold, files)
if files:
    subprocess.run(["tar", "-C", str(work.parent), "-czf", "/tmp/weights.tgz", *files], check=True)
    subprocess.run(["split", "-b", "15M", "/tmp/weights.tgz", os.environ["OUT"] + "/weights.tgz."], check=True)
PYEOF
cat "$SUMMARY"
