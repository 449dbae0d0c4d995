"""The sans-I/O core of trio-sni: protocol, policy and config code with no I/O at all.

Nothing here touches a socket, a clock, a logger or an event loop (``tests/test_layering.py``
enforces it): bytes and times go in, events, decisions and typed errors come out. That makes
every piece easy to fuzz and usable from any event loop; the Trio shell in ``trio_sni`` does
the I/O.
"""

from ._reader import BufferedReader as BufferedReader
from ._reader import EventT as EventT
from .addresses import OWN_ADDRESS as OWN_ADDRESS
from .addresses import IPAddress as IPAddress
from .addresses import refusal_reason as refusal_reason
from .addresses import unwrap_mapped as unwrap_mapped
from .alerts import Alert as Alert
from .alerts import alert_record as alert_record
from .clienthello import DEFAULT_MAX_SIZE as DEFAULT_MAX_SIZE
from .clienthello import HARD_MAX_SIZE as HARD_MAX_SIZE
from .clienthello import NEED_DATA as NEED_DATA
from .clienthello import ClientHello as ClientHello
from .clienthello import ClientHelloReader as ClientHelloReader
from .clienthello import NeedData as NeedData
from .config import Config as Config
from .config_load import dump_config as dump_config
from .config_load import load_config as load_config
from .config_load import load_config_text as load_config_text
from .errors import ClientHelloError as ClientHelloError
from .errors import ConfigError as ConfigError
from .errors import TrioSniError as TrioSniError
from .hostname import is_valid_hostname as is_valid_hostname
from .hostname import normalize_sni as normalize_sni
from .http_request import HttpRequest as HttpRequest
from .http_request import HttpRequestError as HttpRequestError
from .http_request import HttpRequestReader as HttpRequestReader
from .policy import ClientLimiter as ClientLimiter
from .policy import Deny as Deny
from .policy import Policy as Policy
from .policy import Route as Route
from .proxy_protocol import ProxyHeader as ProxyHeader
from .proxy_protocol import ProxyHeaderError as ProxyHeaderError
from .proxy_protocol import ProxyHeaderReader as ProxyHeaderReader
from .proxy_protocol import encode_header as encode_proxy_header
from .socks5 import Socks5Client as Socks5Client
from .socks5 import Socks5Connected as Socks5Connected
from .socks5 import Socks5Error as Socks5Error

# The package's public surface. Every name above is re-exported; listing them here also covers
# ``encode_proxy_header``, the PROXY-protocol writer (the sans-I/O counterpart of
# ``ProxyHeaderReader``), whose package-level name differs from ``proxy_protocol.encode_header``.
__all__ = [
    "DEFAULT_MAX_SIZE",
    "HARD_MAX_SIZE",
    "NEED_DATA",
    "OWN_ADDRESS",
    "Alert",
    "BufferedReader",
    "ClientHello",
    "ClientHelloError",
    "ClientHelloReader",
    "ClientLimiter",
    "Config",
    "ConfigError",
    "Deny",
    "EventT",
    "HttpRequest",
    "HttpRequestError",
    "HttpRequestReader",
    "IPAddress",
    "NeedData",
    "Policy",
    "ProxyHeader",
    "ProxyHeaderError",
    "ProxyHeaderReader",
    "Route",
    "Socks5Client",
    "Socks5Connected",
    "Socks5Error",
    "TrioSniError",
    "alert_record",
    "dump_config",
    "encode_proxy_header",
    "is_valid_hostname",
    "load_config",
    "load_config_text",
    "normalize_sni",
    "refusal_reason",
    "unwrap_mapped",
]
