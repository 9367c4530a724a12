"""Package discovery that pyproject.toml cannot express: plugins/ installs as `edgepipe_plugins`."""
from setuptools import find_packages, setup

packages = find_packages(include=["edgepipe", "edgepipe.*"])
packages += ["edgepipe_plugins" + p[len("plugins"):] for p in find_packages(include=["plugins", "plugins.*"])]

setup(packages=packages, package_dir={"edgepipe_plugins": "plugins"})
