"""Input data: procedural scenes (the embedded default), toy problems, TFDS pipelines,
corruptions."""
