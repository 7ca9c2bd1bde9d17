"""Weight -> weight rewrites that make a weight easier to quantize.

magr.magr   MagR's l-inf proximal solver (range shrinking before PTQ).
"""
