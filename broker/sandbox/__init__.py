"""The local Qubes stand-in: qubes as process trees, real fwupd daemons, an LVFS mirror,
a qrexec emulation, and a PKI made at run time. Nothing here is imported by the logic
that runs in a real qube."""
