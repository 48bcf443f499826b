"""Handing our networks to other tools (nnU-Net v2: ``interop.nnunet``)."""
