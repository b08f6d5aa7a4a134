"""invariantd.daemon: everything that touches the host — KVM (cffi), the simulated host, the daemon."""
