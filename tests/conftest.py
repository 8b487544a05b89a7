"""Root conftest: the VM test bed's plugin (``@pytest.mark.vm`` runs a test inside the VM)."""

pytest_plugins = ["vdisk.testing.pytest_plugin"]
