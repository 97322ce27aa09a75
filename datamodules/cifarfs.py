"""CIFAR-FS: Bertinetto, Henriques, Torr & Vedaldi (2019), "Meta-learning with differentiable
closed-form solvers", ICLR. The 100 CIFAR-100 classes split at random into 64 meta-training,
16 meta-validation and 20 meta-test classes, 600 32x32 images each.

Data: the official CIFAR-100 python archive (``cifar-100-python.tar.gz``, downloaded from
https://www.cs.toronto.edu/~kriz/ when missing, MD5-checked); see
:mod:`lightmeta.datamodules._cifar100` for the layout, decoding and cache. Licence: CIFAR-100's
page asks users to cite Krizhevsky (2009) and states no further terms.

Split: ``splits/cifarfs_bertinetto.json`` (its ``source`` names where the class lists come
from); ``data.split_file`` may name another file in the same format.
"""
from __future__ import annotations

from lightmeta.datamodules._cifar100 import Cifar100DataModule
from lightmeta.registry import register_datamodule


@register_datamodule("cifarfs")
class CifarFSDataModule(Cifar100DataModule):
    """CIFAR-FS few-shot classification (Bertinetto et al. 2019 split, 64/16/20 classes)."""

    split_name = "cifarfs_bertinetto"
