{#- In the template of the UpdateVM (or of a qube an offline import reads from):
    qubes.FwupdDownload. Apply: sudo qubesctl --skip-dom0 --targets=TEMPLATE
    state.apply qubes-fwupd.updatevm -#}
qubes-fwupd-updatevm-installed:
  pkg.installed:
    - name: qubes-fwupd-updatevm
