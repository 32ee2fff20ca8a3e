"""Build configuration that pyproject.toml cannot express: the compiled exact knapsack solver of
the AppMul selection (passes/appmul/_mckp.c, plain C against the CPython API; no numpy headers),
built by ``pip install -e .`` / ``make setup``. Everything else is in pyproject.toml."""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "sliver.passes.appmul._mckp",
            sources=["passes/appmul/_mckp.c"],
            extra_compile_args=["-O2", "-std=c11"],
        )
    ]
)
