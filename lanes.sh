# lanes.sh: the stages of train.sh up to eval, in two lanes side by side (JOBS=2). Sourced by
# train.sh, whose stage functions (collect, judge, ..., eval_some) it only orders and schedules.
#
# Lane a: collect, judge, summary, iql, sft, jpo, then the eval rows iql and iql+sft and the
# other methods (teacher-* rows, any extra ones in METHODS). Lane b: the eval row vanilla (it
# needs nothing trained), then, once lane a has made iql.pt, the emotion-free sft and jpo, then
# the rows emodistill (once lane a's jpo is done) and jpo-emotion-free. The split gives the two
# lanes about the same work. Each lane gets half the cores (on 2 cores that is
# ~15% more work done per second than one stage with both cores); a lane's output goes to
# $RUN/logs/lane-{a,b}.log, its stage lines to the terminal. Lane b waits for lane a's stages
# through the files $RUN/logs/<stage>.done.
[ "${BASH_SOURCE[0]}" != "$0" ] || { echo "lanes.sh is sourced by train.sh (JOBS=2); run train.sh" >&2; exit 2; }
rm -f "$RUN"/logs/*.done

lane_a() {
  collect
  judge
  summary
  iql
  touch "$RUN/logs/iql.done"
  sft
  jpo
  touch "$RUN/logs/jpo.done"
  eval_some iql,iql+sft
  eval_others
}
wait_for() {  # wait_for STAGE: until lane a has finished STAGE; fail if lane a stopped first
  until [ -e "$RUN/logs/$1.done" ]; do
    if [ -n "${LANE_A_PID:-}" ] && ! kill -0 "$LANE_A_PID" 2>/dev/null && [ ! -e "$RUN/logs/$1.done" ]; then
      echo "[train.sh] lane a stopped before its $1 stage finished; see $RUN/logs/lane-a.log" >&2; return 1
    fi
    sleep 2
  done
}
lane_b() {
  eval_some vanilla
  wait_for iql                              # the emotion-free SFT ranks turns with lane a's IQL
  sft_emotion_free
  jpo_emotion_free
  wait_for jpo                              # emodistill evaluates lane a's JPO adapter
  eval_some emodistill,jpo-emotion-free
}

THREADS=$(( $(nproc) / 2 )); [ "$THREADS" -ge 1 ] || THREADS=1
echo "[train.sh] two lanes side by side, $THREADS thread(s) each; follow them with: tail -f $RUN/logs/lane-*.log"
run_lane() { ( export OMP_NUM_THREADS=$THREADS MKL_NUM_THREADS=$THREADS; "lane_$1" ) > "$RUN/logs/lane-$1.log" 2>&1; }
end_lane() {  # end_lane L PID: wait for lane L; on failure show the end of its log
  wait "$2" && return 0
  echo "[train.sh] lane $1 failed; the end of $RUN/logs/lane-$1.log:" >&2; tail -n 20 "$RUN/logs/lane-$1.log" >&2; return 1
}
run_lane a & LANE_A_PID=$!
run_lane b & LANE_B_PID=$!
ok=1
end_lane a "$LANE_A_PID" || ok=0
end_lane b "$LANE_B_PID" || ok=0
[ "$ok" = 1 ] || exit 1
