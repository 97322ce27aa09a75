"""FC100 (Fewshot-CIFAR100): Oreshkin, Rodriguez & Lacoste (2018), "TADAM: Task dependent
adaptive metric for improved few-shot learning", NeurIPS. CIFAR-100 split by super-class, so
that meta-test classes are semantically far from meta-training ones: 12/4/4 super-classes,
i.e. 60/20/20 classes of 600 32x32 images.

Data: the official CIFAR-100 python archive (``cifar-100-python.tar.gz``, downloaded from
https://www.cs.toronto.edu/~kriz/ when missing, MD5-checked); see
:mod:`lightmeta.datamodules._cifar100` for the layout, decoding and cache. Licence: CIFAR-100's
page asks users to cite Krizhevsky (2009) and states no further terms.

Split: ``splits/fc100_oreshkin.json`` lists each split's super-classes and their classes; the
archive's own coarse labels are checked against it, so a split can never cut a super-class.
``data.split_file`` may name another file (its ``superclasses``, if present, are checked too).
"""
from __future__ import annotations

import json

from lightmeta.class_splits import SPLIT_NAMES, Splits
from lightmeta.datamodules._cifar100 import Cifar100DataModule, superclasses
from lightmeta.errors import DataError
from lightmeta.registry import register_datamodule


@register_datamodule("fc100")
class FC100DataModule(Cifar100DataModule):
    """FC100 few-shot classification (Oreshkin et al. 2018 super-class split, 60/20/20 classes)."""

    split_name = "fc100_oreshkin"

    def splits(self, names: list[str]) -> Splits:
        """The class split; every super-class the split file names must be whole, and in one split."""
        splits = super().splits(names)
        path = self.split_path()
        try:
            listed = json.loads(path.read_text()).get("superclasses")
        except (OSError, ValueError) as exc:
            raise DataError(f"split file {path} is unreadable ({type(exc).__name__}: {exc})") from None
        if listed is None:
            return splits
        parent = superclasses(self.cache_path())
        for split in SPLIT_NAMES:
            want = {c for c, p in parent.items() if p in set(listed.get(split, {}))}
            have = set(splits[split])
            if want != have:
                odd = sorted(want ^ have)[0]
                raise DataError(
                    f"split file {path}: the '{split}' split's classes are not exactly those of its super-classes "
                    f"{sorted(listed.get(split, {}))} ('{odd}' is in the archive's super-class '{parent.get(odd)}'); "
                    "fix the file or the archive"
                )
        return splits
