"""Bindings for the bpf() syscall.

Nothing outside this package touches cffi. ``bpf`` has one function per ``bpf()`` command,
``bpffs`` finds or mounts the BPF filesystem, ``fd`` owns file descriptors, ``consts`` mirrors
the UAPI enums.
"""
