#!/usr/bin/env bash
# The README's main job: install jaxbp (and Fashion-MNIST where apt can) and train the default config.
# Extra arguments go to `jaxbp train`, e.g. `--set train.epochs=1`.
set -euo pipefail
cd "$(dirname "$0")/.."
data=/usr/share/datasets/fashion-mnist
if [ ! -d "$data" ] && command -v apt-get >/dev/null 2>&1; then
    sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo"
    $sudo apt-get update -qq && $sudo apt-get install -y -qq dataset-fashion-mnist
fi
python3 -m pip install -q -e .
python3 -m jaxbp train configs/lenet5.yaml "$@"
