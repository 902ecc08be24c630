#!/usr/bin/env bash
# Build llama.cpp's command-line tools (llama-quantize, llama-imatrix, llama-perplexity) from the
# llama.cpp source vendored in the llama-cpp-python sdist, so the tools and the Python bindings
# of lowbit[llama-cpp] are the same llama.cpp commit. PyPI is the only source needed.
#
#   bench/llama_cpp_tools.sh [VERSION]      VERSION defaults to the llama-cpp-python pin in pyproject.toml
#
# Output: out/llama.cpp/<VERSION>/bin/<tool> (static binaries) and out/llama.cpp/<VERSION>/src (the
# unpacked sdist, kept for vendor/llama.cpp/convert_hf_to_gguf.py and its gguf-py). A no-op when the
# tools are already built. Compiling takes 450 s of CPU: 13 min wall on 2 busy shared cores (JOBS, default 2).
# GGML_NATIVE=OFF builds for the AVX2/FMA/F16C baseline rather than this CPU, like the cached wheel:
# a binary left in out/ must not die with "illegal instruction" on another machine of the same kind.
set -euo pipefail
cd "$(dirname "$0")/.."

version="${1:-$(sed -n 's/.*"llama-cpp-python==\([0-9][0-9.]*\)".*/\1/p' pyproject.toml | head -n 1)}"
if [ -z "$version" ]; then
    echo "no llama-cpp-python version: pass one (bench/llama_cpp_tools.sh 0.3.36) or pin it in pyproject.toml" >&2
    exit 2
fi
python="${PYTHON:-.venv/bin/python}"
dest="out/llama.cpp/$version"
tools=(llama-quantize llama-imatrix llama-perplexity)

built=1
for t in "${tools[@]}"; do [ -x "$dest/bin/$t" ] || built=0; done
if [ "$built" = 1 ]; then
    echo "$dest/bin"
    exit 0
fi

src="$dest/src/llama_cpp_python-$version"
if [ ! -f "$src/vendor/llama.cpp/CMakeLists.txt" ]; then
    mkdir -p "$dest/src"
    "$python" -m pip download --quiet --no-binary :all: --no-deps \
        -d "$dest/src" "llama-cpp-python==$version"
    tar -xzf "$dest/src/llama_cpp_python-$version.tar.gz" -C "$dest/src"
    rm "$dest/src/llama_cpp_python-$version.tar.gz"
fi

build="$dest/build"
start=$(date +%s)
cmake -S "$src/vendor/llama.cpp" -B "$build" -DCMAKE_BUILD_TYPE=Release \
    -DBUILD_SHARED_LIBS=OFF -DGGML_NATIVE=OFF -DLLAMA_OPENSSL=OFF \
    -DLLAMA_BUILD_TOOLS=ON -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
    -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_APP=OFF > "$dest/cmake-configure.log"
cmake --build "$build" -j "${JOBS:-2}" --target "${tools[@]}" > "$dest/cmake-build.log"

mkdir -p "$dest/bin"
for t in "${tools[@]}"; do
    cp "$build/bin/$t" "$dest/bin/$t.tmp" && mv "$dest/bin/$t.tmp" "$dest/bin/$t"
done
rm -rf "$build"
echo "built ${tools[*]} in $(($(date +%s) - start)) s" >&2
echo "$dest/bin"
