"""Evaluation of DeepGMMSegment against peers on real images (``make evaluate``)."""
