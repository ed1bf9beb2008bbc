"""Build the optional C fast path of node.reader (node/_scan.c).

Everything else about the package is in pyproject.toml. The extension is optional:
it is built against the system zlib (for its crc32) when that links, else with the
CRC-32 table of its own, and if it cannot be built at all (no compiler, no Python
headers) installation still succeeds and node.reader uses its pure-Python code.
"""

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext


class OptionalBuildExt(build_ext):
    """build_ext that tries zlib, then no zlib, then warns instead of failing."""

    def run(self):
        try:
            super().run()
        except Exception as e:  # any failure means "no extension", never a failed install
            _warn(f"the C fast path was not built ({e})")

    def build_extension(self, ext):
        try:
            super().build_extension(ext)
            return
        except Exception as e:
            _warn(f"building {ext.name} with zlib failed ({e}); trying without")
        ext.define_macros = [m for m in ext.define_macros if m[0] != "WALREP_USE_ZLIB"]
        ext.libraries = [lib for lib in ext.libraries if lib != "z"]
        self.force = True  # never reuse an object file compiled for zlib
        try:
            super().build_extension(ext)
        except Exception as e:
            _warn(f"{ext.name} was not built ({e}); walrep will use its pure-Python reader")


def _warn(message: str) -> None:
    print(f"WARNING: {message}")


setup(
    ext_modules=[
        Extension(
            "walrep.node._scan",
            sources=["node/_scan.c"],
            define_macros=[("WALREP_USE_ZLIB", "1")],
            libraries=["z"],
            optional=True,
        )
    ],
    cmdclass={"build_ext": OptionalBuildExt},
)
