"""Layer 1, the numerics (numpy + torch, never ``slicer``): inputs, mixture maths, EM, the U-Net,
the deep fits and the bias field. Nothing is re-exported here; import the module you need,
e.g. ``from DeepGMMSegmentLib.core import em``.
"""
