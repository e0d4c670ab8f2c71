#!/usr/bin/env bash
# The GPU checks, for anyone with a CUDA GPU: the tests marked `cuda` (exact resume after SIGKILL, SIGTERM and
# SIGINT, determinism, vectorised equals serial meta-gradient, every algorithm in fp32 and bf16, no CPU kernel
# built, metric learners batching their tasks), then the GPU benchmark of the vectorised and serial paths of
# ProtoNet and MAML on real Omniglot, at meta-batch 32 and 256.
#
#   bash scripts/gpu_check.sh [DATA_ROOT]     # DATA_ROOT holds omniglot/ (default: $METACLI_DATA, ../shared/data)
#
# Writes bench-results/gpu/*.json; each part is bounded so that the whole stays under 8 minutes.
set -euo pipefail
cd "$(dirname "$0")/.."
python -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 'gpu_check: no CUDA device here')"
data="${1:-${METACLI_DATA:-../shared/data}}"
timeout 300 python -m pytest -q -m cuda tests/test_cuda.py
METACLI_DATA="$data" timeout 180 python scripts/bench.py --device cuda --vectorize true false \
    --algos protonet maml_first_order maml_second_order --split val --out bench-results/gpu
# The step captured in a CUDA graph and replayed, against the eager vectorised step.
METACLI_DATA="$data" timeout 120 python scripts/bench.py --device cuda --vectorize true \
    --algos protonet maml_first_order maml_second_order --set execution.capture=true --split val --out bench-results/gpu
# Meta-batch 256, where the vectorised paths have the most to gain.
METACLI_DATA="$data" timeout 120 python scripts/bench.py --device cuda --algos protonet maml_second_order \
    --set trainer.meta_batch=256 --split val --steps 3 --out bench-results/gpu
