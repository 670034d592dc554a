#!/usr/bin/env bash
# Download the wheels the offline GPU machine lacks, and build stablejax's own wheel.
#
#   bash benchmarks/gpu/download_wheels.sh DIR        # here (needs PyPI), then copy DIR over
#
# The GPU image has Python 3.12, jax/jaxlib 0.11 (CUDA 13), flax, optax, orbax-checkpoint,
# chex, diffrax and their dependencies (numpy, scipy, absl-py, PyYAML, typing_extensions,
# ...). This fetches, for CPython 3.12 manylinux x86-64, the rest of what stablejax
# imports: jax-md, e3nn-jax, ml-collections, ase and their runtime dependencies that the
# image does not have, pinned to the versions of the development venv. Not fetched:
#   - pymatgen (jax-md's Requires-Dist: only jax_md's crystal-structure tools import it;
#     jax_md, jax_md.space/partition/simulate do not),
#   - matplotlib (ase's and stablejax's Requires-Dist: imported only to draw figures; the
#     GPU run passes --no-plots where a benchmark would draw). STABLEJAX_WHEELS_MATPLOTLIB=1
#     adds it and its dependencies (10 more wheels, 35 MiB in all instead of 11).
# The wheels install with `pip install --no-index --no-deps --target` (benchmarks/gpu/run.sh).
set -euo pipefail

DIR=${1:?usage: download_wheels.sh DIR}
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
PY=${PYTHON:-python3}
mkdir -p "$DIR"
DIR=$(cd "$DIR" && pwd)

# name==version: Requires-Dist (extras skipped) of each, checked below.
PINS=(
  jax-md==0.2.29          # absl-py e3nn-jax einops flax frozendict jax jaxlib jraph ml-collections numpy optax pymatgen
  e3nn-jax==0.21.0        # jax jaxlib sympy numpy attrs
  ml-collections==1.1.0   # absl-py PyYAML
  ase==3.29.0             # numpy scipy matplotlib typing_extensions
  jraph==0.0.6.dev0       # jax jaxlib numpy
  einops==0.8.2
  frozendict==2.5.1
  sympy==1.14.0           # mpmath
  mpmath==1.3.0
  attrs==26.1.0
  tqdm==4.70.1            # stablejax's progress bars
)
if [[ "${STABLEJAX_WHEELS_MATPLOTLIB:-0}" == 1 ]]; then
  PINS+=(matplotlib==3.11.2 contourpy==1.3.3 cycler==0.12.1 fonttools==4.68.0
         kiwisolver==1.5.1 pillow==13.0.0 pyparsing==3.3.3 python-dateutil==4.0.0
         packaging==26.4 tzdata==2026.6)
fi

for pin in "${PINS[@]}"; do
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d "$DIR" "$pin"
done

# Our own package (stablejax, experiments, benchmarks incl. benchmarks.gpu), built from a
# copy of the sources so that the repository gets no build/ or egg-info changes.
SRC=$(mktemp -d)
trap 'rm -rf "$SRC"' EXIT
cp -r "$REPO/pyproject.toml" "$REPO/setup.cfg" "$REPO/README.md" "$REPO/stablejax" \
  "$REPO/experiments" "$REPO/benchmarks" "$SRC/"
find "$SRC" -name __pycache__ -type d -prune -exec rm -rf {} +
rm -f "$DIR"/stablejax-*.whl
"$PY" -m pip wheel -q --no-deps "$SRC" -w "$DIR"

# Every wheel's runtime requirements are either in DIR, in the GPU image, or known to be
# imported only by code the benchmarks do not run.
"$PY" - "$DIR" <<'EOF'
import re
import sys
import zipfile
from pathlib import Path

folder = Path(sys.argv[1])
norm = lambda s: re.sub(r"[-_.]+", "-", s).lower()
image = {norm(n) for n in """jax jaxlib flax optax orbax-checkpoint chex diffrax numpy scipy
    absl-py pyyaml typing-extensions ml-dtypes opt-einsum msgpack tensorstore rich treescope
    toolz etils equinox jaxtyping lineax optimistix""".split()}
lazy = {"pymatgen": "jax-md (crystal tools only)", "matplotlib": "ase, stablejax (figures)"}
have, needs = set(), {}
for whl in sorted(folder.glob("*.whl")):
    with zipfile.ZipFile(whl) as z:
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        text = z.read(meta).decode()
    name = norm(re.search(r"^Name: (.+)$", text, re.M).group(1).strip())
    have.add(name)
    for req in re.findall(r"^Requires-Dist: (.+)$", text, re.M):
        if "extra ==" in req.replace("extra==", "extra =="):
            continue
        if "platform_system" in req and "Windows" in req:
            continue
        needs.setdefault(norm(re.match(r"[A-Za-z0-9_.\-]+", req).group(0)), set()).add(name)
missing = []
for dep, by in sorted(needs.items()):
    if dep in have or dep in image:
        continue
    if dep in lazy and dep not in have:
        print(f"  not brought: {dep} (needed by {', '.join(sorted(by))}: {lazy[dep]})")
        continue
    missing.append(f"{dep} (needed by {', '.join(sorted(by))})")
if missing:
    sys.exit("missing wheels: " + "; ".join(missing))
print(f"{len(have)} wheels; every other runtime requirement is in the GPU image")
EOF
ls -l "$DIR"
du -sh "$DIR"
