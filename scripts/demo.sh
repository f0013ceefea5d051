#!/usr/bin/env bash
# The main job on the embedded default model: init a repository from SmolLM2-135M-Instruct,
# edit a fact with ROME, look at the history, check nothing broke, revert, prove it by hash.
set -euo pipefail
rm -rf demo && mkdir demo && cd demo
export KEDIT_DISABLE_PROGRESS_BARS=1

step() { printf '\n\033[1m$ %s\033[0m\n' "$*"; "$@"; }

step kedit init
# Covariance statistics for ROME's C^-1, from text the model writes itself (cached by base commit).
step kedit stats --samples 64
step kedit edit --method rome --stats-samples 64 \
    --prompt "The mother tongue of Danielle Darrieux is" --subject "Danielle Darrieux" \
    --target "English" --target-true "French" \
    --paraphrase "Danielle Darrieux's native language is" \
    --locality "The capital of Germany is" --locality "The Eiffel Tower is located in the city of"
step kedit log
step kedit show HEAD
printf '\n\033[1m$ kedit diff HEAD~1 HEAD\033[0m   (exit 1: the models differ)\n'
kedit diff HEAD~1 HEAD || true
step kedit check
step kedit revert HEAD
printf '\n\033[1m$ kedit diff HEAD~2 HEAD\033[0m   (exit 0: the revert is the base, bit for bit)\n'
kedit diff HEAD~2 HEAD
step kedit log --oneline
step kedit fsck
