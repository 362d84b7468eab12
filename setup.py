"""The compiled fast path of the repo parse (migration_assets/atproto/_fastrepo.c). It is optional: where it
cannot be built (no C compiler, no OpenSSL headers), the install goes on and the pure-Python parse is used;
tests/atproto/test_fastrepo.py fails when it is missing, so CI always runs it."""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "migration_assets.atproto._fastrepo",
            ["migration_assets/atproto/_fastrepo.c"],
            libraries=["crypto"],
            extra_compile_args=["-O2", "-Wall", "-Wextra", "-Wno-unused-parameter"],
            optional=True,
        )
    ]
)
