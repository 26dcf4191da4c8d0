"""Models for multi-task learning: shared encoders, task heads, and the model that joins them."""

from mtl_jax.models.deeplab import ASPPHead
from mtl_jax.models.deeplab import DilatedResNet50
from mtl_jax.models.encoders import MLPEncoder
from mtl_jax.models.encoders import ResNet18
from mtl_jax.models.encoders import SegNet
from mtl_jax.models.encoders import SmallCNN
from mtl_jax.models.encoders import max_pool_with_mask
from mtl_jax.models.encoders import max_unpool
from mtl_jax.models.heads import DenseHead
from mtl_jax.models.heads import GlobalHead
from mtl_jax.models.layers import count_parameters
from mtl_jax.models.multitask import ENCODERS
from mtl_jax.models.multitask import HeadSpec
from mtl_jax.models.multitask import Heads
from mtl_jax.models.multitask import MultiTaskModel
from mtl_jax.models.multitask import build_model
from mtl_jax.models.multitask import init_model
from mtl_jax.models.pretrained import load_backbone
from mtl_jax.models.pretrained import save_backbone

__all__ = [
  "ASPPHead",
  "DilatedResNet50",
  "ENCODERS",
  "DenseHead",
  "GlobalHead",
  "HeadSpec",
  "Heads",
  "MLPEncoder",
  "MultiTaskModel",
  "ResNet18",
  "SegNet",
  "SmallCNN",
  "build_model",
  "count_parameters",
  "init_model",
  "load_backbone",
  "max_pool_with_mask",
  "max_unpool",
  "save_backbone",
]
