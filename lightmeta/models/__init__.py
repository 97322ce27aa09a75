"""Backbones, registered in :data:`lightmeta.registry.MODELS`.

A backbone class takes ``(config, in_shape, out_features)``: ``out_features=None`` builds a
feature extractor (metric learners), an integer adds a linear head (gradient learners).
"""
from __future__ import annotations

from lightmeta.models.base import Backbone, build_model

__all__ = ["Backbone", "build_model"]
