"""The default kernel image: an offline recipe (mmdebstrap + docker import), tagged by its hash."""

from .recipe import DEFAULT_RECIPE, ImageRecipe, build_hint, default_image

__all__ = ["DEFAULT_RECIPE", "ImageRecipe", "build_hint", "default_image"]
