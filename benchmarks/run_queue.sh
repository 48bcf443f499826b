#!/usr/bin/env bash
# The measurement queue of the open issues (19, 20, 23), in order, each entry resumable and sized to finish within
# one 3-hour session on the 2-core CPU (a session's runs/ may not survive it: only what is committed surely does).
#   nohup bash benchmarks/run_queue.sh > runs/queue.log 2>&1 &
# Stop cleanly:  pkill -TERM -f "medpretrain benchmark"  (the driver stops its jobs at their last checkpoint; this
# script then keeps the finished jobs' results in docs/results/raw/FOLDER: commit that folder before the session
# ends, or run benchmarks/keep_runs.py save yourself). An entry with --models also keeps the pretrained networks
# (and an unfinished pretraining's resume checkpoint) that later jobs need, for as long as the folder survives; they
# are not committed, so a later session re-runs a lost pretraining with its seed (same CPU kind: same network).
# Each entry: "@ COMMAND" (a shell command, e.g. adopting runs; a failure is logged, not fatal), or
# PROFILE FOLDER [--option=value ...] [--models] [--after=PROFILE2:FOLDER2] [JOB-GLOB ...] (no glob = the
# whole profile; --cpu=bf16: run the entry only on a CPU with native bf16 (btcv-cpu, pinned to bf16, runs where bf16
# is native, not emulated); --cpu=fp32: on a CPU without it as it is, on one with it with `precision: auto` pinned to
# fp32 (MEDPRETRAIN_CPU_AUTO_PRECISION=32-true, training and evaluation), so a comparison whose earlier arms ran in
# fp32 on an AVX2 CPU is continued in fp32 on an AMX one, not in bf16). Before it runs, what earlier sessions kept of FOLDER is
# restored, so finished jobs are skipped and their pretrainings are not re-run. --after: the entry is skipped while
# PROFILE2's benchmark in runs/FOLDER2 has a job left to do (a profile whose budget another one calibrates: btcv-cpu
# used it until btcv-calibration-4mm was finished and kept).
# STOP_AT=HH:MM (the clock `date` shows): every entry runs with --time-limit of what is left, so no job starts that
# would not end before then (by the durations of finished jobs of its kind, OUT/timings.json) and running ones stop
# at their last checkpoint at that time; the queue then keeps the results and ends (HH:MM more than 12 h ago means
# tomorrow's; or give the date: STOP_AT="2026-12-02 00:30"):
#   STOP_AT=15:00 nohup bash benchmarks/run_queue.sh > runs/queue.log 2>&1 &
# A machine can be shut down mid-session: runs/ does not survive that, commits do. So while an entry runs its
# finished jobs are also kept every KEEP_EVERY seconds (default 1200), and with KEEP_COMMIT=1 every keep is committed
# (docs/results/raw/FOLDER only): a shutdown then loses at most the runs in progress and that much time.
#   KEEP_COMMIT=1 STOP_AT=15:00 nohup bash benchmarks/run_queue.sh > runs/queue.log 2>&1 &
# An entry whose benchmark had no job to run beyond preparing its data is not kept again (its report would lose the
# overlay images that are not kept).
set -euo pipefail
cd "$(dirname "$0")/.."
source .venv/bin/activate
entries=(
  # issue 20: la2018 budget curves at 2.5 mm, one method per session (~2 h each): scratch, null, Volume Fusion
  "scaling-la2018-proxy scaling-la2018-proxy scratch-* *null* *volume-fusion*"
  # issue 19 (ASA with the EMA fixed) and 23 (swinunetr-ssl, below): ~8 h of Swin in session-sized parts. Scratch first
  # (6 fine-tunings, ~1.5 h on two lanes). Then each pretraining alone with both threads (600 steps; 6 s/step on
  # an idle machine, 2-3x that beside another Swin job), directly followed by its 6 fine-tunings (~80 min on two
  # lanes): started at a session's beginning, a pretraining and the runs that need its weights end in that
  # session (these entries keep no networks: a pretraining whose runs/ folder was lost is re-run with its seed).
  "asa-la2018-ema asa-la2018-ema scratch-*"
  "asa-la2018-ema asa-la2018-ema --parallel=1 pretrain-asa-*"
  "asa-la2018-ema asa-la2018-ema asa-*"
  # issue 20: BTCV scratch recipe at 4 mm on validation cases only, 2 patches x 3 lr with learning curves (~4.5 h of
  # one thread); then btcv-cpu (4 mm; its budget chosen by the calibration): scratch at n = 2/4/8/all, the null
  # control and the Volume Fusion budget curve at n = 4; AVS-DB and MAE curves later
  "btcv-calibration-4mm btcv-calibration-4mm"
  # (btcv-cpu's scratch lr grid repeats the calibration's, but not its arithmetic: btcv-cpu pins bf16 autocast, the
  # calibration ran in fp32, so the grid is re-run there instead of adopted with benchmarks/adopt_runs.py)
  # issue 20: does the la2018 proxy's VF gain survive 4x longer fine-tuning? (~1 h; the 16k-step pretraining adopted)
  "@ python benchmarks/adopt_runs.py --source runs/scaling-la2018-proxy --target runs/scaling-la2018-proxy-ft4x --target-config benchmarks/scaling-la2018-proxy-ft4x.yaml"
  "scaling-la2018-proxy-ft4x scaling-la2018-proxy-ft4x --models"
  # n = 4 first (the headline comparison: scratch, null and every VF budget are all at n = 4): scratch, null, VF's
  # final network and its 2k snapshot (the driver runs jobs seed by seed, so whole arms first), then 500 and 8k, then
  # the other n
  "btcv-cpu btcv-cpu --models --cpu=bf16 scratch-unet-n4-* null-unet-n4-* volume-fusion-unet-n4-* volume-fusion@2000-unet-n4-*"
  "btcv-cpu btcv-cpu --models --cpu=bf16 scratch-unet-n4-* null-unet-n4-* volume-fusion-unet-n4-* volume-fusion@*"
  # the 64,000-step Volume Fusion pretraining alone with both threads, then its fine-tunings and its 32k snapshot's
  # (at the 16k network's lr: lr_from) at once: its network is not committed and a checkout may lose it, so the
  # pretraining and every run that needs it are sized to end in one session (~1.2 h + ~0.8 h on the AMX machine)
  "btcv-cpu btcv-cpu --models --cpu=bf16 --parallel=1 pretrain-volume-fusion-64k-unet"
  "btcv-cpu btcv-cpu --models --cpu=bf16 *volume-fusion-64k*"
  # scratch at n = 2, 8 and all (the yardstick's label-efficiency curve, seed 2: 3 runs of ~15 min)
  "btcv-cpu btcv-cpu --models --cpu=bf16 scratch-*"
  # issue 20: AVS-DB's BTCV curve (16k steps, snapshot at 2k; the issue's second method at n = 4), each pretraining
  # alone with both threads, then its grid and fine-tunings, so that network and runs end in one session (~2 h)
  "btcv-cpu btcv-cpu --models --cpu=bf16 --parallel=1 pretrain-avsdb-unet"
  "btcv-cpu btcv-cpu --models --cpu=bf16 *avsdb*"
  # any scratch / null / Volume Fusion job of btcv-cpu still left (none since the 14th session: a no-op check)
  "btcv-cpu btcv-cpu --models --cpu=bf16 scratch-* *null* *volume-fusion*"
  # issue 20/23: the MAE and Models Genesis reference baselines on BTCV. MAE's pretraining alone with both threads
  # (~16 min, as it first ran: its kept fraction-learnt belongs to that network), then its grid and 6 fine-tunings
  # with Models Genesis's pretraining on the other lane, then Models Genesis's runs (~1.5 h + ~1 h). Before the ft2x
  # arms since the 15th session: these two answer both issues, ft2x's third seed only firms up a measured answer.
  # (both finished in the 15th-16th sessions: these entries are no-op checks now.)
  "btcv-cpu btcv-cpu --models --cpu=bf16 --parallel=1 pretrain-mae-unet"
  "btcv-cpu btcv-cpu --models --cpu=bf16 *mae* pretrain-models-genesis-unet"
  "btcv-cpu btcv-cpu --models --cpu=bf16 *models-genesis*"
  # issue 23: the swinunetr-ssl reference arm on la2018 (finished in the 17th session: 600 steps in 34 min, 6
  # fine-tunings of 23-29 min; the entries pass in seconds now). 16th session: moved before ft2x's remaining runs, since it is
  # the last measurement issue 23 needs while ft2x's third seeds only firm up a measured answer; its network (16 MB)
  # kept between sessions with --models for as long as the checkout keeps ignored files (~2.5 h on the AMX machine:
  # 600 pretraining steps with both threads, then 6 fine-tunings of ~37 min on two lanes)
  "asa-la2018-ema asa-la2018-ema --models --cpu=fp32 --parallel=1 pretrain-swinunetr-ssl-*"
  "asa-la2018-ema asa-la2018-ema --models --cpu=fp32 swinunetr-ssl-*"
  # is VF's n = 4 gain a head start? 2x the fine-tuning steps for scratch, null and VF@16k (~16 fine-tunings of ~27
  # min and VF's 16k pretraining: ~4 h on two lanes, two sessions). The whole profile in one entry, so that the
  # driver fills both lanes: VF's pretraining (adopted where btcv-cpu's network survived, else re-run on one thread,
  # ~31 min, as btcv-cpu ran it: the same network bit for bit) runs beside scratch's grid instead of beside an idle
  # lane, and a grid's last run beside another arm's (13th session: the two-part split left a lane idle ~30 min
  # per grid). A network lost between sessions is re-run only while a VF job still needs it.
  "@ python benchmarks/adopt_runs.py --source runs/btcv-cpu --target runs/btcv-cpu-ft2x --target-config benchmarks/btcv-cpu-ft2x.yaml"
  # 14th session: VF's gain shrank from +0.079 to +0.007 (seed 0) with 4,000 steps, so AVS-DB's arm (its curve closes
  # sooner) follows at once in the same entry, its lr grid filling the lane VF's last seeds leave idle (~2 h; its
  # 16k network adopted from btcv-cpu where it survived, else re-run with its seed, ~30 min on one lane). Finished in
  # the 18th session (every arm, 3 seeds): a no-op check now.
  "btcv-cpu-ft2x btcv-cpu-ft2x --models --cpu=bf16"
  # issue 20: the la2018 proxy curve of AVS-DB (~2 h; finished in the 18th session in 50 min on the AMX machine)
  "scaling-la2018-proxy scaling-la2018-proxy --cpu=fp32 *avsdb*"
  # issue 20: the la2018 proxy curve of MAE (~1 h on the AMX machine; started in the 18th session, so it finishes
  # first: its pretraining resumes from its checkpoint)
  "scaling-la2018-proxy scaling-la2018-proxy --cpu=fp32 *mae*"
  # issue 20: la2018 at the standard resolution as far as the CPU allows (~3 h): transfer-la2018's protocol. 18th
  # session: before Alice, since whether the two regimes agree is the question left without any measurement
  "scaling-la2018 scaling-la2018 --cpu=fp32 scratch-* *null* *volume-fusion-unet*"
  "scaling-la2018 scaling-la2018 --cpu=fp32 *-long*"
  # issue 20: Alice's longer points (16k-step pretraining, snapshots at 500 and 4k) on la2018, fp32 pinned in the
  # profile so that either kind of CPU runs it (~3 h on the AMX machine, ~4.5 h on the EPYC: 2026-12-03's estimate
  # from docs/results/alice/la2018's timings, 18 min per 600-step UNETR-small fine-tuning, 0.23 s per Alice step).
  # 19th session: split into parts that each end in a session, since a checkout may lose runs/ and with it the
  # uncommitted network (the 19th session's did). First the pretraining alone with both threads and every run that
  # needs its final network or 4k snapshot (its lr grid, 3 test seeds each: ~2.3 h on the EPYC), then the 500-step
  # snapshot's 3 runs (its network is the same pretraining's: re-run with the seed if lost), then scratch's grid and
  # tests and the null control (no pretrained network: these span sessions safely, ~1.5 h).
  # HELD (19th-21st sessions): Alice's embedding losses collapse on this CPU. The 20th session's heads
  # (BatchNorm projector, predictors, bias-free zeta) remove the collapse at initialisation, but every variant tried
  # (16 runs, batch 8 and six CASA changes included) collapses or turns CASA's alignment content-free within ~2,000 steps
  # (docs/results/scaling/alice-collapse/). Running
  # these would measure Alice without its contrastive terms. Put the entries back only with a pretraining whose
  # monitors hold (st_spread, dv_spread, median st_other / st_own clearly above 1, e.g. > 1.1); delete runs/ and docs/results/raw/ of
  # alice-la2018-scaling's pretrain folder first.
  #"alice-la2018-scaling alice-la2018-scaling --models --parallel=1 pretrain-alice-*"
  #"alice-la2018-scaling alice-la2018-scaling --models alice-unetr-small-* alice@4000-*"
  #"alice-la2018-scaling alice-la2018-scaling --models alice@500-*"
  #"alice-la2018-scaling alice-la2018-scaling --models"
)
current="" models=""
# what `precision: auto` resolves to on this CPU (--cpu=bf16 entries run only where it is bf16; --cpu=fp32 entries
# pin it to fp32 where it is not)
machine=$(python -c "from medpretrain.engine.device import cpu_supports_bf16
print('bf16' if cpu_supports_bf16() else 'fp32')")
echo "$(date -u +%H:%M:%S) queue: this CPU's automatic precision: $machine"
mkdir -p runs
keep() {
  # One keep at a time (the periodic keeper and the main loop both call it: a half-copied network must not be
  # committed); a commit is tried three times (another commit may hold git's index), and what a failed one staged is
  # unstaged, so that no later commit of someone else's sweeps it in.
  [ -n "$current" ] || return 0
  (
    flock 9
    python benchmarks/keep_runs.py save "runs/$current" "docs/results/raw/$current" $models || exit 0
    [ "${KEEP_COMMIT:-0}" = 1 ] || exit 0
    [ -n "$(git status --porcelain -- "docs/results/raw/$current")" ] || exit 0
    for attempt in 1 2 3; do
      if { git add -- "docs/results/raw/$current" && git commit -q -m "raw: $current, finished jobs kept by the queue" \
          -- "docs/results/raw/$current"; } > /dev/null 2>&1; then
        exit 0
      fi
      sleep 5
    done
    git reset -q -- "docs/results/raw/$current" > /dev/null 2>&1 || true
    echo "$(date -u +%H:%M:%S) queue: could not commit docs/results/raw/$current (kept there; commit it yourself)"
  ) 9> runs/.queue-keep.lock || true
}
# Whether the entry running (or just ended) had a job to run beyond preparing its data: prepared data is not kept,
# so every entry re-prepares it, and keeping after that alone would only rewrite the kept report. A job started and
# not finished counts (an unfinished pretraining's resume checkpoint is kept with --models).
ran_jobs() {
  local to_run prepared
  to_run=$(sed -nE 's/.* ([0-9]+) to run,.*/\1/p' runs/.queue-entry.log 2> /dev/null | tail -n 1 || true)
  prepared=$(grep -scE '\] prepare-(downstream|pool) ' runs/.queue-entry.log || true)
  [ "${to_run:-0}" -gt "${prepared:-0}" ]
}
echo "" > runs/.queue-current  # the entry now running, for the periodic keeper
( while sleep "${KEEP_EVERY:-1200}"; do
    read -r current models < runs/.queue-current || true
    if ran_jobs; then keep; fi
  done ) &
keeper=$!
# The keeper's children first (its sleep would hold the log open); set -e holds in a trap too: a failed kill must
# not skip the last keep.
trap 'pkill -P "$keeper" 2>/dev/null || true; kill "$keeper" 2>/dev/null || true; keep' EXIT
for entry in "${entries[@]}"; do
  unset MEDPRETRAIN_CPU_AUTO_PRECISION  # only the entry that sets it below runs with it
  if [[ $entry == "@ "* ]]; then  # a command, not a benchmark: run it, note a failure, go on
    echo "$(date -u +%H:%M:%S) queue: ${entry#@ }"
    bash -c "${entry#@ }" || echo "$(date -u +%H:%M:%S) queue: failed (exit $?): ${entry#@ }"
    continue
  fi
  read -r profile folder globs <<< "$entry"
  args=() models="" after="" cpu=""
  set -f  # the globs are medpretrain's, not the shell's
  for g in $globs; do
    case $g in
      --models) models=--models ;;           # keep's option: keep pretrained models that later entries need
      --after=*) after=${g#--after=} ;;      # PROFILE2:FOLDER2 that must be finished first
      --cpu=*) cpu=${g#--cpu=} ;;            # bf16 or fp32: run only on a CPU whose automatic precision is that
      --*) args+=("${g%%=*}" "${g#*=}") ;;   # a benchmark option, --name=value
      *) args+=(--jobs "$g") ;;
    esac
  done
  set +f
  if [ -n "$cpu" ] && [ "$cpu" != "$machine" ]; then
    if [ "$cpu" != fp32 ]; then
      echo "$(date -u +%H:%M:%S) queue: skipping $profile ${globs}: for a $cpu CPU, this one is $machine"
      continue
    fi
    export MEDPRETRAIN_CPU_AUTO_PRECISION=32-true
    echo "$(date -u +%H:%M:%S) queue: $profile ${globs}: precision auto pinned to fp32 on this $machine CPU"
  fi
  python benchmarks/keep_runs.py restore "docs/results/raw/$folder" "runs/$folder"
  if [ -n "$after" ]; then
    python benchmarks/keep_runs.py restore "docs/results/raw/${after#*:}" "runs/${after#*:}"
    # Count the jobs left (grep -c reads everything: no SIGPIPE under pipefail); a failed check counts as one.
    left_jobs=$( (medpretrain benchmark --config "benchmarks/${after%%:*}.yaml" --out "runs/${after#*:}" --dry-run \
        2>&1 || echo "todo (the check failed)") | grep -c '^todo' || true)
    if [ "${left_jobs:-0}" -gt 0 ]; then
      echo "$(date -u +%H:%M:%S) queue: skipping $profile ${globs}: ${after%%:*} in runs/${after#*:} is not finished"
      continue
    fi
  fi
  if [ -n "${STOP_AT:-}" ]; then
    left=$(( $(date -d "$STOP_AT" +%s) - $(date +%s) ))
    # `date -d HH:MM` is today's clock time: one more than 12 h past is meant for after midnight
    [ "$left" -lt -43200 ] && left=$(( left + 86400 ))
    if [ "$left" -le 60 ]; then
      echo "$(date -u +%H:%M:%S) queue: STOP_AT $STOP_AT reached"
      break
    fi
    args+=(--time-limit "$left")
  fi
  echo "$(date -u +%H:%M:%S) queue: $profile in runs/$folder ${globs:-(all jobs)}"
  current=$folder  # from here on the entry's results are kept, at the latest by the EXIT trap
  echo "$current $models" > runs/.queue-current
  medpretrain benchmark --config "benchmarks/$profile.yaml" --out "runs/$folder" "${args[@]}" 2>&1 \
      | tee runs/.queue-entry.log
  echo "" > runs/.queue-current
  if ran_jobs; then keep; fi  # an entry that ran nothing new: what is kept already stands
  current=""
done
echo "$(date -u +%H:%M:%S) queue: all done"
