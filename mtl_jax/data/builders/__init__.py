"""TFDS dataset builders of our own (NYUv2 3-task, Cityscapes segmentation + inverse depth),
TensorFlow-free.

Every feature is a plain `tfds.features.Tensor` (zlib-compressed), so both building and reading
work without TensorFlow; importing a module registers its builder with TFDS by name.
"""
