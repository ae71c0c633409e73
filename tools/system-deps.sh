#!/usr/bin/env bash
# Install the Debian packages that `make test` and `make demo` need.
# As root: apt-get installs what is missing. Otherwise: one line naming what is missing, exit 1.
set -euo pipefail
# gcab: the cab walker is compared with it (a missing tool would skip that test)
# procps: tests look for stray processes with pgrep
pkgs=(fwupd fwupd-tests gnupg openssl dbus-daemon dbus-bin iproute2 util-linux ca-certificates man-db
      gcab procps)
# dom0's desktop session in the sandbox (broker/sandbox/desktop.py): an X server, dunst for
# org.freedesktop.Notifications, busctl for `dunstctl history`, and nss_wrapper, which gives
# the session's dbus-daemon a passwd entry for the sandbox's bare dom0 user id
pkgs+=(xvfb dunst systemd libnss-wrapper)
# the packages are built and checked (tests/packaging): rpm and its lint on Debian too, the
# VM debs, and Debian's python modules, which the installed scripts' /usr/bin/python3 imports
pkgs+=(rpm rpm2cpio cpio rpmlint lintian dpkg-dev debhelper dh-python fakeroot
       python3-dbus-next python3-lxml python3-requests python3-gnupg python3-zstandard)
# a pyenv or other python may bring its own venv/ensurepip; Debian's python3 needs python3-venv
"${PYTHON:-python3}" -c 'import ensurepip, venv' 2>/dev/null || pkgs+=(python3-venv)
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
[ ${#missing[@]} -eq 0 ] && exit 0
if [ "$(id -u)" != 0 ]; then
  echo "missing Debian packages (run as root, or: sudo apt-get install ${missing[*]})" >&2
  exit 1
fi
echo "installing Debian packages: ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -q >/dev/null
apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null
