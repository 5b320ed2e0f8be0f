#!/usr/bin/env bash
# IEMOCAP leave-one-session-out end to end on the release-format test fixture (issue #21): the fixture
# tree (tests/fixtures/iemocap.py, five sessions in the corpus's own files, audio included), tiny text
# and speech LLMs built from transformers configs (tests/fixtures/tiny_models.py), then exactly the
# commands of docs/LOSO.md: per fold K, both encoders fine-tuned on the fold's train sessions and
# selected on its val session (`extract --fold K`), the stores checked, and `train --protocol loso`.
# The numbers say the pipeline runs and does not leak, not how well MiSTER-E does on IEMOCAP.
#   bash scripts/loso_fixture.sh [OUT]      (default OUT: runs/loso-fixture; re-running resumes)
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
PY=${PY:-.venv/bin/python}
OUT=${1:-runs/loso-fixture}
EPOCHS=${EPOCHS:-3}
mkdir -p "$OUT"

"$PY" - "$OUT" <<'EOF'
import sys
from pathlib import Path

sys.path.insert(0, "tests/fixtures")
from iemocap import write_iemocap  # noqa: E402
from tiny_models import tiny_llama, tiny_qwen2_audio  # noqa: E402

from encoders_torch.corpora import read_corpus  # noqa: E402

out = Path(sys.argv[1])
data = out / "IEMOCAP_full_release"
if not data.exists():
    write_iemocap(data)
corpus = read_corpus("iemocap", data)
texts = [u.transcript for split in corpus.splits for u in corpus.utterances(split)]
for name, build in (("tiny-llama", tiny_llama), ("tiny-qwen2-audio", tiny_qwen2_audio)):
    if not (out / name / "config.json").exists():
        build(out / name, texts)
EOF

declare -A models=([text]=tiny-llama [speech]=tiny-qwen2-audio)
for K in 1 2 3 4 5; do
  for M in text speech; do
    "$PY" -m encoders_torch.extract --dataset iemocap --data-root "$OUT/IEMOCAP_full_release" \
      --modality "$M" --model "$OUT/${models[$M]}" --out "$OUT/features" --fold "$K" \
      --epochs "$EPOCHS" --batch-size 4 --lr 1e-3 --embedding-dim 32 --device cpu --log-every 0
  done
  "$PY" -m bridges.check "$OUT/features/iemocap-fold$K"
done
time "$PY" -m mister_jax.train --dataset iemocap --protocol loso --features "$OUT/features" \
  --out "$OUT/runs" --quiet "${@:2}"
