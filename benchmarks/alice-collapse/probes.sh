#!/usr/bin/env bash
# Rewrites docs/results/scaling/alice-collapse/probes.md from the committed metrics of every Alice collapse probe
# (docs/results/scaling/alice-collapse/README.md says how each was run):  bash benchmarks/alice-collapse/probes.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
D=docs/results/scaling/alice-collapse
python benchmarks/alice_collapse.py --watch --out "$D/probes.md" \
  --run "first heads (19th session's 16k run, stopped at 2,100; commit 1588ece)=$D/no-predictor-metrics.csv" \
  --run "DINO loss (contrast_loss: dino), probe=$D/probe-dino-metrics.csv" \
  --run "BatchNorm heads + predictors, zeta with a bias (intermediate code), probe=$D/probe-byol-heads-zeta-bias-metrics.csv" \
  --run "BatchNorm heads + predictors, bias-free zeta (kept), probe=$D/probe-byol-heads-metrics.csv" \
  --run "the same code, the 16k run restarted (stopped at 2,050)=$D/byol-heads-16k-run-metrics.csv" \
  --run "the same with contrast_loss: infonce, probe=$D/probe-infonce-metrics.csv" \
  --run "the same (cosine) with lr 1e-4, probe=$D/probe-lr1e-4-metrics.csv" \
  --run "the same (cosine, lr 5e-4) at batch 8, probe=$D/probe-batch8-metrics.csv" \
  --run "21st session: kept code with the content monitors, probe=$D/probe-content-monitors-metrics.csv" \
  --run "casa_centre: position, probe=$D/probe-casa-centre-metrics.csv" \
  --run "casa_teacher: ema, probe=$D/probe-ema-casa-metrics.csv" \
  --run "casa_teacher: ema + casa_centre: position, probe=$D/probe-ema-casa-centre-metrics.csv" \
  --run "casa_centre: projector, probe=$D/probe-projector-centre-metrics.csv" \
  --run "casa_kv_norm_bias: false, probe=$D/probe-kv-norm-bias-free-metrics.csv" \
  --run "casa_kv_norm_bias: false + casa_centre: position, probe=$D/probe-kv-norm-bias-free-centre-metrics.csv" \
  "$@" > /dev/null
