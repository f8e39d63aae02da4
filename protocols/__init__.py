"""Protocol definitions and dataset loaders; every module here registers itself."""
