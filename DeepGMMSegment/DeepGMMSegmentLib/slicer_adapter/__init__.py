"""The Slicer adapter: MRML in and out, the worker process, torch inside Slicer, the panel's decisions.

Torch-free in the calling process (the engine runs in the worker); never imports ``cli``.
"""
