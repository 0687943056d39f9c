#!/usr/bin/env bash
# Install the peer models of fcr_tools' benchmarks, each in its own virtual environment under
# benchmarks/peers/ (never in fcr_tools' dependencies):
#
#   .venv-biolord  Python 3.11, the CPU build torch==2.13.0 first, then biolord (PyPI) with
#                  scvi-tools; pip is held to the torch already there by a constraint.
#   .venv-cpa      Python 3.10, torch 1.13.1 (cpa-tools 0.8.1 wants torch<2; PyPI has no CPU
#                  build of it, so this is the CUDA 11.7 build with its nvidia-* wheels, about
#                  3 GB installed; it runs on the CPU), then cpa-tools with cpa-constraints.txt.
#
# Usage:  bash benchmarks/peers/install.sh [--force] [biolord] [cpa]      (default: both)
#
# Idempotent: a peer whose environment already imports with the wanted versions is left alone
# (--force rebuilds it). The peers are installed independently; each one's outcome (versions,
# or the reason it failed) goes into benchmarks/peers/status.json, its pip output into
# benchmarks/peers/logs/install-PEER.log. Exit status: 0 if every requested peer is usable.
#
# Settings (environment variables):
#   BIOLORD_SPEC   default "biolord==0.0.3"      BIOLORD_TORCH  default $FCR_TORCH or "torch==2.13.0"
#   CPA_SPEC       default "cpa-tools==0.8.1"    CPA_TORCH      default "torch==1.13.1"
#   BIOLORD_PYTHON / CPA_PYTHON   interpreter to use (default: python3.11 / python3.10, also
#                  looked up under pyenv)
#   CPA_MIN_FREE_GB  free disk needed before the CPA install (default 8)
set -u

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
STATUS="$HERE/status.json"
LOGS="$HERE/logs"
BIOLORD_SPEC=${BIOLORD_SPEC:-biolord==0.0.3}
BIOLORD_TORCH=${BIOLORD_TORCH:-${FCR_TORCH:-torch==2.13.0}}
CPA_SPEC=${CPA_SPEC:-cpa-tools==0.8.1}
CPA_TORCH=${CPA_TORCH:-torch==1.13.1}
CPA_MIN_FREE_GB=${CPA_MIN_FREE_GB:-8}

FORCE=0
PEERS=()
for arg in "$@"; do
  case "$arg" in
    --force) FORCE=1 ;;
    biolord|cpa) PEERS+=("$arg") ;;
    -h|--help) sed -n '2,27p' "$0"; exit 0 ;;
    *) echo "unknown argument: $arg (expected --force, biolord, cpa)" >&2; exit 2 ;;
  esac
done
[ ${#PEERS[@]} -eq 0 ] && PEERS=(biolord cpa)
mkdir -p "$LOGS"

# ------------------------------------------------------------------------------ helpers
find_python() {  # find_python 3.10 [explicit]: an interpreter of that version, on stdout
  local want=$1 explicit=${2:-} c
  local candidates=()
  [ -n "$explicit" ] && candidates+=("$explicit")
  candidates+=("python$want")
  if command -v pyenv >/dev/null 2>&1; then
    candidates+=("$(pyenv root)"/versions/"$want"*/bin/python"$want")
  fi
  candidates+=("$HOME"/.pyenv/versions/"$want"*/bin/python"$want" /usr/bin/python"$want" /usr/local/bin/python"$want")
  for c in "${candidates[@]}"; do
    if "$c" -c "import sys, venv; assert '%d.%d' % sys.version_info[:2] == '$want'" >/dev/null 2>&1; then
      "$c" -c "import sys; print(sys.executable)"
      return 0
    fi
  done
  return 1
}

REASON=""
step() {  # step LOG DESCRIPTION CMD...: run CMD, output to LOG; on failure set REASON
  local log=$1 desc=$2
  shift 2
  echo "+ $*" >>"$log"
  "$@" >>"$log" 2>&1
  local rc=$?
  [ $rc -eq 0 ] && return 0
  local detail
  detail=$(grep -E '^(ERROR|error|[A-Za-z]*Error|[A-Za-z]*Exception)|No matching distribution|ResolutionImpossible' "$log" \
    | grep -v "^WARNING" | tail -n 3 | tr '\n' ' ')
  [ -z "$detail" ] && detail=$(grep -v '^\s*$' "$log" | tail -n 3 | tr '\n' ' ')
  REASON="$desc failed (exit $rc): ${detail}"
  return 1
}

record() {  # record PEER OK(1/0) PYTHON VENV LOG VERSIONS_JSON REASON
  PEER="$1" OK="$2" PY="$3" VENV="$4" LOG="$5" VERSIONS="$6" WHY="$7" STATUS="$STATUS" \
    "${PYTHON_FOR_STATUS:-python3}" - <<'PYEOF'
import json, os, shutil, subprocess, time
path = os.environ["STATUS"]
try:
    with open(path) as fh:
        status = json.load(fh)
except (OSError, ValueError):
    status = {}
entry = {
    "ok": os.environ["OK"] == "1",
    "python": os.environ["PY"],
    "venv": os.environ["VENV"],
    "log": os.environ["LOG"],
    "checked_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
}
if entry["ok"]:
    entry["versions"] = json.loads(os.environ["VERSIONS"] or "{}")
    try:
        out = subprocess.run(["du", "-sm", entry["venv"]], capture_output=True, text=True)
        entry["venv_mb"] = int(out.stdout.split()[0])
    except (OSError, ValueError, IndexError):
        pass
else:
    entry["reason"] = os.environ["WHY"].strip()
status[os.environ["PEER"]] = entry
with open(path, "w") as fh:
    json.dump(status, fh, indent=2, sort_keys=True)
    fh.write("\n")
PYEOF
}

# torch's distribution version (the wheel's, e.g. 2.13.0+cpu or 1.13.1; torch.__version__ may
# add a local tag such as +cu117 that pip's constraints would not match)
TORCH_VERSION='from importlib.metadata import version; print(version("torch"))'

# check-import snippets: print the versions as JSON, fail if something is off
BIOLORD_CHECK='
import json, sys
from importlib.metadata import version
import torch, scvi, biolord, anndata
want = sys.argv[1]
have = version("torch")
assert have == want, f"torch {have} != {want}"
print(json.dumps({p: version(p) for p in ["biolord", "scvi-tools", "torch", "lightning", "anndata", "numpy"]}))
'
CPA_CHECK='
import json, sys, warnings
warnings.simplefilter("ignore")
from importlib.metadata import version
import torch, scvi, cpa, anndata
want = sys.argv[1]
have = version("torch")
assert have == want, f"torch {have} != {want}"
print(json.dumps({p: version(p) for p in ["cpa-tools", "scvi-tools", "torch", "pytorch-lightning", "jax", "anndata", "numpy"]}))
'

torch_pin() {  # the version a "torch==X[+local]" spec asks for, or empty
  case "$1" in torch==*) echo "${1#torch==}" | awk '{print $1}' ;; *) echo "" ;; esac
}

spec_met() {  # spec_met VERSIONS_JSON "name==X": the JSON has that version (any, without ==)
  case "$2" in
    *==*) echo "$1" | grep -q "\"${2%%==*}\": \"${2##*==}\"" ;;
    *) return 0 ;;
  esac
}

# ------------------------------------------------------------------------------ peers
install_peer() {  # install_peer NAME PYVER PYEXPLICIT TORCH_SPEC PEER_SPEC CHECK [CONSTRAINTS [EXTRAS]]
  local name=$1 pyver=$2 pyexplicit=$3 torch_spec=$4 peer_spec=$5 check=$6 constraints=${7:-}
  local extras=${8:-}
  local venv="$HERE/.venv-$name" log="$LOGS/install-$name.log" py versions want
  REASON=""
  : >"$log"
  echo "== $name: $(date)" >>"$log"
  if ! py=$(find_python "$pyver" "$pyexplicit"); then
    record "$name" 0 "" "$venv" "$log" "" "no Python $pyver interpreter found (tried ${pyexplicit:-} python$pyver and pyenv's versions; set ${name^^}_PYTHON)"
    echo "$name: FAILED (no Python $pyver)"
    return 1
  fi
  want=$(torch_pin "$torch_spec")
  # torch wheels with a local version (2.13.0+cpu) report it; accept either form
  if [ "$FORCE" = 0 ] && [ -x "$venv/bin/python" ]; then
    local have
    have=$("$venv/bin/python" -c "$TORCH_VERSION" 2>/dev/null || true)
    if [ -n "$have" ] && { [ -z "$want" ] || [ "${have%%+*}" = "${want%%+*}" ]; } \
      && versions=$("$venv/bin/python" -c "$check" "$have" 2>>"$log" | tail -n 1) \
      && spec_met "$versions" "$peer_spec"; then
      record "$name" 1 "$py" "$venv" "$log" "$versions" ""
      echo "$name: already installed ($versions)"
      return 0
    fi
  fi
  if [ "$name" = cpa ]; then
    local free_gb
    free_gb=$(df -Pk "$HERE" | awk 'NR==2 {printf "%d", $4 / 1048576}')
    if [ "$free_gb" -lt "$CPA_MIN_FREE_GB" ]; then
      record "$name" 0 "$py" "$venv" "$log" "" "only ${free_gb} GB free on $(df -P "$HERE" | awk 'NR==2 {print $6}'); the CUDA build of torch 1.13.1 needs about 3 GB installed and as much again to download (CPA_MIN_FREE_GB=$CPA_MIN_FREE_GB)"
      echo "$name: FAILED (disk)"
      return 1
    fi
  fi
  rm -rf "$venv"
  local have=""
  if step "$log" "creating the virtual environment with $py" "$py" -m venv "$venv" \
    && step "$log" "installing $torch_spec" "$venv/bin/pip" install --no-cache-dir $torch_spec \
    && have=$("$venv/bin/python" -c "$TORCH_VERSION" 2>>"$log") \
    && echo "torch==$have" >"$venv/torch-constraint.txt" \
    && step "$log" "installing $peer_spec${extras:+ $extras}" "$venv/bin/pip" install --no-cache-dir \
      -c "$venv/torch-constraint.txt" ${constraints:+-c "$constraints"} "$peer_spec" $extras \
    && versions=$("$venv/bin/python" -c "$check" "$have" 2>>"$log" | tail -n 1) \
    && [ -n "$versions" ]; then
    record "$name" 1 "$py" "$venv" "$log" "$versions" ""
    echo "$name: installed ($versions)"
    return 0
  fi
  if [ -z "$REASON" ]; then
    REASON="import check failed: $(grep -v '^\s*$' "$log" | tail -n 2 | tr '\n' ' ')"
  fi
  record "$name" 0 "$py" "$venv" "$log" "" "$REASON"
  echo "$name: FAILED: $REASON"
  return 1
}

rc=0
for peer in "${PEERS[@]}"; do
  case "$peer" in
    biolord)
      install_peer biolord 3.11 "${BIOLORD_PYTHON:-}" "$BIOLORD_TORCH" "$BIOLORD_SPEC" \
        "$BIOLORD_CHECK" || rc=1 ;;
    cpa)
      # scanpy and seaborn: imported by cpa-tools 0.8.1 but not among its requirements
      install_peer cpa 3.10 "${CPA_PYTHON:-}" "$CPA_TORCH" "$CPA_SPEC" "$CPA_CHECK" \
        "$HERE/cpa-constraints.txt" "scanpy seaborn" || rc=1 ;;
  esac
done
echo "status: $STATUS"
exit $rc
