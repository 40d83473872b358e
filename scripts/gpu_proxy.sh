#!/usr/bin/env bash
# Screen variants of a CPU recipe on the lent GPU machine, many at once, at fixed epoch counts.
#
#   scripts/gpu_proxy.sh VARIANTS_FILE [SECONDS]
#
# A CPU recipe fits its epochs to a time budget; its accuracy at a given epoch count does not depend
# on the machine, so a GPU can screen levers (augmentation, model size, epochs) in minutes that take a
# 90-minute run each on the CPU. Each line of VARIANTS_FILE is `NAME densenet-train-arguments...`;
# all lines run at once on the one GPU, each as its own process (`--device cuda`; PROXY_DEVICE=cpu tries it here, bf16 autocast as
# the recipe's `--amp auto` picks there, `--no-fit-epochs`). Needs the CIFAR-10 JPEG copy packed by
# scripts/pack_folder.py into .devdata/cifar10-jpeg.npz (carry .devdata). Logs, metrics.csv and
# config.json of each run come back in $OUT/runs.tar.gz (refreshed every 30 s, so a run cut short
# still returns its epochs), the last line of each log in $OUT/summary.txt.
set -u -f  # -f: the JSON of --model-kwargs is not a glob
VARIANTS=${1:?usage: scripts/gpu_proxy.sh VARIANTS_FILE [SECONDS]}
SECONDS_LEFT=${2:-500}
OUT=${OUT:-/tmp/gpu_proxy_out}
[[ -r "$VARIANTS" ]] || { echo "error: cannot read the variants file $VARIANTS" >&2; exit 1; }
[[ -r .devdata/cifar10-jpeg.npz ]] || { echo "error: no .devdata/cifar10-jpeg.npz (scripts/pack_folder.py pack; carry .devdata)" >&2; exit 1; }
mkdir -p "$OUT" /tmp/proxy/logs /tmp/proxy/runs
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1 DENSENET_CACHE=/tmp/proxy/cache OMP_NUM_THREADS=2
PY=${PYTHON:-python3}
DATA=/tmp/proxy/cifar10-jpeg

{ date; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  $PY -c "import torch; print('torch', torch.__version__, torch.cuda.is_available())"; nproc; } > "$OUT/env.txt" 2>&1
$PY scripts/pack_folder.py unpack .devdata/cifar10-jpeg.npz "$DATA" >> "$OUT/env.txt" 2>&1 || { cat "$OUT/env.txt"; exit 1; }
# decode once into the cache, so that the runs do not all decode at the same time
OMP_NUM_THREADS=16 $PY -c "from densenet.data import load_splits; d = load_splits('$DATA'); print({k: len(v) for k, v in d.items()})" >> "$OUT/env.txt" 2>&1

collect() {
    (cd /tmp/proxy && tar czf "$OUT/runs.tar.gz.tmp" logs $(find runs -name '*.csv' -o -name '*.json' | grep -v weights) \
        && mv "$OUT/runs.tar.gz.tmp" "$OUT/runs.tar.gz")
    for f in $(find /tmp/proxy/logs -name "*.log" | sort); do echo "$(basename "$f" .log): $(grep -E '^(epoch|done)' "$f" | tail -1)"; done > "$OUT/summary.txt"
}

while read -r name args; do
    [[ -z "$name" || "$name" == \#* ]] && continue
    # shellcheck disable=SC2086
    timeout "$SECONDS_LEFT" $PY -m densenet train $args --device ${PROXY_DEVICE:-cuda} --no-fit-epochs --max-minutes 600 \
        --data-dir "$DATA" --out-dir "/tmp/proxy/runs/$name" --weights-dir "/tmp/proxy/runs/$name/weights" \
        --progress lines > "/tmp/proxy/logs/$name.log" 2>&1 &
done < "$VARIANTS"
echo "$(jobs -rp | wc -l) runs started $(date +%T)" >> "$OUT/env.txt"

while [[ -n "$(jobs -rp)" ]]; do
    sleep 30
    nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader >> "$OUT/env.txt"
    collect
done
collect
echo "all done $(date +%T)" >> "$OUT/env.txt"
cat "$OUT/summary.txt"
