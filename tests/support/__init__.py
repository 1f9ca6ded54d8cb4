"""What the tests share besides fixtures (those are in ``conftest.py``): settings, the second
archive, ASGI and DICOMweb helpers, scripted upstreams, the OpenID provider, loopback servers."""
