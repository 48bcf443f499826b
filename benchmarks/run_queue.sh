#!/usr/bin/env bash
# The measurement queue of the open issues (19, 20, 23), in order, each profile resumable: run it in the background
# at the start of a session and stop it (Ctrl-C / kill -INT) before the session ends; the next run of this script
# skips what is finished and continues where it stopped.
#   nohup bash benchmarks/run_queue.sh > runs/queue.log 2>&1 &
# Stop cleanly:  pkill -INT -f "medpretrain benchmark"  (the driver stops its jobs at their last checkpoint)
set -euo pipefail
cd "$(dirname "$0")/.."
source .venv/bin/activate
profiles=(
  asa-la2018-ema        # issue 19 (ASA with the EMA fix) + issue 23 (swinunetr-ssl)
  transfer-la2018       # issue 23: mae and models-genesis arms (the VF arms are done)
  scaling-la2018:transfer-la2018  # issue 20: standard-resolution budget points, in transfer-la2018's folder
  scaling-la2018-proxy  # issue 20: budget curves, la2018 at 2.5 mm
  btcv-calibration      # issue 20: BTCV scratch recipe on validation only
  scaling-btcv-proxy    # issue 20: budget curves, BTCV at 4 mm
)
for entry in "${profiles[@]}"; do
  p=${entry%%:*} out=${entry#*:}  # profile[:folder]
  echo "$(date -u +%H:%M:%S) queue: $p in runs/$out"
  medpretrain benchmark --config "benchmarks/$p.yaml" --out "runs/$out"
done
echo "$(date -u +%H:%M:%S) queue: all done"
