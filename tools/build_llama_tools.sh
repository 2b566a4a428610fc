#!/usr/bin/env bash
# Build llama.cpp's own tools (llama-quantize, llama-imatrix, llama-perplexity, llama-bench) from the llama.cpp
# source vendored in the llama-cpp-python sdist, OUTSIDE this repository, for cross-checks and measurements.
# Usage: tools/build_llama_tools.sh [DEST] (default /tmp/llama-tools); extra cmake flags via CMAKE_ARGS,
# e.g. CMAKE_ARGS="-DGGML_CUDA=on -DCMAKE_CUDA_ARCHITECTURES=90"; TARGETS="llama-quantize" builds fewer tools.
# About 4 minutes on 2 cores (CPU build).
set -euo pipefail
DEST=${1:-/tmp/llama-tools}
VERSION=$(sed -n 's/^llama-cpp-python==//p' "$(dirname "$0")/../requirements.txt")
mkdir -p "$DEST"
DEST=$(cd "$DEST" && pwd)
cd "$DEST"
if [ ! -d "llama_cpp_python-$VERSION" ]; then
  python3 -m pip download --no-deps --no-binary :all: "llama-cpp-python==$VERSION" -d .
  tar xzf "llama_cpp_python-$VERSION.tar.gz"
fi
SRC="$DEST/llama_cpp_python-$VERSION/vendor/llama.cpp"
# As the Makefile builds llama-cpp-python: without AMX on x86 (its kernels crash there, ggml-org/llama.cpp#26954).
case "$(uname -m)" in
  x86_64|amd64) export CFLAGS="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"; export CXXFLAGS="$CFLAGS" ;;
esac
cmake -S "$SRC" -B build -DCMAKE_BUILD_TYPE=Release -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF \
  -DLLAMA_BUILD_SERVER=OFF ${CMAKE_ARGS:-}
cmake --build build -j"$(nproc)" --target ${TARGETS:-llama-quantize llama-imatrix llama-perplexity llama-bench}
echo "tools in $DEST/build/bin"
