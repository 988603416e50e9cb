"""Catalogues of public sources and the rebuild of a corpus from them."""
