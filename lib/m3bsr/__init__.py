"""m3bsr: an open replication of M3BSR (SIGIR 2025) and its baselines."""
__version__ = "0.1.0"
