"""qubes-fwupd broker: LVFS firmware updates carried across Qubes OS qube boundaries."""
