"""Bindings for the bpf() syscall.

Nothing outside this package touches cffi (``tests/test_layering.py`` checks it). ``bpf`` has
one function per ``bpf()`` command and states the one error convention they share, ``buffer``
owns C memory the kernel reads or writes, ``bpffs`` finds or mounts the BPF filesystem, ``fd``
owns file descriptors, ``consts`` mirrors the UAPI enums.
"""
