"""A pure-Python BPF loader: ELF + BTF in, verified programs and maps out.

No compiler, no libbpf: pyelftools reads the object, ``btf`` reads its BTF, and the kernel is
driven with raw ``bpf()`` syscalls through cffi in ABI mode. The phases follow libbpf's open ->
load -> attach::

    import trio_sni_loader as loader

    spec = loader.load_collection_spec("prog.bpf.o")        # pure data, no syscalls
    with loader.Collection.load(spec, pin_path="/sys/fs/bpf/app") as coll:
        sock_hash = coll.maps["sock_hash"]
        with loader.attach_sk_skb(coll.programs["stream_verdict"], sock_hash):
            sock_hash.insert_socket(cookie, sock)

This package knows nothing about proxies or Trio.
"""

from __future__ import annotations

from ._sys.consts import AttachType as AttachType
from ._sys.consts import MapFlag as MapFlag
from ._sys.consts import MapType as MapType
from ._sys.consts import ProgType as ProgType
from ._sys.consts import UpdateFlag as UpdateFlag
from ._sys.fd import live_fds as live_fds
from .collection import Collection as Collection
from .elf import load_collection_spec as load_collection_spec
from .errors import BPFSyscallError as BPFSyscallError
from .errors import BTFError as BTFError
from .errors import ELFFormatError as ELFFormatError
from .errors import LicenseError as LicenseError
from .errors import LoaderError as LoaderError
from .errors import MapIncompatibleError as MapIncompatibleError
from .errors import MissingPrivilegeError as MissingPrivilegeError
from .errors import NotSupportedError as NotSupportedError
from .errors import VerifierError as VerifierError
from .features import have_link as have_link
from .features import have_map_type as have_map_type
from .features import have_prog_type as have_prog_type
from .features import probe_all as probe_all
from .links import Link as Link
from .links import attach_sk_skb as attach_sk_skb
from .links import attach_tcx as attach_tcx
from .links import attach_xdp as attach_xdp
from .maps import DEFAULT_PIN_ROOT as DEFAULT_PIN_ROOT
from .maps import RAW as RAW
from .maps import Int as Int
from .maps import Map as Map
from .maps import Struct as Struct
from .maps import ensure_bpffs as ensure_bpffs
from .maps import possible_cpus as possible_cpus
from .programs import Program as Program
from .programs import TestRunResult as TestRunResult
from .ringbuf import RingReader as RingReader
from .spec import CollectionSpec as CollectionSpec
from .spec import MapSpec as MapSpec
from .spec import PinType as PinType
from .spec import ProgramSpec as ProgramSpec
from .spec import Reference as Reference
from .variables import Variable as Variable
from .variables import VariableSpec as VariableSpec
from .variables import global_variables as global_variables
