#!/usr/bin/env bash
# The checks of a lent GPU machine, in one run (about 6 minutes on an H200, plus up to 5 for the tuned
# rows; split it where a call's time limit binds): the CUDA branches of the model tests, model
# throughput (fp32 and fp16 autocast, batch 1-256; then fp16 with channels_last, cuDNN benchmark mode
# and CUDA graphs beside it, issue #43), the training loop's throughput,
# in-process serve capacity on one GPU, and `emostream replay` of a bundled call on CUDA against CPU
# fp32 (same events, probabilities within fp16 error). Results go to $OUT (default /tmp/gpu-check).
#
#     bash bench/gpu_check.sh        # on the GPU machine, in the repository root
#
# A machine without soundfile / websockets (the lent H200 has Python 3.12 and neither) gets them from
# wheels in .whl/, made beforehand on a machine with a registry (and kept out of git):
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
#       -d .whl soundfile cffi pycparser websockets
set -u
OUT=${OUT:-/tmp/gpu-check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PWD"
step() { echo; echo "=== $* ($(date -u +%H:%M:%S))"; }

step machine
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
python3 -c "import torch, torchaudio, timm; print('torch', torch.__version__, 'torchaudio', torchaudio.__version__, 'timm', timm.__version__, torch.cuda.get_device_name())"

step "tests: model and features (their CUDA branches run here)"
timeout 180 python3 -m pytest -q -p no:cacheprovider tests/test_model.py tests/test_features.py 2>&1 | tail -6

step "model throughput"
timeout 240 python3 bench/inference.py --device cuda --batches 1,8,32,128,256 --seconds 4 --json "$OUT/inference_cuda.json" 2>&1 | grep -v '^{'

step "model throughput, tuned (issue #43): fp16 + channels_last + cuDNN benchmark + CUDA graphs, beside today's path"
timeout 300 python3 bench/inference.py --device cuda --batches 64,256 --seconds 4 --backends torch,torch-compile \
    --compile-mode reduce-overhead --tuned-layout --json "$OUT/inference_cuda_tuned.json" 2>&1 | grep -v '^{'

step "training throughput"
timeout 180 python3 bench/train_throughput.py --device cuda --precisions fp32,mixed --steps 24 --json "$OUT/train_cuda.json" 2>&1 | grep -v '^{'

step "replay on CUDA (fp16) and CPU (fp32)"
for dev in cuda cpu; do
    extra=""; [ "$dev" = cpu ] && extra="--fp32"
    start=$(date +%s.%N)
    timeout 180 python3 -m emostream replay examples/call_stereo.flac --fast --no-dashboard --vad energy \
        --channel-names agent,customer --device "$dev" $extra --events "$OUT/replay_$dev.jsonl" > /dev/null
    echo "replay on $dev: exit $?, $(python3 -c "print(round($(date +%s.%N) - $start, 1))") s wall (model load included)"
done
python3 - "$OUT/replay_cuda.jsonl" "$OUT/replay_cpu.jsonl" <<'PY'
import json, sys
import numpy as np
a, b = ([json.loads(l) for l in open(p)] for p in sys.argv[1:3])
key = lambda e: (e["channel"], e["t_end"])
pa = {key(e): e for e in a if e.get("probabilities")}
pb = {key(e): e for e in b if e.get("probabilities")}
common = sorted(set(pa) & set(pb))
d = np.array([[pa[k]["probabilities"][c] - pb[k]["probabilities"][c] for c in pa[k]["probabilities"]] for k in common])
same = np.mean([pa[k]["label"] == pb[k]["label"] for k in common])
print(f"events cuda {len(a)} cpu {len(b)}; speech windows compared {len(common)}; "
      f"max |dp| {np.abs(d).max():.4f}, mean |dp| {np.abs(d).mean():.5f}; same label {same:.3f}")
PY

step "serve capacity in-process on CUDA (hop 1 s, no speech gate)"
timeout 300 python3 bench/capacity.py --modes inproc --backends torch-bf16 --hops 1.0 --calls 100,200,400,800 \
    --seconds 20 --max-batch 256 --device cuda --json "$OUT/capacity_cuda.json" 2>&1 | grep -v '^{'
step done
