"""Drop-in ``nn.Module`` layers built on :mod:`pyblend.ops`."""
