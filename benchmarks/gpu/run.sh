#!/usr/bin/env bash
# The GPU benchmark run: every benchmark at GPU sizes within ~8 minutes, results in OUT.
#
#   bash benchmarks/gpu/run.sh WHEEL_DIR OUT_DIR   # offline GPU image + wheels from download_wheels.sh
#   bash benchmarks/gpu/run.sh "" OUT_DIR          # any CUDA machine after `pip install -e ".[cuda]"`
#
# With wheels, they are installed (no index, no dependencies) into $STABLEJAX_GPU_SITE
# (/tmp/site) and put on PYTHONPATH; the benchmarks then run from a scratch directory, so
# stablejax comes from its wheel (or the installed package; the repository is the fallback).
# Each step has its own timeout (a slow step cannot eat the others' time) and the run goes
# on after a failure. OUT gets, flat: md_throughput.json, potential_throughput.json (one
# process per model, merged), estimator_cost.json, lj_differentiation.json,
# paper_epoch.json, summary.json (each step's status and wall time, jax.devices(),
# versions) and run_log.txt (everything printed).
#
# Environment: PYTHON (python3); STABLEJAX_GPU_BUDGET_S (total seconds: 480, smoke 1500);
# STABLEJAX_GPU_SMOKE=1 shrinks every step to tiny CPU sizes (checks the flow, no figures).
set -uo pipefail

WHEELS=${1-}
OUT=${2:?usage: run.sh WHEEL_DIR OUT_DIR  (WHEEL_DIR may be "")}
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
PY=${PYTHON:-python3}
SMOKE=${STABLEJAX_GPU_SMOKE:-0}
if [[ "$SMOKE" == 1 ]]; then BUDGET=${STABLEJAX_GPU_BUDGET_S:-1500}; else BUDGET=${STABLEJAX_GPU_BUDGET_S:-480}; fi
SITE=${STABLEJAX_GPU_SITE:-/tmp/site}
T0=$(date +%s)
export PYTHONUNBUFFERED=1  # a step killed by its timeout still leaves its output in the log

mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
WORK=$(mktemp -d "${TMPDIR:-/tmp}/stablejax_gpu.XXXXXX")
LOG=$OUT/run_log.txt
STEPS=$WORK/steps.tsv
: >"$LOG"
: >"$STEPS"
log() { echo "$*" | tee -a "$LOG"; }

log "stablejax GPU run $(date -u +%FT%TZ) on $(hostname); budget ${BUDGET}s; smoke=$SMOKE"
log "repository $REPO; output $OUT; scratch $WORK"

# --- wheels -----------------------------------------------------------------------------
if [[ -n "$WHEELS" ]] && compgen -G "$WHEELS/*.whl" >/dev/null; then
  whl=("$WHEELS"/*.whl)
  log "=== install: ${#whl[@]} wheels from $WHEELS into $SITE"
  t=$(date +%s)
  "$PY" -m pip install -q --no-index --no-deps --no-compile --upgrade --target "$SITE" \
    "${whl[@]}" 2>&1 | tee -a "$LOG"
  rc=${PIPESTATUS[0]}
  st=ok
  ((rc == 0)) || st=failed
  printf '%s\t%s\t%s\t%s\t%s\t%s\n' install "$st" "$rc" "$(($(date +%s) - t))" 0 "" >>"$STEPS"
  export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
elif [[ -n "$WHEELS" ]]; then
  log "no wheels in '$WHEELS': using the installed packages"
fi
cd "$WORK" || exit 1
if ! "$PY" -c "import stablejax, experiments, benchmarks.gpu" >/dev/null 2>&1; then
  export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$REPO"
  log "stablejax (with benchmarks.gpu) is not installed: using the sources in $REPO"
fi
log "PYTHONPATH=${PYTHONPATH:-}"

# --- steps ------------------------------------------------------------------------------
# run_step NAME TIMEOUT_S JSON CMD...: runs CMD in $WORK/NAME with its own timeout (0: all
# that is left of the budget), copies $WORK/NAME/JSON to OUT (also after a timeout: a
# benchmark may have written partial results) and records the status.
run_step() {
  local name=$1 limit=$2 json=$3
  shift 3
  local left=$((BUDGET - ($(date +%s) - T0) - 10))
  if ((left < 20)); then
    log "=== $name: skipped (budget of ${BUDGET}s spent)"
    printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$name" skipped "" 0 0 "" >>"$STEPS"
    return
  fi
  if ((limit <= 0 || limit > left)); then limit=$left; fi
  mkdir -p "$WORK/$name"
  log "=== $name (timeout ${limit}s): $*"
  local t
  t=$(date +%s.%N)
  (cd "$WORK/$name" && timeout -k 10 "$limit" "$@") 2>&1 | tee -a "$LOG"
  local rc=${PIPESTATUS[0]}
  local wall
  wall=$(awk -v a="$t" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')
  local status=ok
  if ((rc == 124 || rc == 137)); then status=timeout; elif ((rc != 0)); then status=failed; fi
  local copied=""
  if [[ -n "$json" && -f "$WORK/$name/$json" ]]; then
    cp "$WORK/$name/$json" "$OUT/$json" && copied=$json
  fi
  log "=== $name: $status (rc $rc, ${wall}s)"
  printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$name" "$status" "$rc" "$wall" "$limit" "$copied" >>"$STEPS"
}

# Standalone on purpose: it must not import our package, whose import it checks (the
# device fields repeat paper_epoch.device_info; keep the two in step).
cat >"$WORK/devices.py" <<'EOF'
import importlib
import json
import platform
import sys

import jax

devices = jax.devices()
print("jax.devices():", devices)
info = {
    "jax": jax.__version__,
    "backend": jax.default_backend(),
    "devices": [str(d) for d in devices],
    "device_kind": devices[0].device_kind,
    "python": platform.python_version(),
    "host": platform.node(),
    "packages": {},
}
for name in ("jaxlib", "flax", "optax", "orbax.checkpoint", "chex", "diffrax", "numpy", "scipy",
             "jax_md", "e3nn_jax", "ml_collections", "ase", "sympy", "stablejax"):
    try:
        mod = importlib.import_module(name)
        info["packages"][name] = {"version": getattr(mod, "__version__", None),
                                  "file": getattr(mod, "__file__", None)}
    except Exception as exc:  # recorded, not fatal: the steps show what it breaks
        info["packages"][name] = {"error": f"{type(exc).__name__}: {exc}"}
for name, p in info["packages"].items():
    print(f"  {name:18s} {p.get('version') or ''} {p.get('file') or p.get('error', '')}")
x = jax.numpy.ones((1024, 1024))
print("matmul check:", float((x @ x)[0, 0]), "on", x.devices())
json.dump(info, open("devices.json", "w"), indent=1)
sys.exit(0 if "stablejax" in info["packages"] and "error" not in info["packages"]["stablejax"] else 1)
EOF

if [[ "$SMOKE" == 1 ]]; then
  PAPER_ARGS=(--tiny)
  MD_ARGS=(--quick --systems lj_fluid,benzene_morse,free_space_edges --replicas "1,2" --free-space-replicas 2 --free-space-steps 10)
  POT_ARGS=(--batches "1,2" --repeats 1 --min-time 0.01)
  EST_ARGS=(--samples 16 --batch-size 8 --repeats 1)
  LJ_ARGS=(--quick --lengths 20 --seeds 1 --hidden 16 --train-iters 2 --time-limit 5)
  LIMITS=(60 180 400 120 150 200 240 0) # devices paper md schnet estimator nequip gemnet lj
else
  PAPER_ARGS=()                          # the paper sizes: 128 x 2000, 256 x 1000, 950 QM frames
  MD_ARGS=(--quick --systems lj_fluid,benzene_morse,free_space_edges --replicas "1,128,1024" --free-space-replicas 128)
  POT_ARGS=(--batches "1,128,1024" --repeats 2 --min-time 0.2)  # vmap and disjoint layouts
  EST_ARGS=(--samples 2560 --batch-size 256 --repeats 3 --max-run-memory-gb 64)
  LJ_ARGS=(--quick --lengths 100 1000 --seeds 2 --hidden 128 128 128 128 128 --train-iters 30
    --time-limit 20 --max-run-memory-gb 64)
  LIMITS=(30 125 75 45 45 60 70 0)
fi

run_step devices "${LIMITS[0]}" "" "$PY" "$WORK/devices.py"
run_step paper_epoch "${LIMITS[1]}" paper_epoch.json \
  "$PY" -m benchmarks.gpu.paper_epoch --out . "${PAPER_ARGS[@]}"
run_step md_throughput "${LIMITS[2]}" md_throughput.json \
  "$PY" -m benchmarks.md_throughput --out . "${MD_ARGS[@]}"
run_step potential_schnet "${LIMITS[3]}" "" \
  "$PY" -m benchmarks.potential_throughput --out . --models schnet "${POT_ARGS[@]}"
run_step estimator_cost "${LIMITS[4]}" estimator_cost.json \
  "$PY" -m benchmarks.estimator_cost --out . "${EST_ARGS[@]}"
run_step potential_nequip "${LIMITS[5]}" "" \
  "$PY" -m benchmarks.potential_throughput --out . --models nequip "${POT_ARGS[@]}"
run_step potential_gemnet_t "${LIMITS[6]}" "" \
  "$PY" -m benchmarks.potential_throughput --out . --models gemnet_t "${POT_ARGS[@]}"
run_step lj_differentiation "${LIMITS[7]}" lj_differentiation.json \
  "$PY" -m benchmarks.lj_differentiation --out . --no-plots "${LJ_ARGS[@]}"

# --- potential_throughput.json (merged) and summary.json -------------------------------------
"$PY" - "$WORK" "$OUT" "$BUDGET" "$SMOKE" "$WHEELS" "$(($(date +%s) - T0))" <<'EOF' 2>&1 | tee -a "$LOG"
import json
import os
import sys

work, out, budget, smoke, wheels, wall = sys.argv[1:7]
merged = None
for model in ("schnet", "nequip", "gemnet_t"):
    path = os.path.join(work, f"potential_{model}", "potential_throughput.json")
    if os.path.exists(path):
        part = json.load(open(path))
        if merged is None:
            merged = part
        else:
            merged["models"].update(part["models"])
            merged["skipped"] += part["skipped"]
if merged is not None:
    json.dump(merged, open(os.path.join(out, "potential_throughput.json"), "w"), indent=2)

steps = []
for line in open(os.path.join(work, "steps.tsv")):
    name, status, rc, wall_s, limit, copied = line.rstrip("\n").split("\t")
    if name.startswith("potential_") and merged is not None and os.path.exists(
        os.path.join(work, name, "potential_throughput.json")
    ):
        copied = "potential_throughput.json"
    steps.append({
        "name": name, "status": status, "returncode": int(rc) if rc else None,
        "wall_s": float(wall_s), "timeout_s": int(limit), "json": copied or None,
    })
devices = {}
dpath = os.path.join(work, "devices", "devices.json")
if os.path.exists(dpath):
    devices = json.load(open(dpath))
summary = {
    "all_ok": all(s["status"] == "ok" for s in steps),
    "smoke": smoke == "1",
    "budget_s": int(budget),
    "total_wall_s": float(wall),
    "wheels": wheels or None,
    "pythonpath": os.environ.get("PYTHONPATH", ""),
    "jax": devices.get("jax"),
    "backend": devices.get("backend"),
    "devices": devices.get("devices"),
    "device_kind": devices.get("device_kind"),
    "python": devices.get("python"),
    "host": devices.get("host"),
    "packages": devices.get("packages"),
    "steps": steps,
}
json.dump(summary, open(os.path.join(out, "summary.json"), "w"), indent=1)
print(f"{'step':20s} {'status':8s} {'wall s':>8s} {'timeout':>8s}  json")
for s in steps:
    print(f"{s['name']:20s} {s['status']:8s} {s['wall_s']:8.1f} {s['timeout_s']:8d}  {s['json'] or ''}")
print(f"jax {summary['jax']} on {summary['devices']}; total {wall} s of {budget} s")
print("files:", sorted(os.listdir(out)))
sys.exit(0 if summary["all_ok"] else 1)
EOF
rc=${PIPESTATUS[0]}
rm -rf "$WORK"
exit "$rc"
