#!/usr/bin/env bash
# The runs of a ladder suite that cost most on CPU, on one GPU, in one device call (issue 28): its largest size
# (most training FLOPs per run), every arm, with `scalevec sweep --sizes SIZE --set train.device=cuda`: the LR seed
# over the size's grid (and its extensions), then the test seeds at each arm's best LR. Records go to $RESULTS (a
# folder of its own: a record says its device and dtype, and the report never pairs a GPU run with a CPU one) and
# are copied to $OUT with the report, to be committed under results/. A sweep cut by its time limit stops its runs
# at a checkpoint (exit 75); rerunning the script continues it. Run from the repository root:
#   bash benchmarks/gpu_study.sh                 # or SUITE=study-tokens SIZE=cpu-d56@80 JOBS=8 bash benchmarks/gpu_study.sh
# Every step's time limit together: 540 s (a test checks it), so one call on a lent machine runs it all.
set -u
SUITE=${SUITE:-study-scale}
OUT=${OUT:-benchmarks/gpu-study-out}
RESULTS=${RESULTS:-results/$SUITE-gpu}
JOBS=${JOBS:-8}  # tiny models leave the GPU mostly idle: runs in parallel, one CPU thread each
PYTHON=${PYTHON:-python3}
source "$(dirname "$0")/steps.sh"
SIZE=${SIZE:-$($PYTHON -c "import sys; from scalevec.experiments.sweep import load_suite, non_embedding_parameters as n
s = load_suite(sys.argv[1], 'cpu')
print(max(s.arms(), key=lambda a: n(s.arm_config(a).model) * s.arm_config(a).train.steps).size)" "$SUITE")}
{ nvidia-smi -L; $PYTHON -c "import torch; print(torch.__version__, torch.cuda.get_device_name())"
  echo "suite $SUITE, size $SIZE, $JOBS jobs, records in $RESULTS"; } >"$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

step data 60 $PYTHON -c "import sys; from scalevec.data.prepare import prepare
from scalevec.experiments.sweep import load_suite
prepare(load_suite(sys.argv[1], 'cpu').base_config().data)" "$SUITE"
step sweep 450 $PYTHON -m scalevec sweep "$SUITE" --sizes "$SIZE" --set train.device=cuda --jobs "$JOBS" \
    --out "/tmp/runs/$SUITE-gpu" --results "$RESULTS"
step report 30 $PYTHON -m scalevec report "$RESULTS"
cp -r "$RESULTS" "$OUT/" 2>/dev/null
