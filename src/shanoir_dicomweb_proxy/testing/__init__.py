"""A real-PACS test bed: a disposable Orthanc upstream and deterministic DICOM samples.

Used by the test suite, the benchmarks and the README demo::

    from shanoir_dicomweb_proxy.testing import OrthancServer, generate_samples

    samples = generate_samples(Path("samples"))
    with OrthancServer(Path("orthanc")) as orthanc:
        orthanc.load(samples.files)
        print(orthanc.dicomweb_url)

Needs the ``Orthanc`` binary and its DICOMweb plugin (``apt-get install orthanc
orthanc-dicomweb``), plus numpy for the samples.
"""

from ._orthanc import DICOMWEB_PLUGIN, OrthancError, OrthancServer, find_orthanc
from ._process import free_port, resident_memory
from ._proxy import ProxyServer, dump_toml
from ._samples import SampleInstance, SampleSeries, SampleSet, SampleStudy, generate_samples

__all__ = [
    "DICOMWEB_PLUGIN",
    "OrthancError",
    "OrthancServer",
    "ProxyServer",
    "SampleInstance",
    "SampleSeries",
    "SampleSet",
    "SampleStudy",
    "find_orthanc",
    "dump_toml",
    "free_port",
    "resident_memory",
    "generate_samples",
]
