"""Package discovery that pyproject.toml cannot express: plugins/ installs as `edgepipe_plugins`,
benchmarks/ as `edgepipe_benchmarks` (so `edgepipe bench` works from a wheel, on the device)."""
from setuptools import find_packages, setup

packages = find_packages(include=["edgepipe", "edgepipe.*"])
packages += ["edgepipe_plugins" + p[len("plugins"):] for p in find_packages(include=["plugins", "plugins.*"])]
packages += ["edgepipe_benchmarks"]

setup(packages=packages, package_dir={"edgepipe_plugins": "plugins", "edgepipe_benchmarks": "benchmarks"})
