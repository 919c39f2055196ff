#!/usr/bin/env bash
# scripts/gpu_check.py on a GPU machine without network, from what scripts/pack_offline.sh put in .carry/:
# installs the carried wheels into /tmp/distcifar-site (the image's own packages stay as they are; datasets 5.0
# instead of 5.2 where the image's pyarrow is older than 24), prints
# the versions that matter, checks that `datasets` imports with the image's pyarrow, then runs the check
# on .carry/cifar10. Arguments go to gpu_check.py; results go to $OUT (default results/).
#
#   OUT=results bash scripts/offline_gpu_check.sh --budget 500
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
site=/tmp/distcifar-site
datasets=.carry/datasets
# datasets 5.2 declares pyarrow >= 24: with an older pyarrow in the image, the carried datasets 5.0 (>= 21)
if ! "$PYTHON" -c "import sys, pyarrow; sys.exit(int(pyarrow.__version__.split('.')[0]) < 24)"; then
    echo "pyarrow older than 24: installing the carried datasets 5.0 instead of 5.2"
    datasets=.carry/fallback
fi
rm -rf "$site"
"$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" \
    .carry/wheels/*.whl "$datasets"/*.whl || exit 1
export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 WANDB_MODE=disabled
"$PYTHON" - <<'PY' || exit 1
import importlib.metadata as metadata
import sys

import torch

gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
print(f"python {sys.version.split()[0]} | torch {torch.__version__} (CUDA {torch.version.cuda}) | {gpu}")
names = ("accelerate", "datasets", "pyarrow", "fsspec", "huggingface_hub", "safetensors", "jsonargparse",
         "numpy", "pandas", "dill", "multiprocess", "matplotlib")
versions = []
for name in names:
    try:
        versions.append(f"{name} {metadata.version(name)}")
    except metadata.PackageNotFoundError:
        versions.append(f"{name} MISSING")
print(" | ".join(versions), flush=True)
import datasets  # noqa: E402,F401 - fail here, in seconds, if this pyarrow or fsspec does not suit it
PY
exec "$PYTHON" scripts/gpu_check.py --data .carry/cifar10 --out "${OUT:-results}" "$@"
