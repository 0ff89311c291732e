#!/usr/bin/env bash
# GPU checks in one pass, each step time-boxed so one failure does not cost the others.
# Writes its reports into $OUT (default benchmarks/gpu-out). Run from the repository root:
#   bash benchmarks/gpu.sh                          # or ONLY="tests train_moe" bash benchmarks/gpu.sh
# 1. CUDA tests (bf16 autocast, grouped-GEMM MoE dispatch, fullgraph compile)
# 2. MoE dispatch, grouped against padded, one gpu-moe-0.5b layer in bf16
# 3. `scalevec bench` on gpu-0.12b: compiled standard/unified (tokens/s, MFU, memory), eager with transformers,
#    and a per-kernel profile of both compiled arms (what unified adds)
# 4. gpu-moe-0.5b: compiled standard beside unified (tokens/s, MFU), then a compiled bf16 training run on the
#    bundled data with dynamo's recompile and graph-break log and the time to each step (the stall of an earlier
#    run: no step within 200 s), then FSDP2 over NCCL under torchrun
# 5. preemption on NCCL: torchrun (every GPU), FSDP2, MoE with expert bias, a step-0 evaluation, a checkpoint,
#    SIGTERM (the workers checkpoint the step reached and exit 75), then --resume to the end
# Every step's time limit together: 540 s, so one call on a lent machine (10 minutes at most) runs it all.
set -u
OUT=${OUT:-benchmarks/gpu-out}
PYTHON=${PYTHON:-python3}
source "$(dirname "$0")/steps.sh"
{ nvidia-smi -L; $PYTHON -c "import torch; print(torch.__version__, torch.cuda.get_device_name())"; } >"$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

step tests 60 $PYTHON -m pytest -q -p no:cacheprovider tests/test_gpu.py
step moe_dispatch 30 bash -c "for s in standard unified; do $PYTHON benchmarks/moe_dispatch.py --preset gpu-moe-0.5b \
    --tokens 16384 --strategy \$s; done"
step bench_compiled 100 $PYTHON -m scalevec bench --config gpu-0.12b --strategies standard,unified --mode compiled \
    --repeats 8 --set train.batch_size=16 --set train.seq_len=2048 --json
step bench_eager 30 $PYTHON -m scalevec bench --config gpu-0.12b --strategies standard,unified --mode eager --hf \
    --repeats 8 --set train.batch_size=16 --set train.seq_len=2048 --json
step profile 60 $PYTHON -m scalevec bench --config gpu-0.12b --strategies standard,unified --mode compiled \
    --repeats 2 --warmup 2 --profile 3 --set train.batch_size=16 --set train.seq_len=2048
step bench_moe 70 $PYTHON -m scalevec bench --config gpu-moe-0.5b --strategies standard,unified --mode compiled \
    --repeats 4 --warmup 2 --set train.batch_size=8 --set train.seq_len=1024
step train_moe 70 env TORCH_LOGS=recompiles,graph_breaks $PYTHON -m scalevec train gpu-moe-0.5b --out /tmp/runs/moe \
    --overwrite --set strategy.preset=unified --set train.compile=true --set train.steps=8 --set train.batch_size=8 \
    --set train.seq_len=1024 --set train.eval_every=8 --set train.log_every=1 --set train.checkpoint_every=8 \
    --set schedule.warmup_steps=2
cp /tmp/runs/moe/metrics.jsonl "$OUT/train_moe_metrics.jsonl" 2>/dev/null
step fsdp_nccl 50 torchrun --standalone --nproc-per-node 1 -m scalevec train gpu-0.12b --out /tmp/runs/fsdp \
    --overwrite --set dist.mode=fsdp2 --set strategy.preset=unified --set optim.name=muon --set train.steps=10 \
    --set train.batch_size=8 --set train.seq_len=1024 --set train.eval_every=10 --set train.checkpoint_every=10

preempt_nccl() {
    local out=/tmp/runs/preempt gpus pid
    gpus=$(nvidia-smi -L | wc -l)
    rm -rf "$out"
    torchrun --standalone --nproc-per-node "$gpus" -m scalevec train gpu-moe-0.5b --out "$out" \
        --set dist.mode=fsdp2 --set strategy.preset=unified --set moe.balance=bias --set train.steps=20 \
        --set train.batch_size=4 --set train.seq_len=1024 --set train.eval_every=20 --set train.log_every=2 \
        --set train.checkpoint_every=10 --set schedule.warmup_steps=5 &
    pid=$!
    for _ in $(seq 900); do [[ -d "$out/checkpoints/step_00000010" ]] && break; sleep 0.2; done
    sleep 3  # a few steps past the checkpoint
    kill -TERM "$pid"
    wait "$pid"
    echo "torchrun exit $? after SIGTERM (1 expected; its workers' exitcode 75 above)"
    ls "$out/checkpoints"
    torchrun --standalone --nproc-per-node "$gpus" -m scalevec train --resume --out "$out"
    echo "resume exit $? (0 expected)"
    head -n 1 "$out/metrics.jsonl"
    tail -n 2 "$out/metrics.jsonl"
}
export -f preempt_nccl
step preempt_nccl 70 bash -c preempt_nccl
cp /tmp/runs/preempt/metrics.jsonl "$OUT/preempt_nccl_metrics.jsonl" 2>/dev/null
