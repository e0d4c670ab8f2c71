#!/usr/bin/env bash
# Run the paper protocols of conf/experiment/ one after another into outputs/papers/<experiment>, resuming any that
# a previous session left unfinished and skipping those with results.json. Then
# `metacli report outputs/papers --format results --out docs/results.md` tabulates them beside the papers' numbers.
#
#   bash scripts/reproduce.sh      # every algorithm's default run, then every paper protocol, cheapest first
#   bash scripts/reproduce.sh protonet_omniglot_5w5s meta_sgd_omniglot_5w1s   # just these
#   bash scripts/reproduce.sh default/snail default/mann   # an algorithm's default run on Omniglot 5w1s
#
# default/<algo> is `metacli train algo=<algo> dataset=omniglot` at the algorithm's own default budget, into
# outputs/papers/default/<algo>: the runs that show every algorithm learns.
#
# Pause with `kill -TERM <pid of the running metacli>`: the run writes last.pt and exits 75, and so does this
# script; rerun it to continue where it stopped. OMP_NUM_THREADS sets the threads of each run, and a run should be
# resumed with the threads it started with to continue bit for bit. Needs METACLI_DATA (or the default data root).
set -u
cd "$(dirname "$0")/.."
OUT=${PAPERS_DIR:-outputs/papers}
DEFAULT=(protonet_omniglot_5w1s protonet_omniglot_5w5s protonet_omniglot_20w1s protonet_omniglot_20w5s protonet_omniglot_lake
         protonet_omniglot_lake_transductive
         matching_net_omniglot_5w1s matching_net_omniglot_20w1s fomaml_omniglot_5w1s maml_omniglot_5w1s
         meta_sgd_omniglot_5w1s meta_sgd_omniglot_20w1s)
ALGOS=(protonet maml anil meta_sgd reptile leo matching_net siamese relation_net baseline pretrained mann snail tadam
       lstm_meta_learner)
experiments=("${@:-${DEFAULT[@]}}")
[[ $# -gt 0 ]] || experiments=("${ALGOS[@]/#/default/}" "${experiments[@]}")
mkdir -p "$OUT"
for name in "${experiments[@]}"; do
    if [[ -f "$OUT/$name/results.json" ]]; then
        echo "$name: done ($OUT/$name/results.json)"
        continue
    fi
    echo "$name: training into $OUT/$name (log: $OUT/$name.log)"
    if [[ $name == default/* ]]; then
        what=("algo=${name#default/}" dataset=omniglot)
    else
        what=("experiment=$name")
    fi
    mkdir -p "$(dirname "$OUT/$name")"
    metacli train "${what[@]}" trainer.resume=true "hydra.run.dir=$OUT/$name" >> "$OUT/$name.log" 2>&1
    status=$?
    if [[ $status -ne 0 ]]; then
        echo "$name: stopped with exit $status (see $OUT/$name.log); rerun this script to continue"
        exit $status
    fi
done
