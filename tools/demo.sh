#!/usr/bin/env bash
# make demo: the whole path on the sandbox, each step shown as a user would type it.
# Ends with the fake webcam at 1.2.4, updated by sys-usb's fwupd (not dom0's).
set -euo pipefail
DIR=${1:-/tmp/qfwupd-demo}
WEBCAM=b585990a-003e-5270-89d5-3705a17f9a43
export QUBES_FWUPD_SANDBOX=$DIR

step() { printf '\n==> %s\n' "$*"; }
cleanup() { qubes-fwupd-sandbox down --dir "$DIR" >/dev/null 2>&1 || true; }

# a previous demo's sandbox is stopped and removed: the demo starts from nothing.
# Only ever remove a directory that looks like a sandbox (DEMO_DIR is user input).
cleanup
if [ -e "$DIR" ]; then
  if [ -d "$DIR/vm" ] || [ -z "$(ls -A "$DIR")" ]; then rm -rf "$DIR"
  else echo "demo: $DIR exists and is not a sandbox; choose another DEMO_DIR" >&2; exit 1; fi
fi
trap cleanup EXIT

step "qubes-fwupd-sandbox up --dir $DIR"
qubes-fwupd-sandbox up --dir "$DIR"

step "qubes-fwupdmgr refresh      # dom0 -> UpdateVM downloads -> dom0 verifies -> both fwupd"
qubes-fwupdmgr refresh

step "qubes-fwupdmgr get-devices"
qubes-fwupdmgr get-devices

step "qubes-fwupdmgr get-updates"
qubes-fwupdmgr get-updates

step "qubes-fwupdmgr update -y    # cab via the UpdateVM, checked in dom0, installed by its owner"
qubes-fwupdmgr update -y

step "qubes-fwupdmgr get-devices"
qubes-fwupdmgr get-devices

step "check: the webcam is at 1.2.4 in sys-usb; dom0's own fwupd still reports 1.2.2"
qubes-fwupdmgr get-devices --json | python3 -c "
import json, sys
devs = [d for d in json.load(sys.stdin)['Devices'] if '$WEBCAM' in d['Guid']]
assert [(d['Qube'], d['Version']) for d in devs] == [('sys-usb', '1.2.4')], devs
print('sys-usb webcam:', devs[0]['Version'])"
DBUS_SYSTEM_BUS_ADDRESS="unix:path=$DIR/vm/dom0/run/dbus/system_bus_socket" \
  fwupdmgr --json get-devices 2>/dev/null | python3 -c "
import json, sys
v = [d['Version'] for d in json.load(sys.stdin)['Devices'] if '$WEBCAM' in d.get('Guid', [])]
assert v == ['1.2.2'], v
print('dom0 fwupd webcam (untouched):', v[0])"

step "qubes-fwupd-sandbox down --dir $DIR"
trap - EXIT
qubes-fwupd-sandbox down --dir "$DIR"
echo
echo "demo OK"
