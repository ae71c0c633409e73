"""qubes-fwupd broker: LVFS firmware updates carried across Qubes OS qube boundaries."""

# the one version: pyproject reads it, the rpm specs and debian/changelog are checked against it
__version__ = "0.1.0"
