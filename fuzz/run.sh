#!/usr/bin/env bash
# Builds every fuzz target and runs each for a bounded time; fails on the first crash, panic, leak or timeout.
#
#   fuzz/run.sh                      # every target, FUZZ_SECONDS (default 20) seconds each
#   FUZZ_SECONDS=600 fuzz/run.sh msix_table
#
# cargo-fuzz passes nightly-only flags (-Zsanitizer=address); RUSTC_BOOTSTRAP=1 lets the stable toolchain accept
# them (its sanitizer runtimes ship with it). If the AddressSanitizer build fails, the targets are built and run
# without a sanitizer, which still catches panics, failed assertions and overflows.
# A crash leaves its input in fuzz/artifacts/<target>/; replay it with `cargo fuzz run <target> <file>`.
set -euo pipefail
cd "$(dirname "$0")"

export RUSTC_BOOTSTRAP=1
seconds="${FUZZ_SECONDS:-20}"

start=$SECONDS

# libfuzzer-sys compiles libFuzzer, which is C++.
if ! command -v c++ >/dev/null 2>&1; then
    if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; then
        apt-get install -y -qq --no-install-recommends g++ >/dev/null
    else
        echo "fuzz: no C++ compiler; install g++ (libfuzzer-sys builds libFuzzer from source)" >&2
        exit 1
    fi
fi
if ! cargo fuzz --version >/dev/null 2>&1; then
    cargo install cargo-fuzz --locked
fi

targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
    mapfile -t targets < <(cargo fuzz list)
fi

sanitizer=address
if ! cargo fuzz build --sanitizer "$sanitizer"; then
    echo "fuzz: the AddressSanitizer build failed; building without a sanitizer" >&2
    sanitizer=none
    cargo fuzz build --sanitizer "$sanitizer"
fi
echo "fuzz: tools and build took $((SECONDS - start))s"

logs=target/fuzz-logs
mkdir -p "$logs"
for target in "${targets[@]}"; do
    echo "fuzz: $target for ${seconds}s (sanitizer: $sanitizer)"
    # libFuzzer reports every new input; keep that in a log and show its end.
    if ! cargo fuzz run --sanitizer "$sanitizer" "$target" -- \
        -max_total_time="$seconds" -timeout=30 -rss_limit_mb=2048 >"$logs/$target.log" 2>&1; then
        tail -n 80 "$logs/$target.log" >&2
        echo "fuzz: $target FAILED; the input is in fuzz/artifacts/$target/, the log in fuzz/$logs/$target.log" >&2
        exit 1
    fi
    tail -n 1 "$logs/$target.log"
done
echo "fuzz: ${#targets[@]} targets ran ${seconds}s each without a crash ($((SECONDS - start))s in all)"
