"""Bindings for the bpf() syscall.

Nothing outside this package touches cffi. ``bpf`` has one function per ``bpf()`` command,
``fd`` owns file descriptors, ``consts`` mirrors the UAPI enums.
"""
