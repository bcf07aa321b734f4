from tests.recipes.conftest import tiny_pixel_dir  # noqa: F401  (shared fixture)
