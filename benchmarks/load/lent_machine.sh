#!/bin/bash
# The load runs of issue 3 on a lent 16-core x86-64 machine (the `device` tool: Python 3.12,
# no package registry, no redis-server). Not part of `make test`.
#
# Prepare here, in the repo root (both folders are ignored through .git/info/exclude):
#   printf '/.whl/\n/.rbin/\n' >> .git/info/exclude
#   .venv/bin/python -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#     --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 \
#     -d .whl grpcio grpcio-health-checking grpcio-reflection protobuf redis hiredis \
#     cryptography cffi pycparser google-re2 prometheus_client typing_extensions psycopg \
#     psycopg-binary            # the versions `.venv/bin/pip list` shows
#   mkdir -p .rbin/lib && cp /usr/bin/redis-server .rbin/redis-server.bin && \
#     cp /lib/x86_64-linux-gnu/{liblzf.so.1,libjemalloc.so.2} .rbin/lib/
#   # and .rbin/redis-server: a wrapper that runs redis-server.bin with LD_LIBRARY_PATH=lib
# Then run it there with carry [".whl", ".rbin"]:  bash benchmarks/load/lent_machine.sh
# Results land in $OUT. SKIP_COST=1 leaves out redis_cost.py, SKIP_WORKERS=1 stops after
# run.py; S, RATE, NW, NP, SHARDS (Redis shards for workers.py), SECOND_CPUS (run.py's second
# server process; default 1) tune the runs. RATE=half
# drives workers.py's open-loop rows at half the one-process unary rate run.py just measured
# (the p99 row: "at half of that rate", several processes if that is what it takes).
set -u
OUT=${OUT:-/tmp/lent}; mkdir -p "$OUT"
PY=${PY:-python3}
if [ -z "${SKIP_PIP:-}" ]; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 3
  export PYTHONPATH=/tmp/site:$PWD
fi
export PATH=$PWD/.rbin:$PATH PYTHONUNBUFFERED=1
S=${S:-8}; RATE=${RATE:-2000}; NW=${NW:-4,8}; NP=${NP:-4}; AGAINST=${AGAINST:-f46fc5b}
nproc; $PY -V; redis-server --version
[ -z "${SKIP_COST:-}" ] && echo "== redis_cost" && timeout 100 $PY benchmarks/load/redis_cost.py --against "$AGAINST" --rounds 3 --warm 10000 \
  --orders 4000 2>&1 | tee "$OUT/redis_cost.log"
echo "== run.py"
timeout 170 $PY benchmarks/load/run.py --seconds "$S" --server-cpus 0 --second-server-cpus "${SECOND_CPUS:-1}" \
  --client-cpus 4-13 --processes "$NP" --out "$OUT/run.json" 2>&1 | tee "$OUT/run.log"
[ -n "${SKIP_WORKERS:-}" ] && exit 0
if [ "$RATE" = half ]; then
  RATE=$($PY -c 'import json,sys; r={x["name"]:x for x in json.load(open(sys.argv[1]))}; print(round(r["riskd, one process, Score"]["calls_per_s"]/2))' "$OUT/run.json") || exit 4
fi
echo "== workers.py (open loop at $RATE/s)"
timeout 170 $PY benchmarks/load/workers.py --rounds 1 --seconds "$S" --server-cpus 0 \
  --worker-cpus 2-9 --client-cpus 10-15 --processes "$NP" --score-workers "$NW" \
  --rate "$RATE" --redis-shards "${SHARDS:-1}" --out "$OUT/workers.json" 2>&1 | tee "$OUT/workers.log"
