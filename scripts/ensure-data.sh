#!/usr/bin/env bash
# Makes sure the offline data is on this machine, installing Debian packages when apt-get is usable:
#  - Fashion-MNIST (the embedded default data): found in $MENTOR_DATA, ~/.cache/mentor/fashion_mnist or
#    /usr/share/datasets/fashion-mnist, or installed from the Debian package dataset-fashion-mnist;
#  - the font packages the printed-digit domains of `digits_domains` are rendered from
#    (fonts-dejavu-core, fonts-liberation, fonts-freefont-ttf, fonts-urw-base35).
# Whatever cannot be installed is reported with how to get it, and the script carries on (the tests
# that need the data are skipped then; `make demo` stops with the same message). It never fails.
set -u

# shellcheck source=scripts/apt.sh
source "$(dirname "$0")/apt.sh"

# ------------------------------------------------------------------------------------ Fashion-MNIST
have_fmnist() {
  local name=train-images-idx3-ubyte.gz dir
  for dir in "${MENTOR_DATA:-}/fashion_mnist" "${MENTOR_DATA:-}" "$HOME/.cache/mentor/fashion_mnist" \
             /usr/share/datasets/fashion-mnist; do
    if [ -n "$dir" ] && [ -f "$dir/$name" ]; then return 0; fi
  done
  return 1
}

if ! have_fmnist; then
  if can_apt; then
    echo "Fashion-MNIST not found: installing the Debian package dataset-fashion-mnist"
    apt_install dataset-fashion-mnist
  fi
  if ! have_fmnist; then
    cat >&2 <<MSG
Fashion-MNIST was not found and could not be installed here. Either
  - install the Debian package:   sudo apt-get install dataset-fashion-mnist
  - or download it with mentor:   .venv/bin/mentor data fetch fashion_mnist
  - or put the four idx .gz files in \$MENTOR_DATA/fashion_mnist
MSG
  fi
fi

# ---------------------------------------------------------------------------------------------- fonts
# One regular face per package: when it is present the package is taken as installed (the files are
# what mentor globs for, so this also accepts fonts copied in by hand).
font_packages=(fonts-dejavu-core fonts-liberation fonts-freefont-ttf fonts-urw-base35)
font_files=(DejaVuSans.ttf LiberationSans-Regular.ttf FreeSans.ttf NimbusSans-Regular)

have_font() {
  local dir
  for dir in /usr/share/fonts /usr/local/share/fonts "$HOME/.local/share/fonts" "$HOME/.fonts"; do
    if [ -d "$dir" ] && [ -n "$(find "$dir" -name "$1*" -print -quit 2>/dev/null)" ]; then return 0; fi
  done
  return 1
}

missing_fonts() {
  local i
  for i in "${!font_packages[@]}"; do
    have_font "${font_files[$i]}" || echo "${font_packages[$i]}"
  done
}

missing=$(missing_fonts)
if [ -n "$missing" ] && can_apt; then
  echo "installing the font packages for the printed-digit domains:" $missing
  # shellcheck disable=SC2086  # one word per package
  apt_install $missing
  missing=$(missing_fonts)
fi
if [ -n "$missing" ]; then
  cat >&2 <<MSG
The fonts the printed-digit domains (digits_domains) are rendered from could not be installed here
(missing: $(echo $missing)). Install them with
  sudo apt-get install $(echo $missing)
(the other data sets and the tests that do not render digits work without them).
MSG
fi
exit 0
