#!/usr/bin/env bash
# One command from raw conversations to emotions (#22; docs/CUSTOM_CORPUS.md):
#
#   scripts/predict_conversations.sh CONVERSATIONS.jsonl --run RUN_DIR [--text-adapter DIR]
#       [--speech-adapter DIR] [--text-model DIR] [--speech-model DIR] [--asr WHISPER_DIR]
#       [--language en] [--device auto] [--allow-mismatch] [--out OUT]
#
# 1. mister_jax.provenance checks the adapters and models against the run's provenance.json (a folder
#    not given is the one the run records) and refuses a mismatch in one line per problem;
# 2. with --asr, encoders_torch.asr transcribes the utterances without text (OUT/transcripts.jsonl,
#    OUT/asr.json) into OUT/conversations.jsonl;
# 3. encoders_torch.extract embeds every modality the run uses with its trained adapter and the run's
#    encoding settings into the store OUT/features/custom;
# 4. mister_jax.predict writes OUT/predictions.jsonl (DESIGN §6), every split of the file in turn;
# 5. mister_jax.timeline draws OUT/timelines/<conversation_id>.png.
# Exits 2 with the failing step's error lines on bad input. PY overrides the interpreter.
set -euo pipefail

REPO="$(cd "$(dirname "$0")/.." && pwd)"
PY="${PY:-$REPO/.venv/bin/python}"

usage() { sed -n '2,6p' "$0" | sed 's/^# \{0,1\}//' >&2; }
die() {
  echo "error: $*" >&2
  exit 2
}

CONV="" RUN="" ASR="" OUT="" LANGUAGE="" DEVICE="auto"
PROVENANCE=()
while [ $# -gt 0 ]; do
  case "$1" in
  --run | --text-adapter | --speech-adapter | --text-model | --speech-model | --asr | --out | --language | --device)
    [ $# -ge 2 ] || die "$1 needs a value — see scripts/predict_conversations.sh --help"
    case "$1" in
    --run) RUN="$2" ;;
    --asr) ASR="$2" ;;
    --out) OUT="$2" ;;
    --language) LANGUAGE="$2" ;;
    --device) DEVICE="$2" ;;
    *) PROVENANCE+=("$1" "$2") ;;
    esac
    shift 2
    ;;
  --allow-mismatch)
    PROVENANCE+=("$1")
    shift
    ;;
  -h | --help)
    usage
    exit 0
    ;;
  -*) die "unknown option $1 — see scripts/predict_conversations.sh --help" ;;
  *)
    [ -z "$CONV" ] || die "two conversation files ($CONV, $1) — pass one, with one --out per file"
    CONV="$1"
    shift
    ;;
  esac
done
[ -n "$CONV" ] || die "no conversations file — pass your .jsonl or .csv first (docs/CUSTOM_CORPUS.md)"
[ -f "$CONV" ] || die "$CONV: not a file — pass your conversations .jsonl or .csv (docs/CUSTOM_CORPUS.md)"
[ -n "$RUN" ] || die "--run is required — pass the run directory written by python -m mister_jax.train"
OUT="${OUT:-${CONV%.*}-emotions}"
ARGS="$OUT/.extract-args" # written once the check passes, so a refusal leaves no OUT behind

"$PY" -m mister_jax.provenance --run "$RUN" "${PROVENANCE[@]}" --args-out "$ARGS" || exit $?

DATA="$CONV"
if [ -n "$ASR" ]; then
  "$PY" -m encoders_torch.asr "$CONV" --model "$ASR" --out "$OUT/conversations.jsonl" \
    --transcripts "$OUT/transcripts.jsonl" --device "$DEVICE" ${LANGUAGE:+--language "$LANGUAGE"} || exit $?
  DATA="$OUT/conversations.jsonl"
fi

for modality in text speech; do
  [ -f "$ARGS/$modality.args" ] || continue
  mapfile -d '' -t EXTRACT <"$ARGS/$modality.args"
  "$PY" -m encoders_torch.extract --dataset custom --data-root "$DATA" --out "$OUT/features" \
    --device "$DEVICE" "${EXTRACT[@]}" || exit $?
done
rm -rf "$ARGS"

PARTS=()
for split in train val test; do
  [ -d "$OUT/features/custom/$split" ] || continue
  "$PY" -m mister_jax.predict --run "$RUN" --dataset custom --features "$OUT/features" --split "$split" \
    --out "$OUT/.predictions-$split.jsonl" || exit $?
  PARTS+=("$OUT/.predictions-$split.jsonl")
done
[ ${#PARTS[@]} -gt 0 ] || die "$OUT/features/custom: no split to predict — check the extract output above"
cat "${PARTS[@]}" >"$OUT/.predictions.jsonl"
mv "$OUT/.predictions.jsonl" "$OUT/predictions.jsonl"
rm -f "${PARTS[@]}"

"$PY" -m mister_jax.timeline "$OUT/predictions.jsonl" --out "$OUT/timelines" || exit $?
echo "predictions: $OUT/predictions.jsonl; timelines: $OUT/timelines/" >&2
