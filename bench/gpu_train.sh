#!/usr/bin/env bash
# LoRA and QLoRA tokens/s and MFU on a random ~1B Llama, on a CUDA machine with no network.
#
#   bench/gpu_train.sh [gpu_train.py options]      e.g. --steps 30 --batch 8 --seq-len 1024
#
# Needs torch, transformers and peft in $PYTHON (default python3). bitsandbytes (and trl,
# if wanted) are installed from wheels in bench/wheels/ when not importable, since the
# machine cannot reach an index. Fetch them beforehand on a machine with network, for the
# GPU machine's Python and platform, e.g. for CPython 3.11 on x86-64 Linux:
#
#   pip download --only-binary=:all: --no-deps --python-version 3.11 \
#       --platform manylinux_2_24_x86_64 -d bench/wheels bitsandbytes trl
#
# (bench/wheels/ is git-ignored: wheels are never committed.)
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
python="${PYTHON:-python3}"

if ! "$python" -c 'import torch' 2>/dev/null; then
    echo "gpu_train.sh: $python cannot import torch (set PYTHON to the environment that has" \
         "torch, transformers and peft)." >&2
    exit 2
fi
if ! "$python" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo "gpu_train.sh: no CUDA device visible to torch (needs an NVIDIA GPU and driver)." >&2
    echo "To test the script on a CPU: $python $here/gpu_train.py --tiny --device cpu" >&2
    exit 2
fi
for module in bitsandbytes; do
    if ! "$python" -c "import $module" 2>/dev/null; then
        if ! ls "$here/wheels/"*.whl >/dev/null 2>&1; then
            echo "gpu_train.sh: $module is not installed and $here/wheels/ has no wheels;" \
                 "see the download command at the top of this script." >&2
            exit 2
        fi
        "$python" -m pip install --no-index --find-links "$here/wheels" "$module"
    fi
done
exec "$python" "$here/gpu_train.py" "$@"
