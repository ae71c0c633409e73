{#- In the template of sys-usb: qubes.FwupdUsbvm (and fwupd, which it requires).
    Apply: sudo qubesctl --skip-dom0 --targets=TEMPLATE state.apply qubes-fwupd.usbvm -#}
qubes-fwupd-usbvm-installed:
  pkg.installed:
    - name: qubes-fwupd-usbvm
