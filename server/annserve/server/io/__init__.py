"""Reading stores: h5ad files, AnnData zarr stores and collections, row by row range."""
