#!/usr/bin/env bash
# GPU check for the engine (issue 5): GPU/CuPy tests, then the bench sweep (preset flannel5, random weights,
# synthetic phantom JPEGs, nvJPEG loader), eager fp16 and torch.compile, and a targets summary.
# Every section has its own time limit and writes its log (and any error) under $OUT; a failing section
# never stops the next. On a machine without CUDA it runs CPU-sized versions quickly (a dry run).
# Usage: OUT=/tmp/x bash scripts/gpu_check.sh
# SECTIONS picks sections (default: env tests eager_fp16 compiled_fp16 targets), so the sweep and the compiled
# run can go in two calls: SECTIONS="env tests eager_fp16 targets" first, then SECTIONS="compiled_fp16 targets".
# targets also reads the bench.json files under PREVIOUS, a folder of earlier results on the same machine.
# CN and CPACK: images and images a call of the compiled run (default 16 and 4).
# LSTREAMS: learner-stream counts every bench run compares (default "1, 5" on a GPU; the loop runs on one).
# overlap (named in SECTIONS only): the learners on one stream against 2 and 5 streams and a CUDA graph;
# OVERLAP_ARGS=--compile times them compiled (OVERLAP_LIMIT seconds, default 150).
# segmenter (named in SECTIONS only): scripts/gpu_segmenter.py (SEGMENTER_LIMIT, default 120; SEGMENTER_REPEATS).
# On a GPU (or with PACK_OUT=1), after each section every file but summary.txt and targets.json goes into
# $OUT/gpu_check.tgz, rewritten whole (the device tool returns at most 8 files, and a call stopped when its device
# time runs out still returns the sections done, packed, and the one under way, loose).
# Targets over two calls' results, worked out afterwards on any machine:
#   SECTIONS=targets PREVIOUS=<first call's files, unpacked> OUT=<second call's, unpacked> bash scripts/gpu_check.sh
set -u
export PYTHONUNBUFFERED=1  # a section stopped at its limit still leaves its log
OUT="${OUT:-/tmp/gpu_check}"
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
PY="${PYTHON:-python}"
SUMMARY="$OUT/summary.txt"
: > "$SUMMARY"
START=$(date +%s)

SECTIONS=" ${SECTIONS:-env tests eager_fp16 compiled_fp16 targets} "

ARCHIVE=gpu_check.tgz; i=1
while [ -e "$OUT/$ARCHIVE" ]; do i=$((i + 1)); ARCHIVE="gpu_check.$i.tgz"; done  # a second run into OUT
STAGE=""  # where packed sections' files wait (set once CUDA is known)

archive() {  # rewrite the archive from the packed files and the new ones, then move the new ones out of OUT
  [ -n "$STAGE" ] || return 0
  local new
  new=$(cd "$OUT" && find . -mindepth 1 -maxdepth 1 ! -name summary.txt ! -name targets.json ! -name 'gpu_check*')
  [ -n "$new" ] || return 0
  # Nothing moves until the archive holding it is in place: a failure or a kill in between loses no file.
  if tar -czf "$OUT/$ARCHIVE.part" -C "$STAGE" . -C "$OUT" $new && mv "$OUT/$ARCHIVE.part" "$OUT/$ARCHIVE"; then
    (cd "$OUT" && mv -t "$STAGE" $new)
  else
    rm -f "$OUT/$ARCHIVE.part"
    echo "packing failed: the files stay in $OUT" | tee -a "$SUMMARY"
  fi
}

section() {  # section NAME LIMIT_SECONDS COMMAND...
  local name=$1 limit=$2; shift 2
  case "$SECTIONS" in *" $name "*) ;; *) echo "== $name: not in SECTIONS" | tee -a "$SUMMARY"; return 0 ;; esac
  local t0=$(date +%s)
  echo "== $name (limit ${limit}s)" | tee -a "$SUMMARY"
  timeout --signal=TERM --kill-after=10 "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  echo "   rc=$rc after $(( $(date +%s) - t0 ))s (total $(( $(date +%s) - START ))s)" | tee -a "$SUMMARY"
  [ $rc -ne 0 ] && tail -n 30 "$OUT/$name.log" > "$OUT/$name.error.txt"
  archive
  return 0
}

GPU=$($PY -c "import torch; print(int(torch.cuda.is_available()))" 2>/dev/null || echo 0)
echo "cuda available: $GPU" | tee -a "$SUMMARY"
[ "${PACK_OUT:-$GPU}" = "1" ] && STAGE=$(mktemp -d)

section env 60 $PY - <<'PYEOF'
import importlib, platform, torch
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda)
if torch.cuda.is_available():
    print("device", torch.cuda.get_device_name(0), torch.cuda.get_device_properties(0).total_memory // 2**20, "MiB")
for mod in ("torchvision", "numpy", "scipy", "PIL", "cupy", "onnxruntime", "onnx", "tensorrt", "nvidia.dali",
            "matplotlib", "pytest", "typer", "rich", "pydicom"):
    try:
        m = importlib.import_module(mod)
        print(mod, getattr(m, "__version__", "?"))
    except Exception as exc:
        print(mod, "MISSING", type(exc).__name__, exc)
PYEOF

if $PY -c "import pytest" 2>/dev/null; then
  section tests "${TESTS_LIMIT:-120}" $PY -m pytest -p no:cacheprovider -v -rs --durations=0 \
    -m gpu tests/test_sampler.py tests/test_backends.py tests/test_loaders.py tests/test_engine_gpu.py
else
  echo "   pytest missing: tests skipped" | tee -a "$SUMMARY"
fi

if [ "$GPU" = "1" ]; then
  PRESET=flannel5; KS="${KS:-100, 50, 16}"; N=${N:-24}; LOOP_N=${LOOP_N:-2}; REPEATS=${REPEATS:-3}
  EAGER_LIMIT=${EAGER_LIMIT:-220}; COMPILE_LIMIT=${COMPILE_LIMIT:-160}; CN=${CN:-16}; PACK=4; LSTREAMS="${LSTREAMS:-1, 5}"
else
  PRESET=tiny; KS="4,"; N=2; LOOP_N=1; REPEATS=1; EAGER_LIMIT=120; COMPILE_LIMIT=5; CN=2; PACK=2; LSTREAMS="1,"
fi

bench() {  # bench NAME LIMIT PYTHON_CONFIG_KWARGS
  local name=$1 limit=$2 kwargs=$3
  section "$name" "$limit" $PY - <<PYEOF
import json, traceback
from pathlib import Path
from patchflannel.bench.harness import BenchConfig, run_bench
out = Path("$OUT") / "$name"
try:
    report = run_bench(BenchConfig(out=out, preset="$PRESET", synthetic=True, label="$name", $kwargs),
                       progress=lambda line: print(line, flush=True))
    print(open(out / "bench.md").read())
    print(json.dumps(report["engines"], indent=1))
except Exception:
    out.mkdir(parents=True, exist_ok=True)
    (out / "error.txt").write_text(traceback.format_exc())
    raise
PYEOF
}

bench eager_fp16 "$EAGER_LIMIT" "ks=($KS), n=$N, pack=$PACK, loop_n=$LOOP_N, repeats=$REPEATS, precisions=('fp16' if $GPU else 'fp32',), modes=('loop', 'batched', 'packed', 'global'), learner_streams=($LSTREAMS)"
if [ "$GPU" = "1" ] && [ "$COMPILE_LIMIT" -gt 0 ]; then
  bench compiled_fp16 "$COMPILE_LIMIT" "ks=(100,), n=$CN, pack=${CPACK:-4}, repeats=2, precisions=('fp16',), modes=('packed',), learner_streams=($LSTREAMS), compile=True"
else
  echo "== compiled_fp16: skipped (no CUDA; torch.compile is timed on the GPU only)" | tee -a "$SUMMARY"
fi

if [ "$GPU" = "1" ]; then  # not in the default SECTIONS: an experiment (scripts/gpu_learner_overlap.py)
  section overlap "${OVERLAP_LIMIT:-150}" $PY scripts/gpu_learner_overlap.py ${OVERLAP_ARGS:-}
fi
# Not in the default SECTIONS: the segmenter eager and compiled, from the main and a worker thread.
section segmenter "${SEGMENTER_LIMIT:-120}" $PY scripts/gpu_segmenter.py --repeats "${SEGMENTER_REPEATS:-10}"

section targets 30 $PY - <<PYEOF
import json
from pathlib import Path
out = Path("$OUT")
rows = []
# PREVIOUS, then this run's files: under OUT, or packed already (STAGE)
for folders in [[Path(p)] for p in ("${PREVIOUS:-}",) if p] + [[Path(p) for p in ("$OUT", "$STAGE") if p]]:
    found = [folder / name / "bench.json" for folder in folders for name in ("eager_fp16", "compiled_fp16")]
    for f in found:
        if f.is_file():
            rows += [dict(r, section=f.parent.name) for r in json.loads(f.read_text())["runs"]]
            print("read", f)
    if not any(f.is_file() for f in found):
        print(f"WARNING: no eager_fp16/bench.json or compiled_fp16/bench.json under {' or '.join(map(str, folders))}")
kmax = max((r["k"] for r in rows if r["k"] is not None), default=None)
at = [r for r in rows if r["k"] == kmax]
loop = [r["seconds_per_image_median"] for r in at if r["mode"] == "loop"]
best = min((r for r in at if r["mode"] in ("batched", "packed")), key=lambda r: r["seconds_per_image_median"], default=None)
summary = {"k": kmax, "best": best and {k: best.get(k) for k in ("section", "mode", "learner_streams", "images_per_second",
                                                                "images_per_call", "preprocess_fraction",
                                                                "preprocess_busy_fraction")}}
if best:
    summary["targets"] = {
        "images_per_second>=25": best["images_per_second"] >= 25,
        "x_loop>=100": loop[0] / best["seconds_per_image_median"] >= 100 if loop else None,  # None: no loop run here
        "preprocess<10%": best["preprocess_fraction"] < 0.10,
    }
    summary["x_loop"] = loop[0] / best["seconds_per_image_median"] if loop else None
(out / "targets.json").write_text(json.dumps(summary, indent=1))
print(json.dumps(summary, indent=1))
PYEOF
echo "done in $(( $(date +%s) - START ))s" | tee -a "$SUMMARY"
[ -f "$OUT/targets.json" ] && { echo "targets ($OUT/targets.json):"; cat "$OUT/targets.json"; }
[ -n "$STAGE" ] && rm -rf "$STAGE"  # everything in it is in the archive
exit 0
