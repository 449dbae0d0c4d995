"""trio-sni: an SNI proxy on Trio whose data plane can run in the Linux kernel.

General layout: ``trio_sni.sansio`` is the I/O-free core (ClientHello reader, policy, config);
the modules here are the Trio shell that does the I/O (``server``, ``connection``,
``resolver``, ``upstream``, ``forward``, ``features``); ``loader`` (a separate package) is the
BPF loader.
"""

from ._version import __version__ as __version__
from .errors import TrioSniError as TrioSniError
from .sansio import Config as Config
from .sansio import load_config as load_config
from .server import Proxy as Proxy
