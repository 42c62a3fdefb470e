#!/usr/bin/env bash
# Every check that needs a CUDA GPU, as one command for a machine lent for a few minutes: the `gpu`-marked
# tests, the GPU step and data benchmarks, our step against the authors' on the GPU, and `simmim check` on the
# GPU. Each check's output goes to $OUT/NAME.txt (default $OUT: ./gpu-results) and their stderr to $OUT/log.txt,
# so that a check cut short by its time limit still leaves the others' results (six files in all).
#
#   bash benchmarks/on_gpu.sh prepare [SIMMIM_CHECKOUT]   # here, with the package index: .whl/ and .official/
#   bash benchmarks/on_gpu.sh                               # on the GPU machine, in the repository's root
#
# `prepare` downloads, as wheels into .whl/, the pure-Python packages that a PyTorch image with typer, rich, onnx
# and scikit-learn (a lent GPU machine's) lacks: webdataset, braceexpand and this project's timm. It copies the
# authors' models/ from a checkout of microsoft/SimMIM into .official/ for benchmarks/against_official.py. Both
# folders are git-ignored; carry them to the GPU machine.
# Not carried (too large for a short lease): NVIDIA DALI and onnxruntime-gpu, so their `gpu` tests skip there
# unless the machine has them.
set -uo pipefail
cd "$(dirname "$0")/.."

if [ "${1:-}" = "prepare" ]; then
    set -e
    timm_version=$(python3 -c 'import timm; print(timm.__version__)')
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation py \
        --platform any -d .whl "webdataset>=0.2.100" braceexpand "timm==$timm_version"
    if [ -n "${2:-}" ]; then
        rm -rf .official && mkdir -p .official && cp -r "$2/models" .official/
    fi
    ls -l .whl .official 2>/dev/null || true
    exit 0
fi

OUT=${OUT:-gpu-results}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/simmim-site \
        .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/simmim-site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-} PYTHONUNBUFFERED=1

step() {  # step NAME SECONDS COMMAND...: stdout to NAME.txt (figures), stderr to log.txt, a line of its own
    local name=$1 seconds=$2
    shift 2
    local started=$SECONDS
    echo "== $name: $*" >>"$OUT/log.txt"
    # -k: a training step takes SIGTERM as "save and stop"; the limit must hold even so
    timeout -k 15 "$seconds" "$@" >"$OUT/$name.txt" 2>>"$OUT/log.txt"
    local code=$?
    echo "$name: exit $code after $((SECONDS - started)) s" | tee -a "$OUT/log.txt"
    [ "$code" -eq 0 ] || failed=$((failed + 1))
}
failed=0

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c 'import torch, timm; print("torch", torch.__version__, "timm", timm.__version__,
              "cuda", torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")'
} 2>&1 | tee "$OUT/log.txt"

# the limits add up to under 9 minutes (15 s more each if a check ignores SIGTERM), inside a 10-minute command
step gpu_tests 200 python3 -m pytest -m gpu -q -p no:cacheprovider -rs tests/test_gpu.py tests/test_check.py \
    tests/test_dali.py tests/test_embed.py
step gpu_step 100 python3 benchmarks/gpu_step.py --steps 10
step gpu_data 60 python3 benchmarks/gpu_data.py --images 1024 --epochs 3 --batch-size 128
if [ -d .official/models ]; then
    step against_official 100 python3 benchmarks/against_official.py --official .official --device cuda \
        --batch-size 128 --rounds 3 --steps 10
fi
step check_pretrain 60 python3 -m simmim_cli check pretrain --demo --device cuda --json
tail -n 3 "$OUT/gpu_tests.txt"
cat "$OUT"/gpu_step.txt "$OUT"/gpu_data.txt "$OUT"/against_official.txt 2>/dev/null
echo "$failed check(s) failed"
exit $((failed > 0))
