"""``python -m solvers.bench``: the command the README and earlier releases use for the exact-reference
benchmark, kept as an alias of ``python -m bench.exact``. The benchmark lives in :mod:`bench.exact` and what it
shares with the distillation's validation in :mod:`solvers.evaluate`; this module imports neither unless run."""

if __name__ == "__main__":
    import sys

    from bench.exact import main

    sys.exit(main())
