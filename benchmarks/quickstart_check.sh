#!/usr/bin/env bash
# The README's first quickstart command on a fresh clone, timed, and what its table depends on.
#
# Usage, from the repository root (takes 10-25 minutes on 2 CPU cores):
#   bash benchmarks/quickstart_check.sh [BRANCH]  > docs/bench/quickstart_cpu.log 2>&1
# (the recorded run: nice -n 10 bash benchmarks/quickstart_check.sh, on a 2-core VM shared with
# other jobs).
#
# 1. Clones this repository into a temporary folder and runs the README's first command there
#    verbatim (venv + pip install + the digits comparison), timing the install and the run.
# 2. Runs the comparison again in the same clone: the table must be identical.
# 3. Runs it once more pinned to one core (taskset -c 0), to show that the table depends on the
#    number of cores XLA:CPU uses.
# 4. Installs once more into a second fresh clone with pip's cache off, timing only the install.
set -u
branch=${1:-$(git rev-parse --abbrev-ref HEAD)}
repo=$PWD
tmp=$(mktemp -d)
load() { cut -d' ' -f1-3 /proc/loadavg; }
echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2), $(python3 --version)"
git clone -q "$repo" "$tmp/clone" -b "$branch" && cd "$tmp/clone" || exit 1
echo "commit $(git rev-parse --short HEAD)"
table() { cat workdirs/compare/digits_digits_sgd/comparison.md; rm -rf workdirs; }

echo "== 1. fresh clone: the README's first command ($(date -u +%T) UTC, load $(load))"
s=$(date +%s)
python3 -m venv .venv && .venv/bin/pip install -q -e '.[examples]' 2>&1 | grep -v '^WARNING: Location' ; i=$(date +%s)
.venv/bin/python -m examples.cifar.compare --config digits > run1.log 2>&1 || { tail run1.log; exit 1; }
e=$(date +%s)
echo "install $((i - s)) s, run $((e - i)) s, total $((e - s)) s (load at the end $(load))"
table
.venv/bin/pip list 2>/dev/null | grep -iE '^(jax|jaxlib|flax|optax|numpy|scikit-learn) '

echo "== 2. the same command again ($(date -u +%T) UTC, load $(load))"
s=$(date +%s); .venv/bin/python -m examples.cifar.compare --config digits > run2.log 2>&1
echo "run $(( $(date +%s) - s )) s (load at the end $(load))"
table

echo "== 3. pinned to one core: taskset -c 0 ($(date -u +%T) UTC, load $(load))"
s=$(date +%s); taskset -c 0 .venv/bin/python -m examples.cifar.compare --config digits > run3.log 2>&1
echo "run $(( $(date +%s) - s )) s (load at the end $(load))"
table

echo "== 4. install into a second fresh clone, pip cache off ($(date -u +%T) UTC, load $(load))"
git clone -q "$repo" "$tmp/clone2" -b "$branch" && cd "$tmp/clone2" || exit 1
s=$(date +%s)
PIP_NO_CACHE_DIR=1 python3 -m venv .venv && PIP_NO_CACHE_DIR=1 .venv/bin/pip install -q -e '.[examples]' 2>&1 | grep -v '^WARNING: Location'
echo "install $(( $(date +%s) - s )) s (load at the end $(load))"
rm -rf "$tmp"
