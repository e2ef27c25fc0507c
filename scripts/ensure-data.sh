#!/usr/bin/env bash
# Makes sure Fashion-MNIST (the embedded default data) is on this machine: found in $MENTOR_DATA,
# ~/.cache/mentor/fashion_mnist or /usr/share/datasets/fashion-mnist, or installed from the Debian
# package dataset-fashion-mnist when apt-get is usable. Otherwise says how to get it and carries on
# (the tests that need real data are skipped then; `make demo` stops with the same message).
set -u
name=train-images-idx3-ubyte.gz
for dir in "${MENTOR_DATA:-}/fashion_mnist" "${MENTOR_DATA:-}" "$HOME/.cache/mentor/fashion_mnist" \
           /usr/share/datasets/fashion-mnist; do
  if [ -n "$dir" ] && [ -f "$dir/$name" ]; then exit 0; fi
done
sudo=""
if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then sudo="sudo -n"; fi
fi
if command -v apt-get >/dev/null 2>&1 && { [ "$(id -u)" -eq 0 ] || [ -n "$sudo" ]; }; then
  echo "Fashion-MNIST not found: installing the Debian package dataset-fashion-mnist"
  if ! DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1; then
    $sudo apt-get update -qq >/dev/null 2>&1
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1
  fi
  [ -f "/usr/share/datasets/fashion-mnist/$name" ] && exit 0
fi
cat >&2 <<MSG
Fashion-MNIST was not found and could not be installed here. Either
  - install the Debian package:   sudo apt-get install dataset-fashion-mnist
  - or download it with mentor:   .venv/bin/mentor data fetch fashion_mnist
  - or put the four idx .gz files in \$MENTOR_DATA/fashion_mnist
MSG
exit 0
