"""What pyproject.toml cannot express.

- Package layout: plugins/ installs as `edgepipe_plugins`, benchmarks/ as `edgepipe_benchmarks`
  (so `edgepipe bench` works from a wheel, on the device). Folders that hold only data
  (edgepipe/data, edgepipe/schemas, edgepipe/yolo/configs) are listed as packages too: Python can
  import any folder, and setuptools warns about every importable folder it is not told about.
- The license: setuptools 77 and later want an SPDX expression (`license = "Apache-2.0"`) and
  deprecate the `{text = ...}` table, while the newest setuptools for Python 3.8 (75.3, JetPack 5)
  rejects the expression. So `license` is dynamic and set here in the form this setuptools reads.
- Package data is listed here too: setuptools before 69 calls a `[tool.setuptools]` table in
  pyproject.toml "beta" and warns about it on every build.
"""
import setuptools
from setuptools import find_namespace_packages, setup


def _packages(where: str, name: str):
    found = find_namespace_packages(where=where, exclude=["*__pycache__*"])
    return [name] + [f"{name}.{p}" for p in found]


packages = _packages("edgepipe", "edgepipe") + _packages("plugins", "edgepipe_plugins")
packages += ["edgepipe_benchmarks"]

major = int(setuptools.__version__.split(".")[0])
license_field = {"license_expression": "Apache-2.0"} if major >= 77 else {"license": "Apache-2.0"}

setup(
    packages=packages,
    package_dir={"edgepipe_plugins": "plugins", "edgepipe_benchmarks": "benchmarks"},
    package_data={
        "edgepipe": ["yolo/configs/*.yaml", "schemas/*.json", "data/*", "py.typed"],
        "edgepipe_plugins": ["*/*/sample.yaml", "*/*/README.md", "*/*/*.html"],
    },
    **license_field,
)
