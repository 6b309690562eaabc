"""Developer tooling for the read-out kernels: the Triton-interpreter tracer and address
sanitizer, and the ahead-of-time compile check. Nothing in the library imports this package."""
