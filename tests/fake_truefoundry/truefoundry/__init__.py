"""A recorded fake of the `truefoundry` package (only `truefoundry.ml`), for tests: see ml/__init__.py."""
