# Sourced by the device scripts (gpu.sh, gpu_study.sh), after they set OUT and PYTHON.
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
step() {  # step NAME SECONDS COMMAND...: run, log to $OUT/NAME.txt, never abort the script
    local name=$1 limit=$2
    shift 2
    [[ -z "${ONLY:-}" || " $ONLY " == *" $name "* ]] || return 0
    echo "== $name ($(date +%T))"
    timeout "$limit" "$@" >"$OUT/$name.txt" 2>&1
    echo "   exit $? after ${SECONDS}s in all"
    tail -n 25 "$OUT/$name.txt"
}
