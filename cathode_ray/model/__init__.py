"""Model stage: backbones (frozen trunk + trainable last block), head, ensemble, artifact IO."""
