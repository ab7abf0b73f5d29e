"""The experiments' tasks: small synthetic worlds with programmatic rewards (JAX functions inside a jitted
step where they can be), each serving the experiment scripts beside this package."""
