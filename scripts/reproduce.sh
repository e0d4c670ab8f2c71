#!/usr/bin/env bash
# Run the paper protocols of conf/experiment/ one after another into outputs/papers/<experiment>, resuming any that
# a previous session left unfinished and skipping those with results.json. Then
# `metacli report outputs/papers --format results --out docs/results.md` tabulates them beside the papers' numbers.
#
#   bash scripts/reproduce.sh                      # every experiment in the default order, cheapest first
#   bash scripts/reproduce.sh protonet_omniglot_5w5s meta_sgd_omniglot_5w1s   # just these
#
# Pause with `kill -TERM <pid of the running metacli>`: the run writes last.pt and exits 75, and so does this
# script; rerun it to continue where it stopped. OMP_NUM_THREADS sets the threads of each run, and a run should be
# resumed with the threads it started with to continue bit for bit. Needs METACLI_DATA (or the default data root).
set -u
cd "$(dirname "$0")/.."
OUT=${PAPERS_DIR:-outputs/papers}
DEFAULT=(protonet_omniglot_5w1s protonet_omniglot_5w5s protonet_omniglot_20w1s protonet_omniglot_20w5s protonet_omniglot_lake
         matching_net_omniglot_5w1s matching_net_omniglot_20w1s fomaml_omniglot_5w1s maml_omniglot_5w1s
         meta_sgd_omniglot_5w1s meta_sgd_omniglot_20w1s)
experiments=("${@:-${DEFAULT[@]}}")
mkdir -p "$OUT"
for name in "${experiments[@]}"; do
    if [[ -f "$OUT/$name/results.json" ]]; then
        echo "$name: done ($OUT/$name/results.json)"
        continue
    fi
    echo "$name: training into $OUT/$name (log: $OUT/$name.log)"
    metacli train "experiment=$name" trainer.resume=true "hydra.run.dir=$OUT/$name" >> "$OUT/$name.log" 2>&1
    status=$?
    if [[ $status -ne 0 ]]; then
        echo "$name: stopped with exit $status (see $OUT/$name.log); rerun this script to continue"
        exit $status
    fi
done
