#!/usr/bin/env bash
# Make sure Fashion-MNIST is on this machine: install the Debian package when the files are
# missing and apt is there (as root); otherwise say how to point cnnpress at the files.
set -u
dir="${CNNPRESS_DATA_DIR:-/usr/share/datasets/fashion-mnist}"
if [ -f "$dir/train-images-idx3-ubyte.gz" ] || [ -f "$dir/train-images-idx3-ubyte" ]; then
  exit 0
fi
if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  echo "Fashion-MNIST missing: installing the Debian package dataset-fashion-mnist" >&2
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist) >&2 \
    && exit 0
fi
echo "Fashion-MNIST not found in $dir. Install the Debian package dataset-fashion-mnist, or" >&2
echo "download the four IDX files and pass --data-dir DIR (or set CNNPRESS_DATA_DIR=DIR)." >&2
echo "Tests that need the real files are skipped." >&2
exit 0
