#!/usr/bin/env bash
# Makes sure a headless Chromium is on this machine for the test that renders a `mentor report` page
# (tests/test_report.py): /usr/bin/chromium, installed from the Debian package `chromium` when it is
# missing and apt-get is usable (root, or sudo without a password). Whatever cannot be installed is
# reported with how to get it, and the script carries on (that test is skipped then). It never fails.
set -u

# shellcheck source=scripts/apt.sh
source "$(dirname "$0")/apt.sh"

have_chromium() { [ -x /usr/bin/chromium ]; }

if ! have_chromium; then
  if can_apt; then
    echo "Chromium not found: installing the Debian package chromium (for the rendering test of mentor report)"
    apt_install chromium fonts-dejavu-core  # a font for the page's text
  fi
  if ! have_chromium; then
    cat >&2 <<MSG
Chromium (/usr/bin/chromium) was not found and could not be installed here; the test that renders a
mentor report in a headless browser is skipped without it. To run it, install the Debian package:
  sudo apt-get install chromium
(the report itself needs no browser: open report.html in any one, or read report.md).
MSG
  fi
fi
exit 0
