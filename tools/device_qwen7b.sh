#!/usr/bin/env bash
# Qwen2.5-7B-Instruct-shaped run, end to end, on one CUDA GPU (the lent H100), through the scripts a user runs.
#
#   tools/device_qwen7b.sh prepare   # here: the trimmed llama-cpp-python sdist, wheels, data into .device/ .whl/
#   tools/device_qwen7b.sh start     # there: launch the pipeline detached (setsid), log to $W/pipeline.log
#   tools/device_qwen7b.sh wait [S]  # there: follow the log up to S seconds (default 540), pack results to $OUT
#
# The pipeline (each stage timed by tools/measure_stage.py: wall, peak RSS, peak GPU memory -> $W/stages.jsonl):
#  1. build llama.cpp with CUDA (sm_90) from the sdist's vendored source: libllama + libggml* (llama-cpp-python
#     loads them through LLAMA_CPP_LIB_PATH, quant_utils too), llama-bench, llama-perplexity
#  2. the 7B-shaped checkpoint (tools/make_shaped_model.py: random bf16 weights, the real Qwen tokenizer)
#  3. mixed_precision_ptq.py --device cuda --target_preset Q4_K_M --max_slowdown 1.0 (defaults otherwise)
#  4. export_gguf_official.py: mixed, Q4_K_M (same imatrix), then Q3_K_M, Q6_K, F16 (the anchors; no imatrix:
#     it changes neither size nor speed); llama-bench each (pp512, tg128, all layers on the GPU)
#  5. compare_three_models.py: original (transformers, CUDA) vs Q4_K_M vs mixed
# Stages whose outputs exist are skipped, so `start` again resumes. Not part of `make test`.
#
# Variants (environment): MAX_MEMORY=16GiB runs the search under --max_memory 0=16GiB (a GPU of that size: the
# blocks that do not fit are held in CPU RAM and streamed); SPEED_COSTS=FILE uses that speed cost table
# instead of measuring one; LAYERS=N makes the checkpoint N layers deep; QUICK=1 stops after the mixed and Q4_K_M benches; SEARCH_ONLY=1 stops after the
# search and builds only ggml's CPU library (the quantizer); PTQ_ARGS adds search arguments. The split run in README: MAX_MEMORY=20GiB SPEED_COSTS=.device/speed-costs.json SEARCH_ONLY=1.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
VERSION=$(sed -n 's/^llama-cpp-python==//p' requirements.txt)
SDIST=.device/llama_cpp_python-$VERSION-trimmed.tar.gz
W=${W:-/tmp/q7}
OUT=${OUT:-$W/out}
ARCH=${CUDA_ARCH:-90}
MAX_MEMORY=${MAX_MEMORY:-}
SPEED_COSTS=${SPEED_COSTS:-}
NO_AMX="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"   # llama.cpp 0.3.36 AMX kernels crash (see Makefile)
SEARCH_ONLY=${SEARCH_ONLY:-}
PTQ_ARGS=${PTQ_ARGS:-}   # more mixed_precision_ptq.py arguments, last (they override the ones above)
QUICK=${QUICK:-}         # 1: stop after the mixed and Q4_K_M benches (no anchors, no three-model comparison)
LAYERS=${LAYERS:-}       # decoder layers of the checkpoint (default: the real model's 28)

prepare() {   # on the dev machine: what travels with the working tree (.device/ and .whl/ are git-ignored)
  mkdir -p .device/data .whl
  local src=${LLAMA_SDIST_DIR:-/tmp/llsrc}
  if [ ! -d "$src/llama_cpp_python-$VERSION" ]; then
    mkdir -p "$src"
    python3 -m pip download --no-deps --no-binary :all: "llama-cpp-python==$VERSION" -d "$src"
    tar xzf "$src/llama_cpp_python-$VERSION.tar.gz" -C "$src"
  fi
  local v=vendor/llama.cpp
  tar czf "$SDIST" -C "$src" --exclude=.git --exclude="$v/models" --exclude="$v/docs" --exclude="$v/media" \
    --exclude="$v/benches" --exclude="$v/tests" --exclude="$v/examples" --exclude="$v/tools/ui" \
    --exclude="$v/tools/server/public*" --exclude="$v/ggml/src/ggml-sycl" --exclude="$v/ggml/src/ggml-vulkan" \
    --exclude="$v/ggml/src/ggml-opencl" --exclude="$v/ggml/src/ggml-cann" --exclude="$v/ggml/src/ggml-webgpu" \
    --exclude="llama_cpp_python-$VERSION/examples" "llama_cpp_python-$VERSION"
  cp ../shared/data/wikitext-2/wiki.valid.tokens ../shared/data/wikitext-2/wiki.test.tokens .device/data/
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
    gguf==0.19.0 diskcache==5.6.3 matplotlib==3.11.2 contourpy==1.3.3 cycler==0.12.1 fonttools==4.68.0 \
    kiwisolver==1.5.1 pyparsing==3.3.3
  make models/qwen-tokenizer/tokenizer.json
  du -sh .device .whl
}

environment() {   # on the device, every call: packages and the CUDA build's libraries
  export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
  if [ ! -d /tmp/site ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  fi
  if [ ! -d "/tmp/llsrc/llama_cpp_python-$VERSION" ]; then
    mkdir -p /tmp/llsrc && tar xzf "$SDIST" -C /tmp/llsrc
  fi
  export PYTHONPATH=/tmp/site:/tmp/llsrc/llama_cpp_python-$VERSION
  export LLAMA_CPP_LIB_PATH=/tmp/llama-cuda/bin
}

stage() {   # stage NAME CMD...: timed, logged; stops the pipeline on failure
  local name=$1; shift
  echo "=== $(date -u +%T) $name: $*"
  python3 "$REPO/tools/measure_stage.py" --name "$name" --log "$W/stages.jsonl" -- "$@"
}

bench() {   # bench NAME GGUF: llama-bench pp512/tg128, all layers on the GPU, JSON
  /tmp/llama-cuda/bin/llama-bench -m "$2" -p 512 -n 128 -ngl 99 -r 5 -o json > "$W/bench-$1.json"
  python3 - "$W/bench-$1.json" "$1" <<'EOF'
import json, sys
for r in json.load(open(sys.argv[1])):
    test = f"pp{r['n_prompt']}" if r["n_prompt"] else f"tg{r['n_gen']}"
    print(f"[bench {sys.argv[2]}] {test} {r['avg_ts']:.1f} +- {r['stddev_ts']:.1f} tok/s, "
          f"{r['model_size'] / 2**30:.2f} GiB")
EOF
}

pipeline() {
  mkdir -p "$W"
  environment
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  lscpu | grep -E '^(Model name|CPU\(s\)|Thread\(s\) per core|Core\(s\) per socket|Socket\(s\))' || true
  if [ -n "$SEARCH_ONLY" ] && [ ! -e /tmp/llama-cuda/bin/libggml-cpu.so ]; then
    stage build_ggml_cpu bash -c "CFLAGS='$NO_AMX' CXXFLAGS='$NO_AMX' cmake -S /tmp/llsrc/llama_cpp_python-$VERSION/vendor/llama.cpp -B /tmp/llama-cuda \
      -G Ninja -DCMAKE_BUILD_TYPE=Release -DGGML_CUDA=off -DLLAMA_CURL=OFF -DGGML_OPENMP=OFF -DLLAMA_OPENSSL=OFF \
      -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF >/dev/null \
      && cmake --build /tmp/llama-cuda -j$(nproc) --target ggml-base ggml-cpu"
  fi
  if [ -z "$SEARCH_ONLY" ] && [ ! -x /tmp/llama-cuda/bin/llama-bench ]; then
    stage build_llama_cuda bash -c "CFLAGS='$NO_AMX' CXXFLAGS='$NO_AMX' cmake -S /tmp/llsrc/llama_cpp_python-$VERSION/vendor/llama.cpp -B /tmp/llama-cuda \
      -G Ninja -DCMAKE_BUILD_TYPE=Release -DGGML_CUDA=on -DCMAKE_CUDA_ARCHITECTURES=$ARCH -DLLAMA_CURL=OFF \
      -DGGML_OPENMP=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF >/dev/null \
      && cmake --build /tmp/llama-cuda -j$(nproc) --target llama llama-bench llama-perplexity"
  fi
  [ -n "$SEARCH_ONLY" ] || python3 -c "import llama_cpp, quant_utils; print('llama.cpp GPU offload:', \
    llama_cpp.llama_supports_gpu_offload(), '| ggml-base:', quant_utils._find_libggml_base())"
  local model=$W/qwen2.5-7b-shaped
  [ -f "$model/shape.json" ] || stage checkpoint python3 tools/make_shaped_model.py --output "$model" --device cuda \
    ${LAYERS:+--layers $LAYERS}
  [ -f "$W/mixed.pt" ] || stage ptq python3 mixed_precision_ptq.py --model_id "$model" --device cuda \
    --calib_file .device/data/wiki.valid.tokens --target_preset Q4_K_M --max_slowdown 1.0 \
    --output "$W/mixed.pt" --cache_dir "$W/cache" ${MAX_MEMORY:+--max_memory 0=$MAX_MEMORY} \
    ${SPEED_COSTS:+--speed_costs $SPEED_COSTS} ${PTQ_ARGS:-}
  if [ -n "$SEARCH_ONLY" ]; then echo "=== $(date -u +%T) pipeline done (search only)"; return; fi
  [ -f "$W/mixed.gguf" ] || stage export_mixed python3 export_gguf_official.py --model_id "$model" \
    --config "$W/mixed.pt" --output "$W/mixed.gguf"
  [ -f "$W/q4_k_m.gguf" ] || stage export_q4_k_m python3 export_gguf_official.py --model_id "$model" \
    --preset Q4_K_M --imatrix "$W/mixed.imatrix.gguf" --output "$W/q4_k_m.gguf"
  [ -f "$W/bench-mixed.json" ] || bench mixed "$W/mixed.gguf"
  [ -f "$W/bench-q4_k_m.json" ] || bench q4_k_m "$W/q4_k_m.gguf"
  if [ -n "$QUICK" ]; then echo "=== $(date -u +%T) pipeline done (quick: search, exports, benches)"; return; fi
  for preset in Q3_K_M Q6_K F16; do   # the anchors: written, benched, removed (disk)
    local lower=${preset,,}
    [ -f "$W/bench-$lower.json" ] && continue
    stage "export_$lower" python3 export_gguf_official.py --model_id "$model" --preset $preset --output "$W/$lower.gguf"
    bench "$lower" "$W/$lower.gguf"
    rm -f "$W/$lower.gguf"
  done
  [ -f "$W/compare.done" ] || { stage compare python3 compare_three_models.py --model_id "$model" \
    --q4km_path "$W/q4_k_m.gguf" --mixed_path "$W/mixed.gguf" --eval_file .device/data/wiki.test.tokens \
    --n_windows 8 --max_tokens 64 --device cuda --report "$W/report" && touch "$W/compare.done"; }
  echo "=== $(date -u +%T) pipeline done"
}

pack() {   # what comes back: logs, stage records, benches, the config (+ its imatrix, to export again elsewhere), the compare report
  mkdir -p "$OUT"
  tar czf "$OUT/results.tgz" -C "$W" --ignore-failed-read $(cd "$W" && ls -d pipeline.log stages.jsonl bench-*.json mixed.pt mixed.imatrix.gguf \
    mixed.json mixed.sensitivity.json mixed.convergence.png report cache/decode-costs-*.json 2>/dev/null) || true
  cp "$W/pipeline.log" "$OUT/" 2>/dev/null || true
}

case "${1:-}" in
  prepare) prepare ;;
  start)
    mkdir -p "$W"
    if pgrep -f "device_qwen7b.sh pipeline" >/dev/null; then echo "already running"; else
      setsid nohup bash "$0" pipeline >> "$W/pipeline.log" 2>&1 < /dev/null & disown
      echo "started; log $W/pipeline.log"
    fi ;;
  pipeline) pipeline ;;
  wait)
    limit=${2:-540}; t0=$SECONDS
    while pgrep -f "device_qwen7b.sh pipeline" >/dev/null && [ $((SECONDS - t0)) -lt "$limit" ]; do sleep 10; done
    tail -n 60 "$W/pipeline.log" | tr '\r' '\n' | grep -v '^\s*$' | tail -n 60
    pack ;;
  *) echo "usage: $0 prepare|start|wait [seconds]" >&2; exit 2 ;;
esac
