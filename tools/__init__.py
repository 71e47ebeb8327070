"""Command-line tools over the library that need more than one layer of it (the table CLI needs the backend
registry), kept out of :mod:`solvers` so that it stays numerics only."""
