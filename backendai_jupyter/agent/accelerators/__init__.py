"""Accelerator plugins: discover devices, offer slots, hand devices to containers, report stats."""
