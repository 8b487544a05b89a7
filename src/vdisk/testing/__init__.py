"""Test support for vdisk: the VM test bed (`vdisk.testing.vm`) and its pytest plugin."""
