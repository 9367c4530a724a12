"""Development tools that do not ship with the package: training the demo model on generated
scenes (``python -m tools.train``) and measuring it (``python -m tools.evaluate``)."""
