"""Graphics views: the image panel and the layers drawn over it."""
