#!/usr/bin/env bash
# The GPU checks of the CUDA backend, for a GPU machine with no Rust and no network
# (docs/gpu.md says how to run it through the device tool). Uses a binary built here by
# scripts/build-cuda.sh and carried along; finds the CUDA libraries of the machine's
# PyTorch (cu130) and the driver under /usr/local/nvidia. Budget: under 8 minutes (the
# steps' timeouts add up to 7.5; expected well under 2).
#
#   scripts/gpu-check.sh [BINARY]        # default: cuda-bin/llmem (or cuda-bin/llmem.xz)
#
# Steps (each prints everything; a failed step does not stop the next):
#   1. machine, driver, libraries (ls of each directory), ldd of the binary
#   2. `llmem gpu-check`: CUDA kernels vs CPU kernels (f32/f16/bf16, tolerances per
#      dtype); a SmolLM2-135M-shaped random-weights model on GPU vs CPU in f32 and bf16
#   3. `llmem bench` on random-weights llama-3-8b, bf16 weights and KV, concurrency
#      1,8,32, --memory-utilization 0.9: planned vs measured per component, CUDA context,
#      KV blocks, tokens/s, decode tok/s against the HBM roofline
#   4. the no-device path: CUDA_VISIBLE_DEVICES= must give "no CUDA device: ..." and 2
# Logs and the bench JSON go to $OUT (the device tool brings them back) or /tmp/gpu-check.
set -uo pipefail
cd "$(dirname "$0")/.."

bin="${1:-cuda-bin/llmem}"
out="${OUT:-/tmp/gpu-check}"
mkdir -p "$out"
exec > >(tee "$out/gpu-check.log") 2>&1
status=0
step() { echo; echo "=== $* ($(date -u +%H:%M:%S))"; }

step "1. machine"
uname -a
nvidia-smi --query-gpu=name,driver_version,memory.total,memory.used --format=csv || true
# scripts/build-cuda.sh leaves the binary xz-compressed (cuda-bin/llmem.xz).
if [ ! -e "$bin" ] && [ -e "$bin.xz" ]; then
    mkdir -p /tmp/llmem-gpu
    xz -dc "$bin.xz" >/tmp/llmem-gpu/llmem && chmod +x /tmp/llmem-gpu/llmem
    bin=/tmp/llmem-gpu/llmem
fi
if [ ! -x "$bin" ]; then
    echo "FAIL: no executable $bin (build it with scripts/build-cuda.sh and carry it)"
    ls -la "$(dirname "$bin")" || true
    exit 1
fi
ls -la "$bin"

# The driver's libcuda.so.1, then PyTorch's CUDA 13 libraries (cudart, cuBLAS, cuRAND,
# NVRTC) and NCCL.
driver_dir="${LLMEM_CUDA_DRIVER_DIR:-}"   # an override, e.g. to try the script against a stub
[ -n "$driver_dir" ] || for d in /usr/local/nvidia/lib64 /usr/local/nvidia/lib /usr/lib/x86_64-linux-gnu /usr/lib64; do
    if [ -e "$d/libcuda.so.1" ]; then driver_dir="$d"; break; fi
done
if [ -z "$driver_dir" ]; then
    found="$(find /usr/local/nvidia /usr/lib /usr/lib64 -name 'libcuda.so.1' 2>/dev/null | head -n1)"
    [ -n "$found" ] && driver_dir="$(dirname "$found")"
fi
nv="$(python3 -c 'import nvidia, os; print(os.path.abspath(list(nvidia.__path__)[0]))' 2>/dev/null)"
if [ -z "$nv" ]; then
    nv="$(find / -maxdepth 7 -type d -path '*site-packages/nvidia' 2>/dev/null | head -n1)"
fi
lib_dirs=()
[ -n "$driver_dir" ] && lib_dirs+=("$driver_dir")
for d in "$nv/cu13/lib" "$nv/nccl/lib" "$nv/cublas/lib" "$nv/cuda_runtime/lib" \
    "$nv/cuda_nvrtc/lib" "$nv/curand/lib"; do
    [ -d "$d" ] && lib_dirs+=("$d")
done
echo "driver directory: ${driver_dir:-NOT FOUND}"
echo "python nvidia packages: ${nv:-NOT FOUND}"
for d in "${lib_dirs[@]}"; do
    echo "--- ls $d"
    ls "$d"
done
LD_LIBRARY_PATH="$(IFS=:; echo "${lib_dirs[*]}")${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export LD_LIBRARY_PATH
echo "LD_LIBRARY_PATH=$LD_LIBRARY_PATH"
echo "--- ldd $bin"
ldd "$bin"
if ldd "$bin" | grep -q 'not found'; then
    echo "FAIL: libraries not found (above); nothing else can run"
    exit 1
fi
"$bin" --version

step "2. llmem gpu-check (kernels vs CPU; random SmolLM2-135M shape, GPU vs CPU)"
timeout 150 "$bin" gpu-check --device cuda:0
rc=$?
echo "gpu-check exit code: $rc"
[ "$rc" = 0 ] || status=1

step "3. llmem bench: random-weights llama-3-8b bf16, concurrency 1,8,32, --memory-utilization 0.9"
timeout 270 "$bin" bench --random-weights llama-3-8b --seed 0 --device cuda:0 \
    --dtype bf16 --kv-dtype bf16 --concurrency 1,8,32 --prompt-tokens 128 --gen-tokens 64 \
    --memory-utilization 0.9 --format json >"$out/bench-llama-3-8b.json"
rc=$?
echo "bench exit code: $rc"
cat "$out/bench-llama-3-8b.json"
if [ "$rc" = 0 ]; then
    # The results table of docs/gpu.md. Decode roofline: each decode step reads every
    # weight once plus the KV of every running sequence (mean context of the run), at
    # H200's 4.8 TB/s datasheet bandwidth (about 4.3 TB/s was measured for copies there).
    python3 - "$out/bench-llama-3-8b.json" <<'EOF'
import json, sys
d = json.load(open(sys.argv[1]))
gib = 2 ** 30
b = d.get("budget") or {}
p = b.get("planned") or {}
print(f"device: {d.get('device')}; KV cache {d['kv_cache_bytes'] / gib:.2f} GiB")
print(f"budget: {b.get('budget_bytes', 0) / gib:.2f} GiB; weights {b.get('weights_bytes', 0) / gib:.2f} GiB "
      f"(planner {p.get('weights_bytes', 0) / gib:.2f}); activations {b.get('activation_bytes', 0) / gib:.2f} GiB "
      f"(planner {p.get('activation_bytes', 0) / gib:.2f}); runtime overhead (CUDA context) "
      f"{b.get('runtime_overhead_bytes', 0) / gib:.2f} GiB; max concurrency {b.get('max_concurrency')} "
      f"(planner {p.get('max_concurrency')})")
bw = 4.8e12
w = b.get("weights_bytes", 0)
kv_tok = p.get("kv_bytes_per_token", 0)
ctx = d["prompt_tokens"] + d["gen_tokens"] / 2
print()
print("| concurrency | tok/s (all) | decode tok/s (1000 C / ITL p50) | roofline decode tok/s | % of roofline | TTFT p50 ms | ITL p50 ms | KV blocks peak/total | device used GiB | context GiB | weights GiB | KV GiB | activations est. / measured GiB | unaccounted GiB |")
print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
for r in d["runs"]:
    c = r["concurrency"]
    itl = r["itl_ms"]["p50"]
    dec = 1000.0 * c / itl if itl > 0 else 0.0
    roof = c * bw / (w + c * ctx * kv_tok) if w else 0.0
    m = r.get("device_memory") or {}
    print(f"| {c} | {r['aggregate_tokens_per_s']:.1f} | {dec:.1f} | {roof:.0f} | {100 * dec / roof if roof else 0:.1f}% | "
          f"{r['ttft_ms']['p50']:.1f} | {itl:.2f} | {r['peak_kv_blocks_used']}/{r['kv_blocks_total']} | "
          f"{m.get('device_used_bytes', 0) / gib:.2f} | {m.get('cuda_context_bytes', 0) / gib:.2f} | "
          f"{m.get('weights_bytes', 0) / gib:.2f} | {m.get('kv_cache_bytes', 0) / gib:.2f} | "
          f"{m.get('activation_estimate_bytes', 0) / gib:.2f} / {(m.get('activation_peak_measured_bytes') or 0) / gib:.2f} | "
          f"{m.get('unaccounted_bytes', 0) / gib:.2f} |")
EOF
else
    status=1
fi

step "4. no device: CUDA_VISIBLE_DEVICES= (must print 'no CUDA device: ...' and exit 2)"
CUDA_VISIBLE_DEVICES= timeout 30 "$bin" bench --random-weights smollm2-135m --device cuda:0 \
    --concurrency 1 --prompt-tokens 4 --gen-tokens 2
rc=$?
echo "exit code: $rc"
[ "$rc" = 2 ] || status=1

step "done: status $status"
sleep 1 # let tee flush the log
exit "$status"
