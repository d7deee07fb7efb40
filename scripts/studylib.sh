# Shell functions the study scripts share (scripts/banking77.sh, scripts/snips.sh). Source it after setting
# W (the work directory) and SCALE (full | smoke | large); it sets up .venv and creates W/times.json.
WITH_LLAMA=1 bash scripts/setup.sh   # llama-cpp-python: the q4_k_m export and the GGUF row of the bench
. .venv/bin/activate
export TOKENIZERS_PARALLELISM=false
mkdir -p $W/logs
T=$W/times.json
[ -f $T ] || echo '{}' > $T
cpu_s() {  # cpu_s FILE: CPU seconds (user + system) of the commands this shell has run, from `times` in FILE
  python -c "import re,sys; t=re.findall(r'(\d+)m([\d.]+)s', open(sys.argv[1]).read().splitlines()[1]); \
print(round(sum(60*int(m)+float(s) for m, s in t)))" "$1"
}
stage() {  # stage NAME OUTPUT COMMAND...: run unless OUTPUT exists; its log in W/logs, times in W/times.json
  local name=$1 out=$2; shift 2
  if [ -e "$out" ]; then echo "== $name: done ($out)"; return; fi
  local id=${name%% *} log=$W/logs/${name%% *}.log
  echo; echo "== $name: $*" | tee $log
  local t0=$(date +%s)
  times > $W/logs/.times0-$id   # (not in $(...): `times` there would count that subshell's children)
  "$@" 2>&1 | tee -a $log
  times > $W/logs/.times1-$id
  python - "$T" "$name" "$t0" "$(date +%s)" "$(( $(cpu_s $W/logs/.times1-$id) - $(cpu_s $W/logs/.times0-$id) ))" \
    "$SCALE" "${OMP_NUM_THREADS:-all}" "$*" <<'PY'
import fcntl, json, os, sys
p, name, t0, t1, cpu, scale, threads, cmd = sys.argv[1:]
with open(p + ".lock", "w") as lock:  # stages in lanes finish side by side
    fcntl.flock(lock, fcntl.LOCK_EX)
    d = json.load(open(p))
    # cpu_seconds: user + system time of the stage's processes. On a shared machine the wall time is not the
    # stage's own cost; its CPU time, spread over the cores, is closer to it. started/ended (Unix seconds) give
    # the study's wall time when stages run side by side (lanes)
    d[name] = {"seconds": int(t1) - int(t0), "cpu_seconds": int(cpu), "started": int(t0), "ended": int(t1),
               "threads": threads, "scale": scale, "load_average_1min_at_end": os.getloadavg()[0], "command": cmd}
    open(p, "w").write(json.dumps(d, indent=1))
PY
}
lanes() {  # lanes FUNCTION FUNCTION: two independent chains of stages side by side, one thread each. Two
  # one-thread training processes take 0.85x the time of one two-thread process after the other
  # (scripts/bench_step_variants.py --variants fp32,pair); a GPU machine runs them one after the other
  if [ "$SCALE" = large ]; then "$1"; "$2"; return; fi
  OMP_NUM_THREADS=1 "$1" & local a=$!
  OMP_NUM_THREADS=1 "$2" & local b=$!
  local ra=0 rb=0
  wait $a || ra=$?
  wait $b || rb=$?
  [ $ra = 0 ] && [ $rb = 0 ] || { echo "error: a lane of stages failed ($1: exit $ra, $2: exit $rb); see $W/logs" >&2; exit 1; }
}
layers_of() {  # layers_of LOG: the teacher layers a training stage kept (its log's cut line), as [0,1,2]
  grep -o 'student: layers \[[0-9, ]*\]' "$1" | head -1 | grep -o '\[.*\]' | tr -d ' '
}
done_after() {  # done_after MARKER COMMAND...: a command whose output is a directory it resumes; MARKER when done
  local marker=$1; shift
  "$@" && touch "$marker"
}
print_times() {  # the stages' times and the study's wall time, from W/times.json
  python - "$T" <<'PY'
import json, sys
d = json.load(open(sys.argv[1]))
for k, v in sorted(d.items()):
    print(f"{k:<80}{v['seconds']:>7d} s wall {v.get('cpu_seconds', 0):>7d} s CPU  "
          f"(threads {v.get('threads', 'all')}, load {v['load_average_1min_at_end']:.1f})")
# the study's wall time: the union of the stages' [started, ended] (lanes overlap; a resumed run's pause is
# not counted); entries of older runs without them add their seconds
spans = sorted((v["started"], v["ended"]) for v in d.values() if "started" in v)
total, end = sum(v["seconds"] for v in d.values() if "started" not in v), None
for a, b in spans:
    total += b - a if end is None or a >= end else max(0, b - end)
    end = b if end is None else max(end, b)
print(f"{'total (wall)':<80}{total:>7d} s = {total / 60:.1f} min, {sum(v['seconds'] for v in d.values())} s of stages")
PY
}
