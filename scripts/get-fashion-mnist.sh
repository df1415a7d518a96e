#!/bin/sh
# Make sure the Fashion-MNIST IDX files exist; install Debian's package where apt is available.
dir="${1:-/usr/share/datasets/fashion-mnist}"
if [ -f "$dir/train-images-idx3-ubyte.gz" ] && [ -f "$dir/t10k-images-idx3-ubyte.gz" ]; then
    exit 0
fi
if command -v apt-get >/dev/null 2>&1; then
    sudo=""
    [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null 2>&1 && sudo="sudo"
    echo "installing Fashion-MNIST (Debian package dataset-fashion-mnist) ..."
    if $sudo apt-get update -qq && $sudo apt-get install -y -qq dataset-fashion-mnist >/dev/null; then
        exit 0
    fi
fi
cat >&2 <<MSG
Fashion-MNIST was not found in $dir and could not be installed with apt-get.
Get the four IDX files (train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz,
t10k-images-idx3-ubyte.gz, t10k-labels-idx1-ubyte.gz) from the Fashion-MNIST project,
put them in a directory, and pass --data-dir DIR to anybit (or set ANYBIT_DATA=DIR).
MSG
exit 1
