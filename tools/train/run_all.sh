#!/usr/bin/env bash
# The whole default-model pipeline, from nothing to cm3rt/assets/default/ (issue 12).
#
#     tools/train/run_all.sh [RUNS_DIR]            # default RUNS_DIR: data/runs12
#
# Both cores for every heavy step (THREADS); seeded; resumable: a finished
# step leaves RUNS_DIR/done.<step> and is skipped on a rerun, an unfinished training step
# continues from its checkpoint. Each step's wall time goes to RUNS_DIR/run_all.log (a resumed
# step's counts its earlier runs too); its output is appended to RUNS_DIR/<step>.log.
# Environment: THREADS (default 2), DECODER_STEPS (default 7000), FINETUNE_STEPS (1200),
# EVAL_PROMPTS (200), K_DOCS (1), CAPTION_K_DOCS (2), CAPTION_DOC_SWEEP (1), UNCOND_DOCS (1),
# GUIDANCE (cfg), CFG_SCALE (1.5), TOP_P (0.6), MAX_DOC_SCORE (none: the shipped model retrieves the
# closest documents; 0.9 is RA-CM3's rule), PACKAGE=0 to stop before writing
# cm3rt/assets/default.
set -euo pipefail
cd "$(dirname "$0")/../.."
RUNS=${1:-data/runs12}
DATA=$RUNS/shapes
THREADS=${THREADS:-2}
DECODER_STEPS=${DECODER_STEPS:-7000}
# The caption fine-tune of the selected decoder (TRAINING.md, session 10).
FINETUNE_STEPS=${FINETUNE_STEPS:-1200}
EVAL_PROMPTS=${EVAL_PROMPTS:-200}
# Documents retrieved per prompt, for selection and the shipped defaults (which eval and the
# diagnostic read):
# 1, chosen on the selection prompts (seed 1) over {1, 2}; see TRAINING.md.
K_DOCS=${K_DOCS:-1}
# Documents retrieved per caption (the image is the query), for the shipped defaults, and
# CAPTION_DOC_SWEEP=1: a caption is the best, by the bank's CLIP, of those with 0..K
# documents (session 11: chosen on seed-1 renders over {0,1}, {0,2}, {0,1,2}, {0,1,2,3}).
CAPTION_K_DOCS=${CAPTION_K_DOCS:-2}
CAPTION_DOC_SWEEP=${CAPTION_DOC_SWEEP:-1}
# 1: the documents stand in the unconditional guidance stream too (SamplingParams.uncond_docs),
# for selection and the shipped defaults. Both chosen on the selection prompts: TRAINING.md.
UNCOND_DOCS=${UNCOND_DOCS:-1}
MAX_DOC_SCORE=${MAX_DOC_SCORE:-none}
# The shipped text -> image sampler: CFG 1.5 with nucleus sampling at top-p 0.6 (session 11:
# chosen on the selection prompts, seed 1, over top-p {1, 0.9, 0.8, 0.6, 0.4} x {none, cdk,
# cfg 1.25 / 1.5 / 2}; TRAINING.md). Selection of the decoder's checkpoint still uses CD-K.
GUIDANCE=${GUIDANCE:-cfg}
CFG_SCALE=${CFG_SCALE:-1.5}
TOP_P=${TOP_P:-0.6}
SELECT_UNCOND=() PACKAGE_UNCOND=() PACKAGE_SWEEP=()
if [[ $CAPTION_DOC_SWEEP == 1 ]]; then PACKAGE_SWEEP=(--caption-doc-sweep); fi
if [[ $UNCOND_DOCS == 1 ]]; then SELECT_UNCOND=(--eval-uncond-docs); PACKAGE_UNCOND=(--uncond-docs); fi
export OMP_NUM_THREADS=$THREADS MKL_NUM_THREADS=$THREADS PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
mkdir -p "$RUNS"
LOG=$RUNS/run_all.log

step() {  # step NAME COMMAND...
    local name=$1; shift
    if [[ -f $RUNS/done.$name ]]; then echo "skip $name (done)" | tee -a "$LOG"; return; fi
    # A killed step leaves elapsed.<name> (its seconds so far, rewritten every 10 s), so a
    # resumed step reports its whole wall time, not only the last segment's.
    local before=0 t0=$SECONDS
    if [[ -f $RUNS/elapsed.$name ]]; then before=$(<"$RUNS/elapsed.$name"); fi
    echo "== $name: $*" | tee -a "$LOG"
    if ((before > 0)); then echo "== $name: resumed after $before s in earlier runs" | tee -a "$LOG"; fi
    # (the ticker stops with this script, however it ends)
    (while sleep 10 && kill -0 $$ 2>/dev/null; do
        echo $((before + SECONDS - t0)) > "$RUNS/elapsed.$name"; done) &
    local ticker=$!
    if ! "$@" 2>&1 | tee -a "$RUNS/$name.log"; then kill "$ticker" 2>/dev/null || true; return 1; fi
    kill "$ticker" 2>/dev/null || true
    echo "== $name: $((before + SECONDS - t0)) s" | tee -a "$LOG"
    rm -f "$RUNS/elapsed.$name"
    touch "$RUNS/done.$name"
}

T=tools/train
step make_dataset python $T/make_dataset.py --out "$DATA" --seed 0 --train 30000 --bank 4000 \
    --eval 400 --novel 12000
step train_tokenizer python $T/train_tokenizer.py --data "$DATA" --out "$RUNS/tokenizer"
step train_vqgan python $T/train_vqgan.py --out "$RUNS/vqgan" --threads "$THREADS" --images 40000 \
    --decoder-images 128000
step vqgan_gate python $T/train_vqgan.py --out "$RUNS/vqgan" --eval --threads "$THREADS"
step encode_images python $T/encode_images.py --data "$DATA" --vqgan "$RUNS/vqgan/vqgan" \
    --out "$RUNS/codes" --threads "$THREADS"
step train_clip python $T/train_clip.py --data "$DATA" --tokenizer "$RUNS/tokenizer" \
    --out "$RUNS/clip" --threads "$THREADS" --pairs 204800 --splits train bank
step clip_gate python $T/train_clip.py --data "$DATA" --out "$RUNS/clip" --eval --threads "$THREADS"
step build_banks python $T/build_banks.py --data "$DATA" --codes "$RUNS/codes" \
    --clip "$RUNS/clip/clip" --vqgan "$RUNS/vqgan/vqgan" --out "$RUNS/banks" --threads "$THREADS"
step train_decoder python $T/train_decoder.py --data "$DATA" --codes "$RUNS/codes" \
    --retrieval "$RUNS/banks/train_retrieval.npy" --tokenizer "$RUNS/tokenizer" \
    --vqgan "$RUNS/vqgan/vqgan" --out "$RUNS/decoder" --threads "$THREADS" \
    --steps "$DECODER_STEPS" --ckpt-every 200 --novel-alias 0.5 --novel-shape-only 0.6 \
    --near-miss 0.5 --i2t-docs 0.5
step select_decoder python $T/train_decoder.py --out "$RUNS/decoder" --select --eval-n 48 \
    --eval-bank "$RUNS/banks/bank" --eval-k-docs "$K_DOCS" --eval-max-doc-score "$MAX_DOC_SCORE" \
    "${SELECT_UNCOND[@]}" --threads "$THREADS"
# A caption fine-tune of the selected decoder: twice the novel_i2t share, and 70% of its
# ordinary-named episodes name the target by a held-out pair's words (on another look), so
# a caption can copy a held-out pair from its document (TRAINING.md, session 10).
step finetune_decoder python $T/train_decoder.py --data "$DATA" --codes "$RUNS/codes" \
    --retrieval "$RUNS/banks/train_retrieval.npy" --tokenizer "$RUNS/tokenizer" \
    --vqgan "$RUNS/vqgan/vqgan" --out "$RUNS/decoder_ft" --threads "$THREADS" \
    --init "$RUNS/decoder/best" --binding-steps 0 --warmup 50 --steps "$FINETUNE_STEPS" \
    --lr 3e-4 --ckpt-every 400 --novel-alias 0.5 --novel-shape-only 0.6 --near-miss 0.5 \
    --i2t-docs 0.5 --held-out-alias 0.7 --mixture 0.22 0.11 0.05 0.17 0.25 0.08 0.24
if [[ ${PACKAGE:-1} == 0 ]]; then echo "PACKAGE=0: stopping before packaging" | tee -a "$LOG"; exit 0; fi
step package_default python $T/package_default.py --decoder "$RUNS/decoder_ft/model" \
    --tokenizer "$RUNS/tokenizer" --vqgan "$RUNS/vqgan/vqgan" --clip "$RUNS/clip/clip" \
    --bank "$RUNS/banks/bank" --runs "$RUNS" --decoder-dtype fp32 --guidance "$GUIDANCE" \
    --cfg-scale "$CFG_SCALE" --top-p "$TOP_P" --k-docs "$K_DOCS" \
    --caption-k-docs "$CAPTION_K_DOCS" --max-doc-score "$MAX_DOC_SCORE" "${PACKAGE_UNCOND[@]}" \
    "${PACKAGE_SWEEP[@]}"
step eval python -c "import sys; from cm3rt.cli import main; sys.exit(main())" eval --prompts "$EVAL_PROMPTS" --captions 200 --no-progress \
    --json "$RUNS/eval.json"
step copy_diagnostic python $T/copy_diagnostic.py --model cm3rt/assets/default --data "$DATA" \
    --out "$RUNS/copy" --prompts "$EVAL_PROMPTS" --threads "$THREADS"
echo "done: $RUNS (wall times in $LOG)"
