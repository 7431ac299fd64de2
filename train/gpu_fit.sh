#!/usr/bin/env bash
# A config's `fit --all` (the shipped model) on a lent GPU machine, from a pack (`python -m train pack`).
#
#     bash train/gpu_fit.sh PACK/part-1 CONFIG [more fit arguments, e.g. --resume]
#     TASK=cv bash train/gpu_fit.sh PACK/part-1 CONFIG [more cv arguments]   # its cross-validation instead
#
# A call to that machine carries 64 MiB with the working tree, and neither ../shared (74 MB of FLAC) nor
# the teacher (145 MB) travels, so the pack holds the config's clips byte for byte and the teacher's
# encoder cut after the blocks it uses (22 MB for block 3), in parts of at most 50 MB, one per call.
# Here, on the development machine, once:
#
#     .venv/bin/python -m train pack --config train/configs/distill_layer3_speed.yaml --out .devpack
#     python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#         --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
#         -d .whl soundfile cffi pycparser websockets faster-whisper
#     ck=checkpoints/emostream-resnet50/model.safetensors   # 47 MB that travel with every call as a
#     git rm -q --cached $ck; echo /$ck >> .git/info/exclude  # tracked file, unused by the fit: ignored,
#                                                             # it stays here and does not travel
#
# (afterwards: `git reset -q $ck` and take the line out of .git/info/exclude),
# then the calls, back to back (a machine idle for 30 s goes back and the next one starts bare):
#
#     run(command="ls .devpack/part-2/audio | wc -l", carry=[".devpack/part-2"])
#     run(command="bash train/gpu_fit.sh .devpack/part-1 train/configs/distill_layer3_speed.yaml",
#         carry=[".devpack/part-1", ".whl"], timeout_s=600)
#
# and, with device time to spare, the window temperature of that recipe (its four folds trained
# afresh and scored with one placement, as live windows are; cv_report.json for `train calibrate`):
#
#     run(command="TASK=cv RUN=/tmp/cv-window bash train/gpu_fit.sh .devpack/part-1 "
#                 "train/configs/distill_layer3_speed_window.yaml", carry=[".whl"], timeout_s=600)
#
# The parts carried earlier stay on a warm machine (an ignored path not named again is kept); the
# script checks that every part is there before anything else. The checkpoint comes back in pieces of
# 15 MB (a returned file is at most 16 MiB): `cat model.safetensors.part-* > model.safetensors` and
# `sha256sum -c model.sha256` beside them (TASK=cv returns cv_report.json and .md instead). A run cut
# by the call's limit resumes on the same warm machine with `--resume`. The teacher is encoded on the
# GPU in float32 (no TF32), the student trains with fp16 autocast: the recipe of the CV, not its bf16
# CPU arithmetic.
set -euo pipefail
if [ $# -lt 2 ]; then
    echo "usage: bash train/gpu_fit.sh PACK/part-1 CONFIG [fit arguments]" >&2
    exit 2
fi
FIRST=$1; CONFIG=$2; shift 2
TASK=${TASK:-fit}
case $TASK in
    fit) task_args=(fit --all) ;;
    cv) task_args=(cv) ;;
    *) echo "TASK must be fit or cv, not $TASK" >&2; exit 2 ;;
esac
OUT=${OUT:-/tmp/gpu-fit}
RUN=${RUN:-/tmp/gpu-fit-run}
CACHE=${CACHE:-/tmp/gpu-fit-cache}
mkdir -p "$OUT" "$RUN"
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
WHEELS=${WHEELS:-.whl}  # what the GPU machine lacks (soundfile, faster-whisper, ...), made for its Python
if [ -d "$WHEELS" ]; then
    if ! $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$WHEELS"/*.whl; then
        echo "error: the wheels in $WHEELS do not install on this $($PY -V) (made for another Python?)" >&2
        exit 2
    fi
    export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PWD"
trap 'cp "$RUN/train.log" "$OUT/train.log" 2>/dev/null || true' EXIT

$PY -m train.pack check "$FIRST"
teacher=$($PY -c "import json, sys; print(json.load(open(sys.argv[1]))['teacher'] or '')" "$FIRST/pack.json")
args=("${task_args[@]}" --config "$CONFIG" --data "$FIRST" --out "$RUN" --cache "$CACHE" --no-progress)
if [ -n "$teacher" ]; then
    args+=(--teacher "$FIRST/$teacher")
fi
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
start=$(date +%s)
$PY -m train "${args[@]}" "$@"
echo "$TASK: $(( $(date +%s) - start )) s"
if [ "$TASK" = cv ]; then
    cp "$RUN/cv_report.json" "$RUN/cv_report.md" "$OUT/"
    exit 0
fi

checkpoint=$RUN/checkpoint
split -b 15000000 -d "$checkpoint/model.safetensors" "$OUT/model.safetensors.part-"
(cd "$checkpoint" && sha256sum model.safetensors) > "$OUT/model.sha256"
cp "$checkpoint/model.json" "$OUT/model.json"
ls -l "$OUT"
