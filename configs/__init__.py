"""Shipped run configs (YAML), installed as ``lightmeta.configs``; see ``python -m lightmeta list configs``."""
