#!/usr/bin/env bash
# Pack, on a machine with network, what a GPU machine WITHOUT network needs beside its own PyTorch image
# (torch, accelerate, safetensors, huggingface_hub, pyarrow, pandas, matplotlib, ...): the CIFAR-10 parquet
# files and the wheels of the few packages such images lack. Everything goes to .carry/ (git-ignored);
# copy the repository with it to the GPU machine and run scripts/offline_gpu_check.sh there.
#
#   bash scripts/pack_offline.sh DATA_DIR [PYTHON_VERSION]      e.g. ../shared/data/cifar10 3.12
#
# DATA_DIR holds train.parquet and test.parquet in the hub's cifar10 schema. PYTHON_VERSION is the GPU
# machine's Python (default 3.12). The versions are the ones the tests run with.
set -euo pipefail
cd "$(dirname "$0")/.."
data=${1:?usage: bash scripts/pack_offline.sh DATA_DIR [PYTHON_VERSION]}
python_version=${2:-3.12}
for split in train test; do
    [ -f "$data/$split.parquet" ] || { echo "error: $data/$split.parquet is missing" >&2; exit 2; }
done
rm -rf .carry/wheels .carry/datasets .carry/fallback && mkdir -p .carry/cifar10 .carry/wheels .carry/datasets .carry/fallback
cp "$data/train.parquet" "$data/test.parquet" .carry/cifar10/
download() {
    python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version "$python_version" \
        --implementation cp "$@"
}
download -d .carry/wheels dill==0.4.1 multiprocess==0.70.19 jsonargparse==4.53.0 docstring-parser==0.18.0
# datasets 5.2 declares pyarrow >= 24; 5.0 (same dill and multiprocess) takes pyarrow >= 21
download -d .carry/datasets datasets==5.2.0
download -d .carry/fallback datasets==5.0.0
ls .carry/wheels .carry/datasets .carry/fallback
du -sh .carry
