#!/usr/bin/env bash
# Set up a fresh Debian machine for siamese-dedup: the Fashion-MNIST data, photos and chromium (apt) and .venv (pip).
# Safe to run again: it does only what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

FMNIST_DIR="${FASHION_MNIST_DIR:-/usr/share/datasets/fashion-mnist}"
if [ ! -f "$FMNIST_DIR/train-images-idx3-ubyte.gz" ]; then
  if command -v apt-get >/dev/null 2>&1; then
    SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    echo "==> installing Fashion-MNIST (apt package dataset-fashion-mnist)"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq dataset-fashion-mnist >/dev/null
  else
    echo "warning: Fashion-MNIST not found in $FMNIST_DIR and no apt-get; set FASHION_MNIST_DIR" >&2
  fi
fi

# Photographs for trainer/photo_corpus.py (about 101 MB of .debs; the list is its PACKAGES, a test checks).
PHOTO_PACKAGES="lomiri-wallpapers-16.04 lomiri-wallpapers-20.04 endless-sky-data openuniverse-common"
missing=""
for p in $PHOTO_PACKAGES; do
  [ "$(dpkg-query -W -f='${Status}' "$p" 2>/dev/null)" = "install ok installed" ] || missing="$missing $p"
done
if [ -n "$missing" ]; then
  if command -v apt-get >/dev/null 2>&1; then
    SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    echo "==> installing photo packages for trainer/photo_corpus.py:$missing"
    $SUDO apt-get update -qq -o DPkg::Lock::Timeout=600
    # shellcheck disable=SC2086
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends \
      -o DPkg::Lock::Timeout=600 $missing >/dev/null
  else
    echo "warning: photo packages missing ($missing) and no apt-get; trainer/photo_corpus.py needs them" >&2
  fi
fi

# A browser for tests/browser.py: the report test opens report.html in headless Chromium (Debian's chromium).
if ! command -v chromium >/dev/null 2>&1 \
    && [ "$(dpkg-query -W -f='${Status}' chromium 2>/dev/null)" != "install ok installed" ]; then
  if command -v apt-get >/dev/null 2>&1; then
    SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    echo "==> installing chromium for the report's browser test (tests/beam_pipeline/test_report_browser.py)"
    $SUDO apt-get update -qq -o DPkg::Lock::Timeout=600
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends \
      -o DPkg::Lock::Timeout=600 chromium >/dev/null
  else
    echo "warning: chromium missing and no apt-get; the report's browser test is skipped without it" >&2
  fi
fi

PYTHON="${PYTHON:-python3.11}"
command -v "$PYTHON" >/dev/null 2>&1 || PYTHON=python3
if [ ! -x .venv/bin/python ]; then
  echo "==> creating .venv with $($PYTHON --version)"
  "$PYTHON" -m venv .venv
fi
stamp=.venv/.installed
if [ ! -f "$stamp" ] || [ setup.py -nt "$stamp" ]; then
  echo "==> installing siamese-dedup and its dependencies into .venv (a few minutes the first time)"
  .venv/bin/python -m pip install -q --upgrade pip setuptools wheel
  .venv/bin/python -m pip install -q -e '.[test]'
  touch "$stamp"
fi
