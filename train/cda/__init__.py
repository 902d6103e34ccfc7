"""Context-disentangled augmentation (CDA): count-varying cutout, spatial and colour attribute editing."""
