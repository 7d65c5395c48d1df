"""The benchmark harness: hasten's configurations and diffusers' schedulers on one model, one noise."""
