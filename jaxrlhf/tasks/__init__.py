"""Small synthetic tasks with programmatic rewards (usable as JAX functions inside a jitted step)."""
