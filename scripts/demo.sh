#!/usr/bin/env bash
# The main job of README's quick start (`make demo`): train the `quick` recipe on CIFAR-10 on the
# CPU (at most 10 minutes of training), evaluate it on the test set, and classify a few test images.
#
# Data: $DENSENET_DATA, else ./data, else the shared JPEG copy when this machine has one; when
# none of them holds CIFAR-10, `densenet download` fetches it into ./data (needs the internet).
# Everything goes under runs/: runs/demo (run directory), runs/demo-weights (final weights),
# runs/demo-samples (the images given to `densenet predict`).
set -euo pipefail
cd "$(dirname "$0")/.."
DENSENET=.venv/bin/densenet
PYTHON=.venv/bin/python

has_data() {
    "$PYTHON" -c 'import sys; from densenet.data import detect; from pathlib import Path; detect(Path(sys.argv[1]))' \
        "$1" >/dev/null 2>&1
}

if [[ -n "${DENSENET_DATA:-}" ]]; then
    DATA="$DENSENET_DATA"
elif has_data data; then
    DATA=data
elif [[ -d ../shared/data/cifar10-jpeg ]] && has_data ../shared/data/cifar10-jpeg; then
    DATA=../shared/data/cifar10-jpeg
else
    DATA=data
fi
if ! has_data "$DATA"; then
    echo "== no CIFAR-10 in $DATA: downloading it"
    "$DENSENET" download --data-dir "$DATA"
fi
echo "== data: $DATA"

echo "== densenet train --recipe quick (at most 10 minutes of training)"
"$DENSENET" train --recipe quick --data-dir "$DATA" --out-dir runs/demo --weights-dir runs/demo-weights

echo "== densenet evaluate"
"$DENSENET" evaluate --weights runs/demo-weights --data-dir "$DATA" --out runs/demo

echo "== densenet predict (file names give the true class)"
rm -rf runs/demo-samples
"$PYTHON" - "$DATA" runs/demo-samples <<'EOF'
import sys
from pathlib import Path

from PIL import Image

from densenet.data import load_dataset

test = load_dataset(sys.argv[1], split="test")
out = Path(sys.argv[2])
out.mkdir(parents=True, exist_ok=True)
for i in range(0, len(test), len(test) // 8)[:8]:
    name = test.classes[int(test.labels[i])]
    Image.fromarray(test.images[i].permute(1, 2, 0).numpy()).save(out / f"{i:05d}-{name}.png")
EOF
"$DENSENET" predict --weights runs/demo-weights runs/demo-samples --topk 3

# the most accurate shipped model (by its card's test accuracy)
SHIPPED=$("$PYTHON" -c 'from densenet.pretrained import pretrained_card as c, pretrained_names as n
print(max(n(), key=lambda m: c(m).get("test_acc") or 0, default=""))')
if [[ -n "$SHIPPED" ]]; then
    echo "== densenet predict with the model shipped in the package ($SHIPPED, trained longer on the CPU)"
    "$DENSENET" predict --weights "$SHIPPED" runs/demo-samples --topk 3
fi
echo "== done: run directory runs/demo (curves.png, metrics.csv, confusion.png), weights runs/demo-weights"
echo "   shipped models and their accuracy: densenet analyze --list"
