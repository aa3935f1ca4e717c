"""Model families, one file each; they register themselves with :mod:`anydepth.registry`."""
