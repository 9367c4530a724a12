"""edgepipe's first-party stage plugins, installed as the package ``edgepipe_plugins``.

One folder per stage under sources/, processors/ and sinks/, each with its code, a sample.yaml
that the tests validate, and a README. They register through the ``edgepipe.stages`` entry-point
group in pyproject.toml, exactly as a third-party plugin does.
"""
