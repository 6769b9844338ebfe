"""Operator side: make, sign and ship model bundles to a fleet (`edge-fleet`). Never runs on a device."""
