#!/usr/bin/env bash
# Issue 22's study, one resumable command: every method at 1000 steps on the
# real and synthetic corpora and their coarse-label versions, 3 seeds.
#   bash experiments/results/mixing_1000/run.sh [LABELS]
# Rerunning continues where it stopped (finished runs are read back, an
# unfinished one resumes from its last checkpoint). LABELS (comma-separated)
# restricts the main table to some rows (default: all of STUDIES["mixing_1000"]).
# REPORT_ONLY=1 trains nothing: the tables and plots from the runs finished so
# far, the missing runs listed under each table (ablate.py --report_only).
set -euo pipefail
cd "$(dirname "$0")/../../.."

# The corpora (each built once).
[ -d data/local ] || python experiments/data/build_local_corpus.py --out data/local --budget_mb 8 --seed 0
[ -d data/synthetic ] || python -c "from dograph_jax.data import write_synthetic_corpus as w; w('data/synthetic', seed=0)"
[ -d data/local_licenses_in_python ] || python experiments/data/build_coarse_corpus.py \
    --src data/local --out data/local_licenses_in_python --merge licenses=python --keep licenses=0.3 --seed 0
[ -d data/synthetic_dna_in_prose ] || python experiments/data/build_coarse_corpus.py \
    --src data/synthetic --out data/synthetic_dna_in_prose --merge dna=prose --keep dna=0.5 --seed 0

BASE=(--seeds 0,1,2 --batch_size 32 --seq_len 64 --steps 1000 --warmup_steps 100
      --eval_every 100 --eval_domains validation --save_every 250 --no_plots
      --out_dir runs/mixing_1000)
[ "${REPORT_ONLY:-0}" = 1 ] && BASE+=(--report_only)
ALL=data/local,data/synthetic,data/local_licenses_in_python,data/synthetic_dna_in_prose
COARSE=data/local_licenses_in_python,data/synthetic_dna_in_prose

# 1. Every method at its defaults (the main table).
python experiments/ablate.py --name mixing_1000 --data_dirs "$ALL" "${BASE[@]}" \
    ${1:+--only "$1"} --results_dir experiments/results/mixing_1000
# 2. The levers of issue 22 item 8: larger departures, with and without the
#    sampler; DoGraph's in-batch weights on top of another mixture (stratified).
python experiments/ablate.py --name mixing_1000_levers --data_dirs "$ALL" "${BASE[@]}" \
    --results_dir experiments/results/mixing_1000_levers \
    --config dograph_anchor1:method=dograph,anchor=1.0 \
    --config dograph_sample_anchor1:method=dograph,apply_weights=sample,anchor=1.0 \
    --config dograph_stratified:method=dograph,sampling=uniform \
    --config dograph_stratified_anchor1:method=dograph,sampling=uniform,anchor=1.0
#    Post-stratified coefficients (each cluster's share of the update exactly,
#    not in expectation: --coefficients post_stratified), on natural and on
#    stratified batches, on the two real-text corpora.
python experiments/ablate.py --name mixing_1000_levers --data_dirs data/local,data/local_licenses_in_python \
    "${BASE[@]}" --results_dir experiments/results/mixing_1000_levers_post_stratified \
    --config uniform:method=uniform --config dograph:method=dograph \
    --config stratified:method=stratified --config dograph_stratified:method=dograph,sampling=uniform \
    --config dograph_post_stratified:method=dograph,coefficients=post_stratified \
    --config dograph_stratified_post_stratified:method=dograph,sampling=uniform,coefficients=post_stratified
#    Clusters of per-block gradient directions (--normalize_blocks: every
#    parameter block's sketch of a sample scaled to unit norm before the sum).
python experiments/ablate.py --name mixing_1000_levers --data_dirs data/local,data/local_licenses_in_python \
    "${BASE[@]}" --results_dir experiments/results/mixing_1000_levers_normalize_blocks \
    --config uniform:method=uniform --config dograph:method=dograph \
    --config dograph_normalize_blocks:method=dograph,normalize_blocks=true
#    Clusters kept distinct late in training (the share of the gradients'
#    spread between DoGraph's clusters falls from 15 % to 3 % over the run):
#    dead clusters re-seeded below half the mean mass instead of 5 %, twice
#    the clusters, centroids and statistics that track faster (decay 0.5).
python experiments/ablate.py --name mixing_1000_levers --data_dirs data/local,data/local_licenses_in_python \
    "${BASE[@]}" --results_dir experiments/results/mixing_1000_levers_clusters \
    --config uniform:method=uniform --config dograph:method=dograph \
    --config dograph_reseed05:method=dograph,reseed_fraction=0.5 \
    --config dograph_m22:method=dograph,num_domains=22 \
    --config dograph_decay05:method=dograph,decay=0.5
#    The one that tied the default there (decay 0.5), on the synthetic corpora.
python experiments/ablate.py --name mixing_1000_levers --data_dirs data/synthetic,data/synthetic_dna_in_prose \
    "${BASE[@]}" --results_dir experiments/results/mixing_1000_levers_decay_synthetic \
    --config uniform:method=uniform --config dograph:method=dograph \
    --config dograph_decay05:method=dograph,decay=0.5
# 3. The reference DoGraph cannot read: stratified over the true sources.
python experiments/ablate.py --name mixing_1000_true_labels --data_dirs "$COARSE" "${BASE[@]}" \
    --results_dir experiments/results/mixing_1000_true_labels
# 4. Five seeds for the five best methods on local's average, Uniform and
#    DoGraph; and DoGraph on stratified (step 2) beside its references on
#    local and its coarse-label version, with its weights' dose: anchor 0
#    (the natural mixture: DoGraph's code path with the plain mean's update,
#    the control) and anchor 1 (the objective's optimum).
TOP=uniform,dograph,ado,stratified,mixing_law,odm,rnb
python experiments/ablate.py --name mixing_1000 --data_dirs data/local "${BASE[@]}" \
    --seeds 0,1,2,3,4 --only "$TOP" --results_dir experiments/results/mixing_1000_5seeds
python experiments/ablate.py --name mixing_1000_levers --data_dirs data/local,data/local_licenses_in_python \
    "${BASE[@]}" --seeds 0,1,2,3,4 --results_dir experiments/results/mixing_1000_levers_5seeds \
    --config uniform:method=uniform --config dograph:method=dograph \
    --config stratified:method=stratified --config dograph_stratified:method=dograph,sampling=uniform \
    --config dograph_stratified_anchor0:method=dograph,sampling=uniform,anchor=0.0 \
    --config dograph_stratified_anchor1:method=dograph,sampling=uniform,anchor=1.0
#    Five seeds of the cluster lever of step 2 that tied or beat the default
#    on 3 seeds (decay 0.5: its clusters collapse into one by step 400).
python experiments/ablate.py --name mixing_1000_levers --data_dirs data/local,data/local_licenses_in_python \
    "${BASE[@]}" --seeds 0,1,2,3,4 --results_dir experiments/results/mixing_1000_levers_decay_5seeds \
    --config uniform:method=uniform --config dograph:method=dograph \
    --config dograph_decay05:method=dograph,decay=0.5
# 5. The same rows at batch 48 x 128 tokens (6,144 tokens a step, 3x the table's).
python experiments/ablate.py --name mixing_1000 --data_dirs data/local "${BASE[@]}" \
    --batch_size 48 --seq_len 128 --out_dir runs/mixing_1000_b48 --only "$TOP" \
    --results_dir experiments/results/mixing_1000_b48
[ "${REPORT_ONLY:-0}" = 1 ] && exit 0
# 6. Where the gap to Uniform opens and closes, what DoGraph's weights do.
python experiments/analyses.py dynamics --runs runs/mixing_1000 --uniform uniform \
    --dograph dograph,dograph_sample --at 100,200,400,600,800,1000 --window 100 \
    --out experiments/results/analysis_dynamics
#    The same for DoGraph on stratified batches against stratified (lever, step 2).
python experiments/analyses.py dynamics --runs runs/mixing_1000 --uniform stratified \
    --dograph dograph_stratified,dograph_stratified_anchor0,dograph_stratified_anchor1 \
    --at 100,200,400,600,800,1000 --window 100 \
    --out experiments/results/analysis_dynamics_stratified
#    The same for the cluster levers of step 2 (3 seeds, the real-text corpora).
python experiments/analyses.py dynamics --runs runs/mixing_1000 --uniform uniform \
    --dograph dograph,dograph_reseed05,dograph_m22,dograph_decay05 \
    --at 100,200,400,600,800,1000 --window 100 \
    --out experiments/results/analysis_dynamics_clusters
# 7. Which sources DoGraph's weights favour, on natural and on stratified
#    batches of the coarse corpus: the same runs as the table (bit for bit),
#    2 seeds, with a checkpoint every 100 steps for the probe.
python experiments/ablate.py --name probe_ckpt --data_dirs data/local_licenses_in_python \
    "${BASE[@]}" --seeds 0,1 --save_every 100 --keep_checkpoints 11 --out_dir runs/probe_ckpt \
    --results_dir runs/probe_ckpt_study \
    --config dograph:method=dograph --config dograph_stratified:method=dograph,sampling=uniform \
    --config dograph_reseed05:method=dograph,reseed_fraction=0.5 \
    --config dograph_m22:method=dograph,num_domains=22
python experiments/analyses.py domains --runs runs/probe_ckpt --uniform none \
    --dograph dograph,dograph_stratified --probe_rows 32 \
    --out experiments/results/analysis_sources_composition
#    Do the cluster levers of step 2 keep more of the gradients' spread
#    between the clusters late in training?
python experiments/analyses.py domains --runs runs/probe_ckpt --uniform none \
    --dograph dograph,dograph_reseed05,dograph_m22 --probe_rows 32 \
    --out experiments/results/analysis_clusters_late
