"""Weight -> weight rewrites that make a weight easier to quantize.

magr.magr          MagR's l-inf proximal solver (range shrinking before PTQ).
residual.expand    PIPE/REx residual expansion into quantized terms, with
                   group sparsity, its error bound and the ensemble split.
"""
