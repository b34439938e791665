#!/usr/bin/env bash
# `make fuzz`: builds the fuzz targets (fuzz/, cargo-fuzz + libFuzzer) and runs
# each for FUZZ_SECONDS from its committed seeds (fuzz/corpus/<target>/), then
# prints per target the executions (libFuzzer's `stat::number_of_executed_units`)
# and the crashes, and fails if any target crashed. A crashing input is kept in
# fuzz/artifacts/<target>/ (README "Fuzzing": how it becomes a regression test).
#
# The committed corpus never grows: each run starts from a scratch copy of it
# under the fuzz target directory. FUZZ_MERGE=1 merges what a run found back
# into fuzz/corpus/ (libFuzzer `-merge=1`: only inputs that add coverage), for
# a deliberate commit.
#
#   FUZZ_SECONDS=60        seconds per target
#   FUZZ_TARGETS="a b"     which targets (default: every [[bin]] in fuzz/Cargo.toml)
#   FUZZ_TARGET_DIR=DIR    the fuzz build's target directory (default fuzz/target)
#   FUZZ_SANITIZER=address address or none (default: address where rustc has it)
#   FUZZ_MERGE=1           merge new coverage into fuzz/corpus/
#
# The machine is shared: run it as `nice -n 10 make fuzz`.
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

seconds=${FUZZ_SECONDS:-60}
target_dir=${FUZZ_TARGET_DIR:-$ROOT/fuzz/target}
mkdir -p "$target_dir"
target_dir=$(cd "$target_dir" && pwd)
# cargo-fuzz needs nightly flags (-Z); the stable toolchain accepts them with
# RUSTC_BOOTSTRAP=1.
export RUSTC_BOOTSTRAP=1

if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "fuzz: installing cargo-fuzz" >&2
  cargo install cargo-fuzz --locked
fi

# AddressSanitizer where this rustc links and runs it, else none (Rust code
# is memory safe without it; it matters for unsafe code and C dependencies).
sanitizer=${FUZZ_SANITIZER:-}
if [[ -z $sanitizer ]]; then
  probe=$(mktemp -d)
  if echo 'fn main() {}' | rustc -Zsanitizer=address -o "$probe/probe" - 2>/dev/null && "$probe/probe"; then
    sanitizer=address
  else
    sanitizer=none
  fi
  rm -rf "$probe"
fi

# Release code with debug assertions and overflow checks (-a): an overflow is
# a crash. 16 codegen units: a much faster build for a slightly slower run.
cargo fuzz build --fuzz-dir fuzz --target-dir "$target_dir" -O -a --codegen-units 16 \
  --sanitizer "$sanitizer"

read -r -a targets <<<"${FUZZ_TARGETS:-$(cargo fuzz list --fuzz-dir fuzz | tr '\n' ' ')}"
bin_dir=$target_dir/$(rustc -vV | sed -n 's/^host: //p')/release
logs=$target_dir/logs
mkdir -p "$logs"

printf 'fuzz: %s s per target, sanitizer %s\n' "$seconds" "$sanitizer"
printf '%-14s %14s %8s  %s\n' target executions crashes "log / crashing input"
total=0
failed=0
for t in "${targets[@]}"; do
  scratch=$target_dir/corpus/$t
  artifacts=$ROOT/fuzz/artifacts/$t
  rm -rf "$scratch"
  mkdir -p "$scratch" "$artifacts"
  cp -r "$ROOT/fuzz/corpus/$t/." "$scratch/"
  before=$(ls "$artifacts")
  status=0
  "$bin_dir/$t" "$scratch" -max_total_time="$seconds" -timeout=10 -print_final_stats=1 \
    -artifact_prefix="$artifacts/" >"$logs/$t.log" 2>&1 || status=$?
  # The final stats, or on a crash the last status line (`#N ...`).
  execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$logs/$t.log" | tail -n 1)
  [[ -n $execs ]] || execs=$(grep -oE '^#[0-9]+' "$logs/$t.log" | tail -n 1 | tr -d '#')
  execs=${execs:-0}
  # Inputs libFuzzer saved in this run (crash-, leak-, timeout-, oom-).
  new=$(comm -13 <(echo "$before") <(ls "$artifacts") | sed '/^$/d')
  crashes=$(echo -n "$new" | grep -c . || true)
  if ((status != 0 && crashes == 0)); then
    crashes=1 # libFuzzer failed without an artifact (e.g. out of memory at start)
  fi
  where=$logs/$t.log
  if ((crashes > 0)); then
    failed=1
    where="$where; ${new:+$artifacts/$(echo "$new" | head -n 1)}"
  fi
  printf '%-14s %14s %8s  %s\n' "$t" "$execs" "$crashes" "$where"
  total=$((total + execs))
  if [[ ${FUZZ_MERGE:-} == 1 ]]; then
    "$bin_dir/$t" -merge=1 "$ROOT/fuzz/corpus/$t" "$scratch" >>"$logs/$t.log" 2>&1
  fi
done
printf '%-14s %14s\n' total "$total"
if ((failed)); then
  echo "fuzz: a target crashed; reproduce with: $bin_dir/<target> <crashing input>" >&2
  exit 1
fi
